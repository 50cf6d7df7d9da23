"""One retraining run: dataset → fit → eval → publish (and canary), all at once or one step at a time.

Each step reads what the previous ones wrote in the run's folder (training.run), so `loragate train
dataset|fit|eval|publish` can run them apart, resume a run, or redo a step; `retrain` runs the steps not done yet.

Nothing is half-published: the candidate is an unlisted version until the gate passes, and a run that
fails after staging it removes it (training.publish). The eval asks the candidate through the real
gateway with a short-lived `training` key of the tenant, revoked when the eval ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from adapters import base_model
from adapters.manifest import Manifest
from adapters.validate import BaseModelSpec
from gateway import version_guard
from gateway.apikeys import KeyStore
from gateway.experiments import ExperimentConflict, ExperimentStore, TooManyExperiments
from gateway.pointers import PointerStore
from gateway.routing import Router
from gateway.settings import Settings
from gateway.tenants import Tenant, TenantNotFound, TenantStore
from training import dataset, eval_report, evaluate, publish, sources, train
from training.run import Run, RunState, Stack  # Run and Stack: callers import them from here too

STEPS = ("dataset", "fit", "eval", "publish")
KEY_LIFETIME_S = 2 * 3600.0
OWNER_CHECK_S = 3.0
"""How long a failing run waits for Redis to say whether its tenant is still there."""
Progress = Callable[[str], None]
T = TypeVar("T")


def _base_dir(settings: Settings, progress: Progress) -> Path:
    """The unquantised base the candidate is trained on and validated against (the default model prepared on first
    use, as the gateway prepares it)."""
    return settings.model_dir if settings.model_dir is not None else base_model.prepare(settings.models_root, progress)


async def build_dataset(run: Run, stack: Stack, progress: Progress) -> dataset.DataCard:
    started = time.monotonic()
    state, config = run.state, run.config
    by = f"retraining run {state.run_id}"
    before = await publish.serving(
        PointerStore(stack.state), ExperimentStore(stack.state), state.tenant, state.alias, by
    )
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
    _not_published(run, "fit")
    if run.state.candidate:  # the eval and publish steps would go on with it, not with the new weights
        raise publish.RetrainRefused(
            f"Run {run.state.run_id} has staged {run.state.candidate} from its fit: its fit step is not run again; "
            "start another run."
        )
    await _owner(run, stack)
    base_dir = await asyncio.to_thread(_base_dir, stack.settings, progress)
    stop = threading.Event()
    result = await _in_thread(functools.partial(
        train.train, run.config, run.data, base_dir, run.fit_dir,
        max_rank=stack.settings.max_lora_rank, resume=resume, progress=progress, stop=stop,
    ), stop=stop)  # fmt: skip
    await _owner(run, stack)  # deleted while it trained: the weights go too
    run.state.train = _train_summary(result)
    _done(run, "fit", started)
    return result


async def _in_thread(
    call: Callable[[], T], stop: threading.Event | None = None, undo: Callable[[T], None] | None = None
) -> T:
    """`call()` in a worker thread, which a cancellation (SIGTERM, Ctrl-C) cannot stop: cancelled, this sets `stop`
    (training checks it at each step's end), waits for the thread to end, undoes what it made (`undo`: a version
    it staged), and only then lets the cancellation through. Without the wait the thread would go on after the step
    said it stopped, and asyncio.run would wait for it at exit, past a SIGTERM's grace."""
    work = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        await asyncio.wait([work])
        if not work.cancelled() and work.exception() is None and undo is not None:  # retrieves its error too
            await asyncio.to_thread(undo, work.result())
        raise


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
    base_dir = await asyncio.to_thread(_base_dir, settings, progress)
    spec = await asyncio.to_thread(BaseModelSpec.from_folder, base_dir, settings.served_model_name)
    staged = await _in_thread(functools.partial(
        publish.stage, store, Path(state.train["adapter_dir"]),
        state.serving["adapter_name"], spec, settings.max_lora_rank, _provenance(run, settings.served_model_name),
    ), undo=functools.partial(publish.discard, store))  # fmt: skip
    try:
        tenants = TenantStore(stack.state)
        wait_s = version_guard.HOLD_S + version_guard.WAIT_S  # a run's training is not given up for a busy name
        await version_guard.publish_unaliased(stack.state, tenants, store, owner, staged, publish=False, wait_s=wait_s)
    except TenantNotFound as exc:
        raise _tenant_gone(state) from exc
    except version_guard.NameTaken as exc:
        raise publish.RetrainRefused(publish.alias_named(state.tenant, staged.name, state.serving["alias"])) from exc
    state.candidate = staged.ref
    run.save()
    progress(f"candidate {staged.ref} staged (unlisted)")
    return staged.ref


async def evaluate_candidate(run: Run, stack: Stack, progress: Progress) -> evaluate.EvalReport:
    """The eval gate on the test split, through the gateway and vLLM, with a training key."""
    started = time.monotonic()
    import openai

    state, config = run.state, run.config
    _not_published(run, "eval")
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
                progress=eval_report.each_tenth(progress),
            )  # fmt: skip
    finally:
        await apikeys.revoke(info.id)
    for what, scores in (("candidate", report.candidate), ("current", report.current), ("base", report.base)):
        if scores is not None and scores.errors:
            progress(f"eval {what}: {scores.errors} of {scores.n} answers failed (first: {scores.first_error})")
    await asyncio.to_thread(eval_report.write_report, report, run.eval_dir)
    decision = report.decision
    state.eval = {"publish": decision.publish, "reasons": decision.reasons, "unjudged": decision.unjudged}
    state.eval["table"] = eval_report.markdown_table(report)
    state.eval["scores"] = json.loads(report.model_dump_json(include={"candidate", "current", "base", "regression"}))
    if decision.unjudged:  # not done: the candidate was neither passed nor failed (nor by an eval asked before)
        state.done = [step for step in state.done if step != "eval"]
        run.save()
        raise publish.RetrainRefused(
            f"No verdict on {candidate}: " + "; ".join(decision.reasons) + f". Nothing was published; once "
            f"{current or base} answers, `loragate train eval --run {run.folder}` asks again."
        )
    _done(run, "eval", started)
    return report


async def publish_candidate(run: Run, stack: Stack, progress: Progress, by: str) -> str | None:
    """Publish a candidate that passed (and start its canary), or remove one that did not. Asked again after a
    failure, it goes on from where that stopped: a version listed already is not listed again."""
    started = time.monotonic()
    run.require("eval")
    state, config = run.state, run.config
    _can_publish(run)
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
    pointers, experiments = PointerStore(stack.state), ExperimentStore(stack.state)
    if config.canary and candidate.listed and await publish.canary_started(experiments, state.tenant, run.canary_name):
        state.published, state.canary = candidate.ref, run.canary_name  # started by a try that failed before saying so
    else:
        before, listed = publish.Serving(**state.serving), candidate.ref if candidate.listed else None
        alias_now = await publish.still_serving(pointers, experiments, state.tenant, before, listed)
        published = await _when_free(lambda: _listed(run, stack, pointers, candidate, progress), progress)
        if config.canary:
            stores = (pointers, experiments)
            await _when_free(lambda: _start_canary(run, stack, stores, published, by, progress, alias_now), progress)
        else:
            ref = published.ref
            progress(f"canary off: nothing routes to {ref} (`loragate aliases set {state.alias} {ref}` does)")
    _done(run, "publish", started)
    return state.published


async def _when_free(step: Callable[[], Awaitable[T]], progress: Progress) -> T:
    """A step that takes an adapter's lock (gateway.version_guard), tried again while another change holds it:
    held past WAIT_S, it is held by a process that died (a lock frees itself after HOLD_S). A run's training is
    not given up for that."""
    deadline = time.monotonic() + version_guard.HOLD_S + version_guard.WAIT_S
    while True:
        try:
            return await step()
        except version_guard.AdapterBusy as exc:
            if time.monotonic() >= deadline:
                raise
            progress(f"{exc} Waiting for it.")


def _not_published(run: Run, step: str) -> None:
    """A step before publish, asked again on a run that published (or decided not to): refused, not run again (a fit
    overwrote the adapter and the training summary a published version's provenance points at)."""
    if "publish" in run.state.done:
        raise publish.RetrainRefused(
            f"Run {run.state.run_id} has done its publish step already; its {step} step is not run again: start "
            "another run."
        )


def _can_publish(run: Run) -> None:
    """Refuse a publish step that has nothing (more) to do, saying what was done."""
    state = run.state
    if "publish" in state.done:
        what = f"published {state.published}" if state.published else "its candidate was not published"
        raise publish.RetrainRefused(f"Run {state.run_id} has done its publish step already: {what}.")
    if state.candidate is None:
        raise publish.RetrainRefused(
            f"Run {state.run_id} has no candidate any more (a failure removed it): `loragate train eval --run "
            f"{run.folder}` stages and evaluates it again."
        )


async def _listed(run: Run, stack: Stack, pointers: PointerStore, candidate: Manifest, progress: Progress) -> Manifest:
    """The candidate listed, its bare name first pinned to what it serves now (publish.hold_bare_name). Listed
    already by an earlier try (which pinned the name before listing it, and whose canary did not start), it is
    not listed again."""
    state, store = run.state, stack.registry.store(run.state.tenant)
    if not candidate.listed:

        def intend(now: Manifest) -> None:  # recorded before the write: a pin whose reply is lost is the run's too
            state.pinned = now.ref
            run.save()

        earlier = state.pinned
        held = await publish.hold_bare_name(pointers, store, state.tenant, candidate.name, intend)
        if held is None and state.pinned != earlier:  # an operator's pin came first
            state.pinned = earlier
            run.save()
        if held is not None:
            progress(f"`{candidate.name}` pinned to {held.ref}: its callers keep it (`loragate adapters pin` moves it)")
            # Gateways see a pin at their next state poll, a listing at their next look in the store: wait.
            await asyncio.sleep(2 * stack.settings.state_poll_s)
        assert state.eval is not None
        provenance = {"metrics": state.eval["scores"], "decision": state.eval["reasons"]}
        candidate = await _in_thread(functools.partial(publish.publish, store, candidate, provenance))
    state.published = candidate.ref
    run.save()
    progress(f"published {candidate.ref}")
    return candidate


async def _start_canary(
    run: Run,
    stack: Stack,
    stores: tuple[PointerStore, ExperimentStore],
    published: Manifest,
    by: str,
    progress: Progress,
    alias_now: str,
) -> None:
    """The canary, started only while the alias still points at `alias_now` (what `still_serving` found)."""
    state, config = run.state, run.config
    assert state.serving is not None
    before, name = publish.Serving(**state.serving), run.canary_name
    experiment = publish.canary(state.tenant, before, published.ref, config, name)
    router = Router(stack.settings.served_model_name, stack.registry, *stores)
    try:
        await publish.start_canary(stack.state, router, experiment, published, by, alias_now)
    except (ExperimentConflict, TooManyExperiments) as exc:  # the alias moved since `still_serving` (it stays where
        moved = isinstance(exc, ExperimentConflict)  # it was moved), or the tenant runs the most experiments it may
        then = f"Point alias `{state.alias}` at {before.target} again and" if moved else "Then"
        raise publish.RetrainRefused(
            f"{published.ref} is listed (its bare name pinned to what it served) but its canary did not start: "
            f"{exc} {then} `train publish --run` starts it."
        ) from exc
    state.canary = name
    run.save()
    progress(f"canary {name}: {before.target} {100 - config.canary_weight:g} / {published.ref} "
             f"{config.canary_weight:g} on alias {state.alias}")  # fmt: skip


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
    """Remove a staged candidate (and the pin held for it) and keep the error in run.json; when the tenant is gone,
    the refusal that says so (its folder is gone with it: `_owner` removed it). The candidate goes first: a
    SIGTERM's grace is short, and the checks ask Redis (for OWNER_CHECK_S at most each)."""
    state = run.state
    if state.candidate and not state.published:
        name, version = state.candidate.split("@")
        store = stack.registry.store(state.tenant)
        try:
            candidate = await asyncio.to_thread(store.manifest, name, int(version))
            if candidate.listed:  # listed as its step was stopped: `train publish --run` goes on to the canary
                state.published = candidate.ref
            else:
                await asyncio.to_thread(publish.discard, store, candidate)
        except Exception:  # noqa: BLE001 - already failing; the original error matters more
            pass
        with contextlib.suppress(Exception):  # the store unreadable: the original error matters more
            if not state.published and int(version) not in await asyncio.to_thread(store.versions, name):
                state.candidate = None  # forgotten only once gone (a removal that failed half-way is gone too)
    if isinstance(exc, TenantGone):
        return exc
    try:
        if await asyncio.wait_for(_current(run, stack), OWNER_CHECK_S) is None:
            return await _gone(run)
    except Exception:  # noqa: BLE001 - Redis away or slow: the original error matters more
        pass
    if state.pinned and not state.published:  # its pin held a name for a candidate that was not listed
        with contextlib.suppress(Exception):  # Redis away: the pin stays (a name pinned where it served)
            pointers, store = PointerStore(stack.state), stack.registry.store(state.tenant)
            released = publish.release_bare_name(pointers, store, state.tenant, state.pinned)
            await asyncio.wait_for(released, OWNER_CHECK_S)
            state.pinned = None
    stopped = isinstance(exc, asyncio.CancelledError)
    why = str(exc.args[0]) if stopped and exc.args else "SIGTERM or Ctrl-C"  # a lost lease says so (training.lease)
    state.error = f"stopped ({why})" if stopped else f"{type(exc).__name__}: {exc}"
    if run.folder.is_dir():
        with contextlib.suppress(OSError):  # removed meanwhile (its tenant deleted): the original error stands
            run.save()
    return None
