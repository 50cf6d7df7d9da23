"""`loragate train ...`: retrain an alias's adapter from its users' feedback (training.retrain).

`train run` does it all and prints a summary; `train dataset|fit|eval|publish` do one step each on a
run folder (`dataset` starts one and prints its folder). The config is training.config.RetrainConfig:
`--config FILE.yaml`, then any of its fields as flags after `--` (e.g. `-- --epochs 3 --lora_r 16`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from gateway.cli.common import console, fail, job_redis, plain_table, tenant_must_exist, who
from gateway.ports import url_host
from gateway.settings import Settings

if TYPE_CHECKING:
    from training.retrain import Run, Stack

T = TypeVar("T")
train_app = typer.Typer(
    help="Retrain an alias's adapter from feedback: dataset, fit, eval gate, publish, canary.", no_args_is_help=True
)
FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}
Tenant = Annotated[str, typer.Option("--tenant", help="The tenant.")]
Alias = Annotated[str, typer.Option("--alias", help="The alias to retrain (what its clients call).")]
Config = Annotated[Path | None, typer.Option("--config", help="A YAML file of RetrainConfig fields.")]
RunDir = Annotated[Path, typer.Option("--run", help="The run's folder (printed by `train dataset`).")]
GatewayUrl = Annotated[
    str | None,
    typer.Option("--gateway-url", envvar="LORAGATE_URL", help="The gateway the eval asks (default: this host's)."),
]


def _with_stack(work: Callable[[Stack], Awaitable[T]], gateway_url: str | None, stopped: str, job: Run) -> T:
    """Run a step (or all) of run `job` on the gateway's Redis servers, holding its alias (training.lease);
    `stopped` says what a SIGTERM (or Ctrl-C) left: each step cleans up what it can before the cancellation gets
    through (training.retrain)."""
    from redis.exceptions import RedisError

    from adapters.base_model import PrepareError
    from adapters.store import AdapterNotFound
    from gateway.experiments import ExperimentNotFound
    from gateway.tenants import TenantNotFound
    from training.dataset import NotEnoughData
    from training.lease import alias_lease
    from training.publish import RetrainRefused
    from training.retrain import Stack
    from training.train import TrainingError

    settings = Settings()
    said = job.state.error  # what run.json said before this step: the step may write its own

    async def run() -> T:
        state = job_redis(settings.redis_url)
        records = job_redis(settings.records_redis_url or settings.redis_url)
        url = (gateway_url or f"http://{url_host(settings.host)}:{settings.port}").rstrip("/")
        task = asyncio.current_task()
        if task is not None:  # SIGTERM (a deadline, `docker stop`) cancels, as asyncio.run makes Ctrl-C do
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            async with alias_lease(state, job.state.tenant, job.state.alias, job.state.run_id):  # one run per alias
                return await work(Stack(settings, state, records, url))
        finally:
            await state.aclose()
            await records.aclose()

    try:
        return asyncio.run(run())
    except asyncio.CancelledError as exc:
        raise _failed(job, said, f"stopped by SIGTERM: {stopped}") from exc
    except KeyboardInterrupt as exc:
        raise _failed(job, said, f"stopped by Ctrl-C: {stopped}") from exc
    except (
        NotEnoughData,
        RetrainRefused,
        TrainingError,
        PrepareError,
        AdapterNotFound,
        ExperimentNotFound,
        TenantNotFound,
        ValueError,
    ) as exc:
        raise _failed(job, said, str(exc)) from exc
    except (RedisError, ConnectionError) as exc:
        raise _failed(job, said, f"Redis or the gateway cannot be reached: {exc}") from exc
    except OSError as exc:  # the disk (full, a permission), a file the step reads: said as it is
        raise _failed(job, said, f"{type(exc).__name__}: {exc}") from exc


def _failed(job: Run, said: str | None, message: str) -> typer.Exit:
    """Say why a step failed, and write it in the run's run.json unless the step wrote its own (`said`: what it
    held before; a step refused, or out of data, left a run.json that said nothing of it)."""
    if job.state.error == said and job.folder.is_dir():
        job.state.error = message
        with contextlib.suppress(OSError):
            job.save()
    return fail(message)


def _config(path: Path | None, flags: list[str]) -> Any:
    """A new run's config, the files its eval reads checked now rather than after the fit: the schema is one, each
    regression row is an eval row."""
    from training.config import load
    from training.evaluate import load_rows
    from training.metrics import load_schema_validator

    try:
        config = load(path, flags)
        if config.json_schema_path:
            load_schema_validator(config)
        if config.regression_jsonl:
            load_rows(config.regression_jsonl)
    except (ValueError, OSError) as exc:  # json's JSONDecodeError (a schema that is no JSON) is a ValueError
        raise fail(str(exc)) from exc
    return config


def _new_run(tenant: str, alias: str, config: Any) -> Run:
    from training.retrain import Run

    created = tenant_must_exist(tenant).created  # a tenant created again under its name later is another
    return Run.create(Settings().training_root, tenant, alias, config, tenant_created=created)


def _load(folder: Path) -> Run:
    from training.retrain import Run

    if not (folder / "run.json").is_file():
        raise fail(f"{folder} is not a run folder (no run.json)")
    try:
        run = Run.load(folder)
        run.config  # noqa: B018 - a config this version cannot read is said now, not in the middle of a step
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise fail(f"{folder / 'run.json'} cannot be read by this version of loragate: {exc}") from exc
    return run


def _say(message: str) -> None:
    console.log(message)


@train_app.command("run", context_settings=FLAGS)
def run_all(
    ctx: typer.Context, tenant: Tenant, alias: Alias, config: Config = None, gateway_url: GatewayUrl = None
) -> None:
    """All of it: dataset from feedback, fit, eval gate through the gateway, publish, canary; then a summary."""
    from training.retrain import retrain

    run = _new_run(tenant, alias, _config(config, ctx.args))
    console.log(f"run {run.state.run_id} in {run.folder}")
    stopped = (
        "training (if under way) stopped at a step's (or an evaluation batch's) end, any unlisted candidate was "
        f"removed, and {run.folder}/run.json says how far the run got"
    )
    _with_stack(lambda stack: retrain(run, stack, _say, who("cli:retraining")), gateway_url, stopped, run)
    summary(run)


@train_app.command("dataset", context_settings=FLAGS)
def dataset_step(ctx: typer.Context, tenant: Tenant, alias: Alias, config: Config = None) -> None:
    """Start a run: build its dataset from the alias's feedback (or the config's JSONL); prints the run folder."""
    from training.retrain import build_dataset

    run = _new_run(tenant, alias, _config(config, ctx.args))
    _with_stack(
        lambda stack: build_dataset(run, stack, _say),
        None,
        f"the dataset step of {run.folder} did not finish; start another run",
        run,
    )
    typer.echo(str(run.folder))


@train_app.command("fit")
def fit_step(
    run_dir: RunDir, resume: Annotated[bool, typer.Option(help="Go on from the last checkpoint.")] = False
) -> None:
    """Train the run's adapter on its dataset (LoRA; QLoRA on CUDA)."""
    from training.retrain import fit

    run = _load(run_dir)
    stopped = (
        "training stopped at a step's (or an evaluation batch's) end, the fit step not done; `loragate train fit "
        f"--run {run.folder} --resume` goes on from the last whole epoch's checkpoint"
    )
    _with_stack(lambda stack: fit(run, stack, _say, resume), None, stopped, run)
    _losses(run)


@train_app.command("eval")
def eval_step(run_dir: RunDir, gateway_url: GatewayUrl = None) -> None:
    """Stage the adapter as an unlisted candidate and run the eval gate through the gateway."""
    from training.retrain import evaluate_candidate

    run = _load(run_dir)
    stopped = (
        "the eval did not finish (its training key is revoked, or expires within 2 hours), a staged candidate stays "
        f"unlisted; `loragate train eval --run {run.folder}` asks again"
    )
    _with_stack(lambda stack: evaluate_candidate(run, stack, _say), gateway_url, stopped, run)
    summary(run)


@train_app.command("publish")
def publish_step(run_dir: RunDir) -> None:
    """Publish a candidate that passed the gate (and start its canary), or remove one that did not."""
    from training.retrain import publish_candidate

    run = _load(run_dir)
    stopped = f"{run.folder}/run.json says what was published; `loragate train publish --run {run.folder}` goes on"
    _with_stack(lambda stack: publish_candidate(run, stack, _say, who("cli:retraining")), None, stopped, run)
    summary(run)


def _losses(run: Run) -> None:
    trained = run.state.train or {}
    table = plain_table("epoch", "train loss", "validation loss", title=f"training ({trained.get('precision', '?')})")
    for epoch in trained.get("epochs", []):
        cells = [epoch.get("train_loss"), epoch.get("validation_loss")]
        table.add_row(str(epoch["epoch"]), *("-" if v is None else f"{v:.4f}" for v in cells))
    console.print(table)


def summary(run: Run) -> None:
    """What the run found: data, losses, the metric table against current and base, what was published."""
    from rich.markdown import Markdown
    from rich.markup import escape

    state = run.state
    card = state.data_card or {}
    console.print(f"[bold]run {state.run_id}[/bold] — tenant {state.tenant}, alias {state.alias}")
    if card:
        console.print(f"data {card['dataset_hash'][:12]}: examples {card.get('examples')}, splits {card.get('splits')}")
    if state.train:
        _losses(run)
    if state.eval:
        console.print(Markdown(state.eval["table"]))
        verdict = "[green]publish[/green]" if state.eval["publish"] else "[red]do not publish[/red]"
        if state.eval.get("unjudged"):
            verdict = "[yellow]no verdict[/yellow] (`train eval` asks again)"
        console.print(f"gate: {verdict} — " + escape("; ".join(state.eval["reasons"])))
    if state.published:
        console.print(f"published [bold]{state.published}[/bold]")
    if state.canary:
        console.print(f"canary [bold]{state.canary}[/bold] on alias {state.alias}: loragate experiments show "
                      f"{state.canary} --tenant {state.tenant}")  # fmt: skip
    if state.error:
        console.print(f"[red]failed:[/red] {escape(state.error)}")
