"""A retraining run's eval and publish steps against real Redis and a real adapter store (no gateway, no vLLM): what
publishing changes for whom, what it refuses, and how it goes on after a failure."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from adapters import store as store_module
from adapters.registry import Registry
from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway import keys, version_guard
from gateway.experiments import ExperimentStore
from gateway.pointers import PointerStore
from gateway.routing import Router
from gateway.settings import Settings
from gateway.tenants import TenantStore
from tests.conftest import RedisServer, sync_redis_client
from training import evaluate, publish
from training import train as training_module
from training.config import RetrainConfig
from training.publish import RetrainRefused
from training.retrain import Run, Stack, evaluate_candidate, fit, publish_candidate, retrain, stage_candidate
from training.train import TrainingStopped

TENANT = "acme"


@dataclass
class World:
    redis: aioredis.Redis
    stack: Stack
    store: AdapterStore
    folder: Path
    base: BaseModelSpec

    async def served(self, model: str, tenant: str = TENANT) -> str:
        """What a request for `model` by `tenant` gets now, as a gateway process with empty caches routes it."""
        pointers, experiments = PointerStore(self.redis), ExperimentStore(self.redis)
        router = Router(self.base.name, Registry(self.stack.settings.adapter_root), pointers, experiments)
        return (await router.resolve(model, tenant, user="u1")).served_model

    async def run(self, alias: str = "bot", **config: Any) -> Run:
        """A run whose eval passed, its candidate staged as the next version of what `alias` serves."""
        created = (await TenantStore(self.redis).get(TENANT)).created
        run = Run.create(self.stack.settings.training_root, TENANT, alias, RetrainConfig(**config), created)
        before = await publish.serving(PointerStore(self.redis), ExperimentStore(self.redis), TENANT, alias)
        staged = self.store.add(
            self.folder, before.adapter_name, self.base, 16, listed=False, provenance={"run": run.state.run_id}
        )
        run.state.done, run.state.serving, run.state.candidate = ["dataset", "fit", "eval"], asdict(before), staged.ref
        run.state.eval = {"publish": True, "reasons": ["format 0.9 >= current 0.1 + margin 0.05"], "scores": {}}
        run.save()
        return run


@pytest.fixture
async def world(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path, base: BaseModelSpec, tiny_base_dir: Path
) -> AsyncIterator[World]:
    """acme's alias `bot` serves helper@1 (listed; `helper` unpinned, and shared with tenant `friend`)."""
    settings = Settings(
        home=tmp_path,
        redis_url=redis_server.url,
        served_model_name=base.name,
        model_dir=tiny_base_dir,
        state_poll_s=0.01,
    )
    await TenantStore(redis).create(TENANT)
    await TenantStore(redis).create("friend")
    folder = make_adapter(tmp_path / "adapter", base, seed=5)
    store = Registry(settings.adapter_root).store(TENANT)
    store.add(folder, "helper", base, 16)
    await PointerStore(redis).set_alias(TENANT, "bot", "helper@1")
    await PointerStore(redis).share(TENANT, "helper", ["friend"])
    yield World(redis, Stack(settings, redis, redis, "http://127.0.0.1:9"), store, folder, base)


def quiet(_: str) -> None:
    pass


async def test_publishing_changes_nothing_for_callers_of_the_bare_name(world: World) -> None:
    """Listed, the candidate is helper's latest version: unpinned callers of `helper` (and the tenants it is shared
    with) would get it at once, at 100%, whatever the canary's split. The run pins `helper` to what it served."""
    run = await world.run(canary_weight=50)
    assert await publish_candidate(run, world.stack, quiet, "test") == "helper@2"
    assert (await PointerStore(world.redis).of(TENANT)).pins == {"helper": 1}
    assert run.state.pinned == "helper@1" and run.state.canary == f"retrain-{run.state.run_id}"
    assert await world.served("helper") == "helper@1" and await world.served("acme/helper", "friend") == "acme/helper@1"
    assert await world.served("helper@2") == "helper@2", "published: callable by its exact name"
    canary = await ExperimentStore(world.redis).get(TENANT, run.state.canary)
    assert [(arm.target, arm.weight) for arm in canary.arms] == [("helper@1", 50), ("helper@2", 50)]
    await ExperimentStore(world.redis).set_status(TENANT, canary.name, "rolled back", "test")
    assert await world.served("helper") == "helper@1" and await world.served("bot") == "helper@1"
    pins = (await PointerStore(world.redis).of(TENANT)).pins
    assert pins == {"helper": 1}, "a roll-back leaves the pin on the parent"


async def test_a_pin_that_holds_is_kept_and_a_new_name_needs_none(world: World) -> None:
    world.store.add(world.folder, "helper", world.base, 16)  # helper@2, listed: the bare name's latest
    await PointerStore(world.redis).pin(TENANT, "helper", 1)
    run = await world.run(canary=False)
    assert await publish_candidate(run, world.stack, quiet, "test") == "helper@3"
    assert (await PointerStore(world.redis).of(TENANT)).pins == {"helper": 1} and run.state.pinned is None
    await PointerStore(world.redis).set_alias(TENANT, "plain", world.base.name)
    fresh = await world.run(alias="plain", canary=False)
    assert await publish_candidate(fresh, world.stack, quiet, "test") == "plain-tuned@1"
    assert "plain-tuned" not in (await PointerStore(world.redis).of(TENANT)).pins, "no version served before it"


async def test_an_unpinned_name_stays_on_its_latest_not_on_the_aliass_version(world: World) -> None:
    world.store.add(world.folder, "helper", world.base, 16)  # helper@2: bare `helper` serves it; the alias, helper@1
    run, lines = await world.run(canary=False), []
    assert await publish_candidate(run, world.stack, lines.append, "test") == "helper@3"
    assert run.state.pinned == "helper@2" and await world.served("helper") == "helper@2"
    assert any(line.startswith("canary off: nothing routes to helper@3") for line in lines), lines


async def test_a_pin_an_operator_sets_while_the_run_reads_it_is_kept(
    world: World, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """The operator pins `helper` between the run's read of its pin and the run's write: theirs holds (read again,
    it holds the name already), and the run records no pin of its own."""
    world.store.add(world.folder, "helper", world.base, 16)  # helper@2: the bare name's latest
    real = world.store.resolve

    def operator_pins_meanwhile(*args: Any, **kwargs: Any) -> Any:
        with sync_redis_client(redis_server.url) as client:
            client.hset(keys.pins(TENANT), "helper", 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(world.store, "resolve", operator_pins_meanwhile)
    assert await publish.hold_bare_name(PointerStore(world.redis), world.store, TENANT, "helper") is None
    assert await world.redis.hget(keys.pins(TENANT), "helper") == "1", "not overwritten with helper@2"


async def test_the_run_pins_under_the_adapters_lock(
    world: World, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """As the admin API and the CLI do: a delete of the version it pins (holding the lock) cannot come between the
    run's read and its pin. The lock held elsewhere past WAIT_S: refused, nothing pinned."""
    monkeypatch.setattr(version_guard, "WAIT_S", 0.2)
    held = sync_redis_client(redis_server.url).lock(keys.adapter_lock(TENANT, "helper"), timeout=30)
    assert held.acquire(blocking=False)  # a delete of helper@1 in flight
    try:
        with pytest.raises(version_guard.AdapterBusy):
            await publish.hold_bare_name(PointerStore(world.redis), world.store, TENANT, "helper")
    finally:
        held.release()
    assert await world.redis.hget(keys.pins(TENANT), "helper") is None
    assert (await publish.hold_bare_name(PointerStore(world.redis), world.store, TENANT, "helper")).version == 1


async def test_a_publish_step_waits_out_a_lock_held_past_wait_s(
    world: World, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """The adapter's lock held past WAIT_S (by a process that died holding it, until it frees itself): the step
    says so and tries again, rather than throwing its run's training away; its candidate is published."""
    monkeypatch.setattr(version_guard, "WAIT_S", 0.2)
    said: list[str] = []
    run = await world.run(canary_weight=50)  # first: under load it took longer than the lock below lives
    held = sync_redis_client(redis_server.url).lock(keys.adapter_lock(TENANT, "helper"), timeout=3)
    assert held.acquire(blocking=False)  # expires by itself, as HOLD_S does: 3 s, past WAIT_S however slow the step
    assert await publish_candidate(run, world.stack, said.append, "test") == "helper@2"
    assert any("Another change to `helper` is in progress" in line for line in said), said
    assert run.state.canary == f"retrain-{run.state.run_id}" and run.state.pinned == "helper@1"


@pytest.mark.parametrize("moved", [False, True], ids=["still-the-runs", "moved-by-an-operator"])
async def test_a_run_failing_before_its_candidate_is_listed_releases_its_pin(
    world: World, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, moved: bool
) -> None:
    """The run pins `helper` to what it serves (helper@2), then listing fails: the candidate is removed, and so is
    the pin, which held the name for a version no caller gets; a pin an operator moved meanwhile stays theirs."""
    world.store.add(world.folder, "helper", world.base, 16)  # helper@2, listed; the candidate is helper@3
    run = await world.run()

    def listing_fails(*args: Any, **kwargs: Any) -> Any:
        if moved:
            with sync_redis_client(redis_server.url) as client:
                client.hset(keys.pins(TENANT), "helper", 1)
        raise OSError("No space left on device")

    monkeypatch.setattr(publish, "publish", listing_fails)
    with pytest.raises(OSError, match="No space left"):
        await retrain(run, world.stack, quiet)
    assert run.state.pinned is None and run.state.candidate is None and world.store.versions("helper") == [1, 2]
    assert await world.redis.hget(keys.pins(TENANT), "helper") == ("1" if moved else None)


async def test_a_failing_run_keeps_the_pin_that_holds_another_runs_candidate_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs on `helper`: this one pinned it to helper@1, the other lists its own candidate (helper@3) behind that
    pin; this one then fails before listing. Unpinning would give every caller of `helper` the other candidate at
    100%: the pin stays."""
    run = await world.run()

    def another_run_lists_then_this_listing_fails(*args: Any, **kwargs: Any) -> Any:
        world.store.add(world.folder, "helper", world.base, 16)  # helper@3, listed
        raise OSError("No space left on device")

    monkeypatch.setattr(publish, "publish", another_run_lists_then_this_listing_fails)
    with pytest.raises(OSError, match="No space left"):
        await retrain(run, world.stack, quiet)
    assert world.store.versions("helper") == [1, 3] and await world.served("helper") == "helper@1"


async def test_a_pin_written_as_the_step_is_stopped_is_released_with_its_candidate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the pin is being written: the write ends, the run records it, and removing the candidate
    removes the pin too (before, the pin stayed and the run did not know it was its own)."""
    run = await world.run()
    real, started, cancelled = PointerStore.pin_if, threading.Event(), threading.Event()

    async def slow(self: PointerStore, *args: Any) -> bool:
        written = await real(self, *args)
        started.set()
        await asyncio.to_thread(cancelled.wait, 30)  # its reply on its way when the cancellation comes
        return written

    monkeypatch.setattr(PointerStore, "pin_if", slow)
    await _cancelled_once_started(retrain(run, world.stack, quiet), started, cancelled)
    assert run.state.pinned is None and run.state.candidate is None and world.store.versions("helper") == [1]
    assert await world.redis.hget(keys.pins(TENANT), "helper") is None


async def test_a_pin_whose_reply_was_lost_is_released_with_its_candidate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis wrote the pin, then the connection dropped before its reply: the run failed, and the pin (which the run
    recorded before writing it) goes with its candidate."""
    run = await world.run()
    real, lost = PointerStore.pin_if, [ConnectionError("the connection dropped before the reply came")]

    async def reply_lost(self: PointerStore, *args: Any) -> bool:
        written = await real(self, *args)
        if lost:
            raise lost.pop()
        return written

    monkeypatch.setattr(PointerStore, "pin_if", reply_lost)
    with pytest.raises(ConnectionError):
        await retrain(run, world.stack, quiet)
    assert run.state.pinned is None and run.state.candidate is None
    assert await world.redis.hget(keys.pins(TENANT), "helper") is None


async def test_an_alias_repointed_since_the_dataset_is_not_sent_back(world: World) -> None:
    """The canary's control arm is what the alias served when the run began: had the operator moved it since, the
    canary would move 100 - canary_weight percent of its traffic back. Refused, nothing changed; and the run goes
    on once the alias serves that again."""
    run = await world.run()
    world.store.add(world.folder, "helper", world.base, 16)  # helper@3, which the operator points the alias at
    await PointerStore(world.redis).pin(TENANT, "helper", 3)
    await ExperimentStore(world.redis).set_alias(TENANT, "bot", "helper@3")
    with pytest.raises(RetrainRefused, match="`bot` serves helper@3 now, not helper@1 as when the run built its data"):
        await publish_candidate(run, world.stack, quiet, "test")
    assert not world.store.manifest("helper", 2).listed and "publish" not in run.state.done
    assert await ExperimentStore(world.redis).all(TENANT) == [] and await world.served("helper") == "helper@3"
    await ExperimentStore(world.redis).set_alias(TENANT, "bot", "helper@1")
    assert await publish_candidate(run, world.stack, quiet, "test") == "helper@2" and run.state.canary


async def test_an_alias_repointed_while_the_version_is_listed_gets_no_canary(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator repoints the alias after the check, while the version is being listed: the canary is not
    started on top of that (its control would move the traffic back): refused, the alias left where they put it."""
    run = await world.run()
    checked = publish.still_serving

    async def then_repointed(*args: Any) -> str:
        found = await checked(*args)
        await ExperimentStore(world.redis).set_alias(TENANT, "bot", world.base.name)
        return found

    monkeypatch.setattr(publish, "still_serving", then_repointed)
    with pytest.raises(RetrainRefused, match="helper@2 is listed .* but its canary did not start"):
        await publish_candidate(run, world.stack, quiet, "test")
    assert await ExperimentStore(world.redis).all(TENANT) == [] and await world.served("bot") == world.base.name
    assert run.state.published == "helper@2" and run.state.canary is None
    monkeypatch.undo()
    with pytest.raises(RetrainRefused, match="helper@2 is listed .* has no canary: point the alias at helper@1"):
        await publish_candidate(run, world.stack, quiet, "test")
    await ExperimentStore(world.redis).set_alias(TENANT, "bot", "helper@1")
    assert await publish_candidate(run, world.stack, quiet, "test") == "helper@2" and run.state.canary


async def test_a_listing_stopped_as_it_finished_is_published_and_goes_on(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the version is being listed: the listing ends (its thread cannot be stopped), and the run says
    it is published, not that its candidate is gone; asked again, the step starts the canary."""
    run = await world.run()
    real, started, cancelled = publish.publish, threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        cancelled.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(publish, "publish", slow)
    await _cancelled_once_started(retrain(run, world.stack, quiet), started, cancelled)
    assert world.store.manifest("helper", 2).listed
    assert run.state.published == "helper@2" and run.state.candidate == "helper@2" and run.state.canary is None
    monkeypatch.undo()
    assert await publish_candidate(run, world.stack, quiet, "test") == "helper@2" and run.state.canary


@pytest.mark.parametrize("started", [False, True], ids=["before-it-started", "after-it-started"])
async def test_a_publish_step_asked_again_after_its_canary_failed_goes_on(
    world: World, monkeypatch: pytest.MonkeyPatch, started: bool
) -> None:
    """Starting the canary failed before it started (Redis went away) or after (the reply was lost): asked again,
    the step neither lists the version again ('already published') nor starts a second canary."""
    run = await world.run()
    real = publish.start_canary

    async def fails(*args: Any, **kwargs: Any) -> Any:
        if started:
            await real(*args, **kwargs)
        raise ConnectionError("the reply was lost" if started else "Redis went away")

    monkeypatch.setattr(publish, "start_canary", fails)
    with pytest.raises(ConnectionError):
        await publish_candidate(run, world.stack, quiet, "test")
    assert world.store.manifest("helper", 2).listed and run.state.published == "helper@2" and run.state.canary is None
    monkeypatch.undo()
    assert await publish_candidate(run, world.stack, quiet, "test") == "helper@2", "not 'already published'"
    assert run.state.canary == f"retrain-{run.state.run_id}" and "publish" in run.state.done
    assert (await ExperimentStore(world.redis).get(TENANT, run.state.canary)).status == "running"
    assert (await PointerStore(world.redis).of(TENANT)).pins == {"helper": 1}
    with pytest.raises(RetrainRefused, match="has done its publish step already: published helper@2"):
        await publish_candidate(run, world.stack, quiet, "test")
    for step in (fit, evaluate_candidate):  # a fit overwrote the adapter a published version's provenance names
        with pytest.raises(RetrainRefused, match="its (fit|eval) step is not run again"):
            await step(run, world.stack, quiet)


@pytest.mark.parametrize("asked_again", [False, True])
async def test_an_eval_whose_bar_failed_is_not_done_and_publishes_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch, asked_again: bool
) -> None:
    """Asked again after an eval that passed, one with no verdict left `eval` done and its own `publish: false`:
    `train publish` then removed the candidate that had passed."""
    run = await world.run()
    run.state.done, run.state.eval = ["dataset", "fit"], None
    if asked_again:
        run.state.done.append("eval")
        run.state.eval = {"publish": True, "reasons": [], "unjudged": False}
    (run.data).mkdir()
    (run.data / "eval.jsonl").write_text('{"prompt": "hi", "reference": "hello"}\n')
    scores = evaluate.Scores(n=1, errors=0, metrics={"rouge_l": 1.0}, latency_p50_ms=1.0, latency_p95_ms=1.0)
    down = scores.model_copy(update={"errors": 1, "failed": [0], "metrics": {"rouge_l": 0.0}})

    async def evaluated(*args: Any, **kwargs: Any) -> evaluate.EvalReport:
        config, current = args[2], kwargs["current"]
        decision = evaluate.decide(scores, down, scores, None, config)
        models = {"base": "b", "current": current, "candidate": kwargs["candidate"]}
        return evaluate.EvalReport(
            primary_metric="rouge_l", models=models, candidate=scores, current=down, base=scores, regression=None,
            decision=decision, examples=[],
        )  # fmt: skip

    monkeypatch.setattr(evaluate, "evaluate", evaluated)
    with pytest.raises(RetrainRefused, match="No verdict on helper@2: the version now serving failed on 1 of 1"):
        await evaluate_candidate(run, world.stack, quiet)
    assert "eval" not in run.state.done and run.state.eval is not None and run.state.eval["unjudged"]
    with pytest.raises(RetrainRefused, match="has not done eval yet"):
        await publish_candidate(run, world.stack, quiet, "test")
    assert not world.store.manifest("helper", 2).listed


async def _cancelled_once_started(
    step: Coroutine[Any, Any, Any], started: threading.Event, cancelled: threading.Event | None = None
) -> None:
    """Run `step`, and cancel it (SIGTERM, Ctrl-C) once its thread has `started`: the cancellation gets through.
    `cancelled` is set once it is asked for (a stand-in step that waits for it is cancelled midway, however slow
    the machine)."""
    task = asyncio.create_task(step)
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    if cancelled is not None:
        cancelled.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_stopped_fit_ends_its_training_thread_first(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio cannot cancel a thread: SIGTERM or Ctrl-C used to end the step while training went on (and
    asyncio.run then waited for it at exit). The step sets the trainer's `stop` and waits for its thread."""
    run = await world.run()
    world.store.remove("helper", 2)
    run.state.done, run.state.candidate = ["dataset"], None
    started, ended, stopped = threading.Event(), threading.Event(), threading.Event()

    def training(*args: Any, stop: threading.Event | None = None, **kwargs: Any) -> Any:
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                stopped.set()
                break
            time.sleep(0.01)  # a training step
        ended.set()
        raise TrainingStopped("stopped")

    monkeypatch.setattr(training_module, "train", training)
    await _cancelled_once_started(fit(run, world.stack, quiet), started)
    assert ended.is_set(), "the training thread ended before the cancellation got through"
    assert stopped.is_set(), "it ended because it was told to stop, not at its own end"
    assert "fit" not in run.state.done


async def test_a_version_staged_as_the_step_is_stopped_is_removed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await world.run()
    world.store.remove("helper", 2)
    run.state.done, run.state.candidate = ["dataset", "fit"], None
    run.state.train, run.state.data_card = {"adapter_dir": str(world.folder)}, {"dataset_hash": "0" * 64}
    real, started, staged, cancelled = publish.stage, threading.Event(), threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        cancelled.wait(30)  # still copying when the cancellation comes
        try:
            return real(*args, **kwargs)
        finally:
            staged.set()

    monkeypatch.setattr(publish, "stage", slow)
    await _cancelled_once_started(stage_candidate(run, world.stack, quiet), started, cancelled)
    assert await asyncio.to_thread(staged.wait, 30) and world.store.versions("helper") == [1]
    assert run.state.candidate is None


async def test_a_candidate_whose_removal_failed_half_way_is_forgotten(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run fails; removing its candidate moves the version aside, then fails to delete the files (NFS, say):
    the version is gone all the same, and the run forgets it, so that `train eval --run` stages it again."""
    run = await world.run()
    run.state.done = ["dataset", "fit"]
    run.data.mkdir()
    (run.data / "eval.jsonl").write_text('{"prompt": "hi", "reference": "hello"}\n')

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the eval failed")

    def half_way(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("Device or resource busy")

    monkeypatch.setattr(evaluate, "evaluate", failing)
    monkeypatch.setattr(store_module.shutil, "rmtree", half_way)
    with pytest.raises(RuntimeError, match="the eval failed"):
        await retrain(run, world.stack, quiet)
    assert world.store.versions("helper") == [1] and run.state.candidate is None


async def test_a_candidate_is_never_staged_under_the_name_of_an_alias_of_its_tenant(world: World) -> None:
    """A run on an alias serving the base trains the adapter `ALIAS-tuned`: staged beside an alias of that name, it
    froze that alias (every repoint a 409, the version being on disk) and hid behind it."""
    await PointerStore(world.redis).set_alias(TENANT, "desk", world.base.name)
    await PointerStore(world.redis).set_alias(TENANT, "desk-tuned", world.base.name)
    with pytest.raises(RetrainRefused, match="has an alias `desk-tuned`, the name of the adapter a retraining run on"):
        await publish.serving(PointerStore(world.redis), ExperimentStore(world.redis), TENANT, "desk")
    await world.redis.hdel(keys.aliases(TENANT), "desk-tuned")
    run = await world.run("desk")  # the alias came after the dataset step's check, before the candidate
    world.store.remove("desk-tuned", 1)
    run.state.done, run.state.candidate = ["dataset", "fit"], None
    run.state.train, run.state.data_card = {"adapter_dir": str(world.folder)}, {"dataset_hash": "0" * 64}
    await PointerStore(world.redis).set_alias(TENANT, "desk-tuned", world.base.name)
    with pytest.raises(RetrainRefused, match="has an alias `desk-tuned`"):
        await stage_candidate(run, world.stack, quiet)
    assert world.store.versions("desk-tuned") == [] and run.state.candidate is None


async def test_staging_waits_out_a_name_lock_held_past_wait_s(
    world: World, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """Staging checks the name under its lock since the alias check: a lock held past WAIT_S (an operator's change,
    a process that died holding it) removed the candidate and failed the step, its training thrown away."""
    monkeypatch.setattr(version_guard, "WAIT_S", 0.2)
    run = await world.run()
    world.store.remove("helper", 2)
    run.state.done, run.state.candidate = ["dataset", "fit"], None
    run.state.train, run.state.data_card = {"adapter_dir": str(world.folder)}, {"dataset_hash": "0" * 64}
    held = sync_redis_client(redis_server.url).lock(keys.adapter_lock(TENANT, "helper"), timeout=2)
    assert held.acquire(blocking=False)  # expires by itself, as HOLD_S does
    assert await stage_candidate(run, world.stack, quiet) == "helper@3"
    assert run.state.candidate == "helper@3" and not world.store.manifest("helper", 3).listed


async def test_a_fit_asked_again_once_its_candidate_is_staged_is_refused(world: World) -> None:
    """It trained new weights and left the staged candidate and the eval of the old ones: `train eval` and `train
    publish` went on with those, and run.json's training summary described weights nobody evaluated."""
    run = await world.run()  # helper@2 staged, eval passed
    with pytest.raises(RetrainRefused, match="has staged helper@2 from its fit: its fit step is not run again"):
        await fit(run, world.stack, quiet)
    assert run.state.candidate == "helper@2" and world.store.versions("helper") == [1, 2]
