"""One retraining run: dataset → fit → eval → publish (and canary), all at once or one step at a time.

A run lives in a folder (`HOME/training/TENANT/RUN`): its state (`run.json`: the config, what each
step found), the dataset (`data/`), the training run and adapter (`fit/`), the eval report (`eval/`).
Each step reads what the previous ones wrote, so `loragate train dataset|fit|eval|publish` can run
them apart, resume a run, or redo a step; `retrain` runs the steps not done yet.

Nothing is half-published: the candidate is an unlisted version until the gate passes, and a run that
fails after staging it removes it (training.publish). The eval asks the candidate through the real
gateway with a short-lived `training` key of the tenant, revoked when the eval ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from adapters.registry import Registry
from adapters.validate import BaseModelSpec
from gateway import version_guard
from gateway.apikeys import KeyStore
from gateway.experiments import ExperimentStore
from gateway.pointers import PointerStore
from gateway.routing import Router
from gateway.settings import Settings
from gateway.tenants import Tenant, TenantNotFound, TenantStore
from training import dataset, eval_report, evaluate, publish, sources, train
from training.config import RetrainConfig

STEPS = ("dataset", "fit", "eval", "publish")
KEY_LIFETIME_S = 2 * 3600.0
OWNER_CHECK_S = 3.0
"""How long a failing run waits for Redis to say whether its tenant is still there."""
Progress = Callable[[str], None]


class RunState(BaseModel):
    """What a run was asked and what each of its steps found (run.json)."""

    run_id: str
    tenant: str
    alias: str
    config: dict[str, Any]
    created: float = Field(default_factory=time.time)
    tenant_created: float | None = None
    """When the tenant was created, as the run's creation (or else its dataset step) found it: a tenant deleted and
    created again under its name is another, and gets nothing of this run (None: a run.json from before this field)."""
    done: list[str] = Field(default_factory=list)
    serving: dict[str, Any] | None = None
    data_card: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    candidate: str | None = None
    """The staged version (`name@V`), unlisted until published."""
    eval: dict[str, Any] | None = None
    published: str | None = None
    canary: str | None = None
    error: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    """Wall time of each step done."""


@dataclass(frozen=True)
class Stack:
    """Where a run reads and writes: the gateway's settings, its Redis servers and its URL."""

    settings: Settings
    state: aioredis.Redis
    records: aioredis.Redis
    gateway_url: str

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.adapter_root)


class Run:
    def __init__(self, folder: Path, state: RunState) -> None:
        self.folder = folder
        self.state = state

    @classmethod
    def create(
        cls, root: Path, tenant: str, alias: str, config: RetrainConfig, tenant_created: float | None = None
    ) -> Run:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = root / tenant / run_id
        folder.mkdir(parents=True)
        state = RunState(
            run_id=run_id, tenant=tenant, alias=alias, config=config.to_dict(), tenant_created=tenant_created
        )
        run = cls(folder, state)
        run.save()
        return run

    @classmethod
    def load(cls, folder: Path) -> Run:
        return cls(folder, RunState.model_validate_json((folder / "run.json").read_text()))

    @property
    def config(self) -> RetrainConfig:
        return RetrainConfig(**self.state.config)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def fit_dir(self) -> Path:
        return self.folder / "fit"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"

    def save(self) -> None:
        scratch = self.folder / ".run.json.tmp"
        scratch.write_text(self.state.model_dump_json(indent=2))
        scratch.replace(self.folder / "run.json")

    def require(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.state.done]
        if missing:
            raise publish.RetrainRefused(f"Run {self.state.run_id} has not done {', '.join(missing)} yet.")


def _base_dir(settings: Settings) -> Path:
    from gateway.cli.serve import base_folder

    return base_folder(settings)


async def build_dataset(run: Run, stack: Stack, progress: Progress) -> dataset.DataCard:
    started = time.monotonic()
    state, config = run.state, run.config
    before = await publish.serving(PointerStore(stack.state), ExperimentStore(stack.state), state.tenant, state.alias)
    progress(f"alias {state.alias} serves {before.target}; reading its feedback")
    tenant = await _owner(run, stack)  # tenants live in the state Redis
    policy, state.tenant_created = tenant.logging, tenant.created
    loaded = await sources.collect(stack.records, state.tenant, config, alias=state.alias, policy=policy)
    built = await asyncio.to_thread(dataset.build, loaded, config)
    card = await asyncio.to_thread(dataset.write, built, run.data)
    await _owner(run, stack)  # deleted meanwhile: the copy of its log goes too
    state.serving, state.data_card = asdict(before), card.to_dict()
    _done(run, "dataset", started)
    progress(f"dataset {card.dataset_hash[:12]}: {card.splits}")
    return card


async def fit(run: Run, stack: Stack, progress: Progress, resume: bool = False) -> train.TrainResult:
    started = time.monotonic()
    run.require("dataset")
    await _owner(run, stack)
    base_dir = await asyncio.to_thread(_base_dir, stack.settings)
    result = await asyncio.to_thread(
        train.train, run.config, run.data, base_dir, run.fit_dir,
        max_rank=stack.settings.max_lora_rank, resume=resume, progress=progress,
    )  # fmt: skip
    await _owner(run, stack)  # deleted while it trained: the weights go too
    run.state.train = _train_summary(result)
    _done(run, "fit", started)
    return result


def _train_summary(result: train.TrainResult) -> dict[str, Any]:
    return {**result.to_dict(), "precision": f"{result.device} {result.dtype}" + (" QLoRA" if result.qlora else "")}


def _provenance(run: Run, base: str) -> dict[str, Any]:
    state = run.state
    assert state.data_card is not None and state.serving is not None
    return {
        "run": state.run_id,
        "dataset_hash": state.data_card["dataset_hash"],
        "config": state.config,
        "base": base,
        "parent": state.serving["parent"],
        "training": state.train,
    }


async def _owner(run: Run, stack: Stack) -> Tenant:
    """The run's tenant, refused (TenantGone) if it was deleted since the run began, or created again: another."""
    tenant = await _current(run, stack)
    if tenant is None:
        raise await _gone(run)
    return tenant


async def _current(run: Run, stack: Stack) -> Tenant | None:
    return await version_guard.same_tenant(TenantStore(stack.state), run.state.tenant, run.state.tenant_created)


async def _gone(run: Run) -> TenantGone:
    """The refusal of a run whose tenant is gone, once its folder is removed (a step may have written into it
    again since the deletion removed it): shielded, so that a cancellation does not leave it half removed."""
    await asyncio.shield(asyncio.to_thread(shutil.rmtree, run.folder, True))
    return _tenant_gone(run.state)


class TenantGone(publish.RetrainRefused):
    """The run's tenant was deleted after the run began: the run ends, its folder removed (`_owner`)."""


def _tenant_gone(state: RunState) -> TenantGone:
    return TenantGone(f"Tenant {state.tenant} was deleted after run {state.run_id} began.")


async def stage_candidate(run: Run, stack: Stack, progress: Progress) -> str:
    """The trained adapter as an unlisted version of the adapter the alias serves."""
    run.require("fit")
    state, settings = run.state, stack.settings
    assert state.serving is not None and state.train is not None
    owner, store = await _owner(run, stack), stack.registry.store(state.tenant)
    spec = await asyncio.to_thread(lambda: BaseModelSpec.from_folder(_base_dir(settings), settings.served_model_name))
    staged = await asyncio.to_thread(
        publish.stage, store, Path(state.train["adapter_dir"]),
        state.serving["adapter_name"], spec, settings.max_lora_rank, _provenance(run, settings.served_model_name),
    )  # fmt: skip
    try:
        await version_guard.keep_if_still_owned(TenantStore(stack.state), store, owner, staged)
    except TenantNotFound as exc:
        raise _tenant_gone(state) from exc
    state.candidate = staged.ref
    run.save()
    progress(f"candidate {staged.ref} staged (unlisted)")
    return staged.ref


async def evaluate_candidate(run: Run, stack: Stack, progress: Progress) -> evaluate.EvalReport:
    """The eval gate on the test split, through the gateway and vLLM, with a training key."""
    started = time.monotonic()
    import openai

    state, config = run.state, run.config
    await _owner(run, stack)  # its training key must not go to a tenant created again under its name
    candidate = state.candidate or await stage_candidate(run, stack, progress)
    assert state.serving is not None
    base = stack.settings.served_model_name
    current = state.serving["target"] if state.serving["target"] != base else None
    rows = await asyncio.to_thread(evaluate.load_rows, run.data / dataset.EVAL_FILE)
    regression = await asyncio.to_thread(evaluate.load_rows, config.regression_jsonl) if config.regression_jsonl else []
    apikeys = KeyStore(stack.state)
    key, info = await apikeys.create(state.tenant, "training", f"retrain {state.run_id}", KEY_LIFETIME_S)
    try:
        async with openai.AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=2) as client:
            report = await evaluate.evaluate(
                client, rows, config, candidate=candidate, base=base, current=current, regression_rows=regression,
                concurrency=config.eval_concurrency,
                progress=lambda what, done, total: progress(f"eval {what}: {done}/{total}") if done == total else None,
            )  # fmt: skip
    finally:
        await apikeys.revoke(info.id)
    await asyncio.to_thread(eval_report.write_report, report, run.eval_dir)
    state.eval = {"publish": report.decision.publish, "reasons": report.decision.reasons}
    state.eval["table"] = eval_report.markdown_table(report)
    state.eval["scores"] = json.loads(report.model_dump_json(include={"candidate", "current", "base", "regression"}))
    _done(run, "eval", started)
    return report


async def publish_candidate(run: Run, stack: Stack, progress: Progress, by: str) -> str | None:
    """Publish a candidate that passed (and start its canary), or remove one that did not."""
    started = time.monotonic()
    run.require("eval")
    state, config = run.state, run.config
    assert state.eval is not None and state.candidate is not None and state.serving is not None
    await _owner(run, stack)
    store = stack.registry.store(state.tenant)
    name, version = state.candidate.split("@")
    candidate = await asyncio.to_thread(store.manifest, name, int(version))
    if not state.eval["publish"]:
        await asyncio.to_thread(publish.discard, store, candidate)
        progress(f"{state.candidate} not published: " + "; ".join(state.eval["reasons"]))
        _done(run, "publish", started)
        return None
    before = publish.Serving(**state.serving)
    canary_name = f"retrain-{state.run_id}"
    experiment = publish.canary(state.tenant, before, candidate.ref, config, canary_name) if config.canary else None
    provenance = {"metrics": state.eval["scores"], "decision": state.eval["reasons"]}
    published = await asyncio.to_thread(publish.publish, store, candidate, provenance)
    state.published = published.ref
    run.save()
    progress(f"published {published.ref}")
    if experiment is not None:
        experiments = ExperimentStore(stack.state)
        router = Router(stack.settings.served_model_name, stack.registry, PointerStore(stack.state), experiments)
        await publish.start_canary(stack.state, router, experiment, published, by)
        state.canary = canary_name
        progress(f"canary {canary_name}: {before.target} {100 - config.canary_weight:g} / {published.ref} "
                 f"{config.canary_weight:g} on alias {state.alias}")  # fmt: skip
    _done(run, "publish", started)
    return published.ref


def _done(run: Run, step: str, started: float) -> None:
    if step not in run.state.done:
        run.state.done.append(step)
    run.state.seconds[step] = round(time.monotonic() - started, 2)
    run.save()


async def retrain(run: Run, stack: Stack, progress: Progress, by: str = "retraining") -> RunState:
    """Every step not done yet, in order. On failure, a staged candidate is removed (nothing is
    half-published), the error is kept in run.json, and the exception propagates."""
    try:
        if "dataset" not in run.state.done:
            await build_dataset(run, stack, progress)
        if "fit" not in run.state.done:
            await fit(run, stack, progress, resume=(run.fit_dir / "checkpoints").is_dir())
        if "eval" not in run.state.done:
            await evaluate_candidate(run, stack, progress)
        if "publish" not in run.state.done:
            await publish_candidate(run, stack, progress, by)
    except BaseException as exc:
        gone = await asyncio.shield(_abandon(run, stack, exc))
        if gone is not None and gone is not exc and isinstance(exc, Exception):
            raise gone from exc  # e.g. a file error of a step whose folder the tenant's deletion removed
        raise
    return run.state


async def _abandon(run: Run, stack: Stack, exc: BaseException) -> TenantGone | None:
    """Remove a staged candidate and keep the error in run.json; when the tenant is gone, the refusal that says
    so (its folder is gone with it: `_owner` removed it). The candidate goes first: a SIGTERM's grace is short,
    and the check asks Redis (for OWNER_CHECK_S at most)."""
    state = run.state
    if state.candidate and not state.published:
        name, version = state.candidate.split("@")
        store = stack.registry.store(state.tenant)
        try:
            candidate = await asyncio.to_thread(store.manifest, name, int(version))
            await asyncio.to_thread(publish.discard, store, candidate)
        except Exception:  # noqa: BLE001 - already failing; the original error matters more
            pass
        state.candidate = None
    if isinstance(exc, TenantGone):
        return exc
    try:
        if await asyncio.wait_for(_current(run, stack), OWNER_CHECK_S) is None:
            return await _gone(run)
    except Exception:  # noqa: BLE001 - Redis away or slow: the original error matters more
        pass
    state.error = f"{type(exc).__name__}: {exc}"
    if run.folder.is_dir():
        with contextlib.suppress(OSError):  # removed meanwhile (its tenant deleted): the original error stands
            run.save()
    return None
