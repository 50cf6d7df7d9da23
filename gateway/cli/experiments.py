"""`loragate experiments ...`: A/B experiments behind a tenant's alias (the same as the admin API)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.common import (
    alias_must_be_free,
    fail,
    output_file,
    plain_table,
    said,
    stdout_console,
    tenant_must_exist,
    who,
    with_redis,
    with_state_and_records,
)

if TYPE_CHECKING:
    from gateway.experiments import Arm

experiments_app = typer.Typer(help="A/B experiments between adapter versions, behind an alias.", no_args_is_help=True)
Tenant = Annotated[str, typer.Option("--tenant", help="The tenant.")]


@experiments_app.command("create")
def create(
    name: str,
    tenant: Tenant,
    alias: Annotated[str, typer.Option(help="The alias clients call (its current target is remembered).")],
    arm: Annotated[list[str], typer.Option(help="NAME=TARGET:WEIGHT, e.g. control=support-bot@1:90 (2 or more).")],
    control: Annotated[str, typer.Option(help="The control arm's name.")] = "control",
    auto_promote: Annotated[bool, typer.Option(help="Promote a winning arm by itself.")] = False,
    max_error_rate: Annotated[float | None, typer.Option(help="Roll back past control's error rate by this.")] = None,
    max_negative_rate: Annotated[float | None, typer.Option(help="Roll back an arm rated worse (0-1).")] = None,
    min_samples: Annotated[int, typer.Option(help="Rated completions per arm before a verdict.")] = 100,
    alpha: Annotated[float, typer.Option(help="False-positive rate of a verdict, at any number of looks.")] = 0.05,
    smallest_effect: Annotated[
        float, typer.Option(help="Differences in positive rate smaller than this do not matter.")
    ] = 0.02,
    mixture_sd: Annotated[
        float, typer.Option(help="The effect (in positive rate) the sequential test is tuned to.")
    ] = 0.1,
    guard_min_requests: Annotated[int, typer.Option(help="Requests an arm serves before a guard rail judges it.")] = 20,
) -> None:
    """Put two or more versions (or the base) behind ALIAS, split by weight, sticky per end user."""
    from adapters.registry import Registry
    from gateway import version_guard
    from gateway.experiments import Experiment, ExperimentStore, InvalidExperiment
    from gateway.pointers import PointerStore
    from gateway.routing import Router
    from gateway.settings import Settings

    settings = Settings()
    tenant_must_exist(tenant)
    alias_must_be_free(tenant, alias)
    try:
        arms = [parse_arm(spec) for spec in arm]
        rails = {"auto_promote": auto_promote, "max_error_rate": max_error_rate, "max_negative_rate": max_negative_rate}
        statistics = {"alpha": alpha, "smallest_effect": smallest_effect, "mixture_sd": mixture_sd}
        experiment = Experiment(
            name=name, tenant=tenant, alias=alias, control=control, arms=arms, min_samples=min_samples,
            guard_min_requests=guard_min_requests, **rails, **statistics,
        )  # fmt: skip
    except (InvalidExperiment, ValueError) as exc:
        raise fail(said(exc)) from exc

    async def run(redis: Any) -> Experiment:
        store, registry = ExperimentStore(redis), Registry(settings.adapter_root)
        router = Router(settings.served_model_name, registry, PointerStore(redis), store)
        try:
            async with version_guard.pointing_at(redis, router, [each.target for each in arms], tenant, alias):
                return await store.create(experiment, who("cli:experiments"))
        except version_guard.NameTaken as exc:
            raise ValueError(f"`{alias}` is already the name of a model of tenant {tenant}") from exc
        except version_guard.TargetMissing as exc:
            each = arms[exc.index]
            raise ValueError(f"arm {each.name}: `{each.target}` is not a version {tenant} can use") from exc

    created = with_redis(run)
    typer.echo(f"{created.name}: {alias} -> experiment ({', '.join(f'{a.name} {a.weight:g}' for a in created.arms)})")


@experiments_app.command("list")
def list_(tenant: Tenant) -> None:
    """The tenant's experiments."""
    from gateway.experiments import ExperimentStore

    tenant_must_exist(tenant)
    for experiment in with_redis(lambda redis: ExperimentStore(redis).all(tenant)):
        arms = ", ".join(f"{a.name}={a.target}:{a.weight:g}" for a in experiment.arms)
        typer.echo(f"{experiment.name}\t{experiment.status}\t{experiment.alias}\t{arms}")


@experiments_app.command("show")
def show(name: str, tenant: Tenant) -> None:
    """An experiment's arms and its audit log (who changed what, when)."""
    from datetime import UTC, datetime

    from gateway.experiment_results import results

    experiment, changes = with_redis(lambda redis: _with_audit(redis, tenant, name))
    shown = with_redis(lambda redis: results(redis, experiment), records=True)
    arms = plain_table("arm", "target", "weight", title=f"{name} ({experiment.status}, alias {experiment.alias})")
    for each in experiment.arms:
        arms.add_row(
            each.name + (" (control)" if each.name == experiment.control else ""), each.target, f"{each.weight:g}"
        )
    verdict = f"results: {shown['verdict']}" + (f" ({shown['winner']})" if shown["winner"] else "")
    if experiment.status not in ("running", "paused"):  # "keep running" read as advice for an ended one
        verdict = f"results when it ended ({experiment.status}); the verdict then: " + verdict.removeprefix("results: ")
    figures = plain_table(
        "arm", "requests", "users", "errors", "p50 ms", "p95 ms", "rated", "positive", "corrected", title=verdict
    )
    for arm_name, arm in shown["arms"].items():
        figures.add_row(
            arm_name, str(arm["requests"]), str(arm["users"]), _pct(arm["error_rate"]),
            _num(arm["latency_p50_ms"]), _num(arm["latency_p95_ms"]), str(arm["rated"]),
            _pct(arm["positive_rate"]), _pct(arm["corrected_share"]),
        )  # fmt: skip
    ratio = f"sample ratio mismatch p = {shown['sample_ratio_p']:.4f} (flagged below 0.001)"
    differences = plain_table(
        "arm", "positive rate vs control", "fixed 95% interval", "always-valid interval", caption=ratio
    )
    for d in shown["differences"]:
        differences.add_row(d["arm"], f"{d['diff']:+.3f}", _interval(d["fixed"]), _interval(d["always_valid"]))
    audit = plain_table("when", "who", "action", "detail", title="changes")
    for change in changes:
        when = datetime.fromtimestamp(change.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        audit.add_row(when, change.by, change.action, change.detail)
    stdout_console().print(arms, figures, differences, audit)


@experiments_app.command("page")
def page(
    name: str,
    tenant: Tenant,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write it (default: NAME.html).")] = None,
) -> None:
    """Write the experiment's HTML page (chart over time, figures, changes): open it in a browser."""
    from gateway import experiment_history, experiment_page
    from gateway.experiment_results import results

    experiment, changes = with_redis(lambda redis: _with_audit(redis, tenant, name))

    async def figures(redis: Any) -> Any:
        return await results(redis, experiment), await experiment_history.read(redis, experiment)

    shown, history = with_redis(figures, records=True)
    target = out or Path(f"{name}.html")
    with output_file(target) as page_file:
        page_file.write(experiment_page.render(experiment, shown, history, changes))
    typer.echo(f"{target} ({len(history)} points)")


async def _with_audit(redis: Any, tenant: str, name: str) -> Any:
    """An experiment and its audit log."""
    from gateway.experiments import ExperimentStore

    store = ExperimentStore(redis)
    return await store.get(tenant, name), await store.audit(tenant, name)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _interval(bounds: list[float | None]) -> str:
    low, high = bounds
    return "(-inf, inf)" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"


@experiments_app.command("weights")
def weights(
    name: str, tenant: Tenant, weight: Annotated[list[str], typer.Option(help="ARM=WEIGHT, e.g. treatment=20.")]
) -> None:
    """Change the split; only the users the change needs move."""
    from gateway.experiments import ExperimentStore

    try:
        parsed = {arm: float(value) for arm, _, value in (spec.partition("=") for spec in weight)}
    except ValueError as exc:
        raise fail(f"--weight must be ARM=NUMBER, not {weight}") from exc
    changed = with_state_and_records(
        lambda state, records: ExperimentStore(state, records).set_weights(tenant, name, parsed, who("cli:experiments"))
    )
    typer.echo(", ".join(f"{a.name} {a.weight:g}" for a in changed.arms))


def _status(name: str, tenant: str, status: Any, arm: str | None = None) -> None:
    from adapters.registry import Registry
    from gateway import version_guard
    from gateway.experiments import ExperimentStore
    from gateway.pointers import PointerStore
    from gateway.routing import Router
    from gateway.settings import Settings

    settings = Settings()

    async def change(state: Any, records: Any) -> Any:
        experiments, registry = ExperimentStore(state, records), Registry(settings.adapter_root)
        router = Router(settings.served_model_name, registry, PointerStore(state), experiments)
        try:
            return await version_guard.set_status(router, tenant, name, status, who("cli:experiments"), arm)
        except version_guard.TargetMissing as exc:
            raise ValueError(
                f"`{exc.target}` does not exist any more, so the alias cannot point at it: promote an arm whose "
                "version exists, or stop the experiment (the alias then serves control)"
            ) from exc

    changed = with_state_and_records(change)
    typer.echo(f"{name}: {changed.status}")


@experiments_app.command("pause")
def pause(name: str, tenant: Tenant) -> None:
    """Send every request to control until `resume`."""
    _status(name, tenant, "paused")


@experiments_app.command("resume")
def resume(name: str, tenant: Tenant) -> None:
    """Split again after a pause."""
    _status(name, tenant, "running")


@experiments_app.command("stop")
def stop(name: str, tenant: Tenant) -> None:
    """End the experiment: the alias serves control."""
    _status(name, tenant, "stopped")


@experiments_app.command("promote")
def promote(name: str, tenant: Tenant, arm: Annotated[str, typer.Option(help="The arm that won.")]) -> None:
    """Point the alias at ARM's version; the experiment ends."""
    _status(name, tenant, "promoted", arm)


@experiments_app.command("rollback")
def rollback(name: str, tenant: Tenant) -> None:
    """Point the alias back at what it served before the experiment; the experiment ends."""
    _status(name, tenant, "rolled back")


def parse_arm(spec: str) -> Arm:
    """`name=target:weight` (--arm)."""
    from gateway.experiments import Arm, InvalidExperiment

    name, _, rest = spec.partition("=")
    target, _, weight = rest.rpartition(":")
    try:
        return Arm(name=name, target=target, weight=float(weight))
    except ValueError as exc:
        raise InvalidExperiment(
            f"--arm must be NAME=TARGET:WEIGHT (e.g. treatment=support-bot@2:10), not {spec!r}"
        ) from exc
