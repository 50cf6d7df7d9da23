"""Per-arm counters kept as records and ratings land (real Redis), and the results read from them."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from adapters.validate import BaseModelSpec
from gateway import arm_signal, experiment_history, experiment_page, experiment_results, keys
from gateway.answer import Answer
from gateway.context import RequestContext
from gateway.erasure import forget_user, mark_tenant_deleted
from gateway.experiment_results import results
from gateway.experiments import Arm, Change, Experiment, ExperimentStore
from gateway.feedback import FeedbackStore
from gateway.metrics import Metrics
from gateway.record_builder import build_entries, raw_record
from gateway.recorder import Recorder
from gateway.records import FeedbackIn, LogPolicy
from gateway.routing import Route
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.unit.admin_api import experiment_on_a_withdrawn_share
from tests.unit.test_recording import spooled_rating

TENANT = Tenant(name="t", logging=LogPolicy(score_min=1, score_max=5))

pytestmark = pytest.mark.usefixtures("experiment_tenants")


def served(n: int, arm: str, user: str | None, status: int = 200) -> RequestContext:
    ctx = RequestContext(f"r{n}", "chat", TENANT, "k1", payload={"model": "bot", "user": user} if user else {})
    ctx.validated = True
    target = "helper@1" if arm == "a" else "helper@2"
    ctx.route = Route(requested="bot", upstream_model=target, served_model=target, alias="bot", experiment="e", arm=arm)
    body = f'{{"id":"chatcmpl-{n}","choices":[],"usage":{{"prompt_tokens":3,"completion_tokens":5}}}}'
    ctx.answer = Answer(body=body.encode(), usage={"prompt_tokens": 3, "completion_tokens": 5})
    ctx.finish(status)
    ctx.latency_s = 0.04 if arm == "a" else 0.3
    return ctx


@pytest.fixture
async def stores(redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[tuple[Recorder, FeedbackStore]]:
    spools = [Spool(tmp_path / name, fsync=name == "feedback") for name in ("records", "feedback")]
    for spool in spools:
        spool.open()
    recorder = Recorder(redis, spools[0], Metrics())
    task = asyncio.create_task(recorder.run())
    yield recorder, FeedbackStore(redis, spools[1], recorder, Metrics(), settle_s=0.1)
    await recorder.stop()
    await task


async def test_counters_follow_records_and_ratings(
    redis: aioredis.Redis, stores: tuple[Recorder, FeedbackStore]
) -> None:
    recorder, feedback = stores
    await feedback.check_durability()
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    experiment = await ExperimentStore(redis).create(
        Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test"
    )
    contexts = [
        served(n, "a" if n % 2 else "b", f"u{n % 6}" if n < 18 else None, 502 if n == 3 else 200) for n in range(20)
    ]
    entries = build_entries([raw_record(ctx) for ctx in contexts])
    await recorder._write(entries)
    await recorder._write(entries[:4])  # a replay counts once
    for n in (1, 3, 5):
        await feedback.submit(TENANT, FeedbackIn(completion_id=f"chatcmpl-{n}", user="r", thumbs="down"))
    await feedback.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="r", score=5))  # replaces its "down"
    await feedback.submit(TENANT, FeedbackIn(completion_id="chatcmpl-2", user="r", thumbs="up", correction="Hi."))
    found = await results(redis, experiment)
    a, b = found["arms"]["a"], found["arms"]["b"]
    assert (a["requests"], b["requests"], a["anonymous"], b["anonymous"]) == (10, 10, 1, 1)
    assert (a["users"], b["users"]) == (3, 3)
    assert (a["errors"], b["errors"], a["error_rate"]) == (1, 0, 0.1)
    assert (a["latency_p50_ms"], b["latency_p95_ms"]) == (50.0, 500.0)
    assert (a["prompt_tokens"], a["completion_tokens"]) == (30, 50)
    assert (a["rated"], a["negative"], a["positive_rate"]) == (3, 2, pytest.approx(1 / 3)), "the replaced rating moved"
    assert (b["rated"], b["positive_rate"], b["corrected_share"]) == (1, 1.0, 0.1)
    assert found["verdict"] == "keep running" and found["sample_ratio_p"] > 0.001
    assert found["differences"][0]["always_valid"] == [None, None], "too few ratings for any interval"


def _results(experiment: Experiment, requests: int, rated: int, rate: float | None) -> dict[str, object]:
    arm = {"requests": requests, "rated": rated, "positive_rate": rate, "positive_interval": [None, None]}
    return {
        "arms": {a.name: dict(arm) for a in experiment.arms},
        "differences": [{"arm": "b", "diff": 0.1, "always_valid": [-0.5, 0.7]}],
        "verdict": "keep running",
    }


async def test_a_rating_counts_for_its_arm_however_soon_it_comes_and_after_an_outage(
    redis: aioredis.Redis, stores: tuple[Recorder, FeedbackStore]
) -> None:
    """A rating of a completion this process answered, given while its record is still being written (the index
    that names its arm not in Redis yet), and one spooled in an outage whose replay comes before its record's:
    each counts for the arm that answered, once its record is in, rather than for no arm (a later change of it
    then took away what was never added)."""
    recorder, feedback = stores
    await feedback.check_durability()
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    experiment = await ExperimentStore(redis).create(
        Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test"
    )
    fast = served(1, "b", "u1")
    recorder.recent["chatcmpl-1"] = ("t", TENANT.created)  # built, its write still in flight
    recorder.record(fast)
    await feedback.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="r", thumbs="up"))
    item = spooled_rating(TENANT, "chatcmpl-2")  # vouched for (answered here), spooled while Redis was away
    await feedback._spool.append([item])
    await feedback.replay()
    assert feedback._spool.pending() == 1, "it waits for its completion's record"
    await recorder._write(build_entries([raw_record(served(2, "b", "u2"))]))
    await feedback.replay()
    assert feedback._spool.pending() == 0
    await feedback.submit(TENANT, FeedbackIn(completion_id="chatcmpl-2", user="u1", thumbs="down"))  # changed
    b = (await results(redis, experiment))["arms"]["b"]
    assert (b["rated"], b["negative"], b["positive_rate"]) == (2, 1, 0.5)


async def test_the_sample_ratio_is_checked_against_the_buckets_users_are_assigned_by(redis: aioredis.Redis) -> None:
    """A weight of 1 against 1,000,000 gets one bucket in 10,000 (not none): requests split 9,999 to 1 match what
    was assigned, though not the weights (against which the check flagged every such experiment for good)."""
    arms = [Arm(name="a", target="helper@1", weight=1_000_000), Arm(name="b", target="helper@2", weight=1)]
    experiment = await ExperimentStore(redis).create(
        Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test"
    )
    for arm, requests in (("a", 199_980), ("b", 20)):
        await redis.hset(keys.arm_counters("t", "e", arm), "requests", requests)
    found = await results(redis, experiment)
    assert found["sample_ratio_p"] > 0.5 and found["verdict"] != "sample ratio mismatch"


async def test_arms_are_compared_on_the_ratings_since_the_split_last_changed(redis: aioredis.Redis) -> None:
    """90/10, then 50/50, while every arm's positive rate drifts from 0.5 to 0.7: control's ratings come mostly
    from the early half and the treatment's from the late one, so the cumulative rates differ (0.57 vs 0.67)
    though the arms do not. Compared since the change they are the same, and no winner is declared."""
    arms = [Arm(name="a", target="helper@1", weight=90), Arm(name="b", target="helper@2", weight=10)]
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test")

    async def rate(arm: str, n: int, rate: float) -> None:  # as n thumbs given now move the counters (arm_signal)
        counters = keys.arm_counters("t", "e", arm)
        await redis.hincrby(counters, "requests", n)
        for prefix in ("", "since:"):
            await redis.hincrby(counters, f"{prefix}rated", n)
            for field in ("positive_sum", "positive_squares"):  # thumbs: v * v = v
                await redis.hincrbyfloat(counters, prefix + field, n * rate)

    await rate("a", 9000, 0.5)
    await rate("b", 1000, 0.5)
    halves = await store.set_weights("t", "e", {"a": 50, "b": 50}, by="test")
    await rate("a", 5000, 0.7)
    await rate("b", 5000, 0.7)
    found = await results(redis, halves)
    assert found["arms"]["b"]["positive_rate"] - found["arms"]["a"]["positive_rate"] > 0.09, "cumulative: apart"
    assert found["arms"]["b"]["rated_since_change"] == 5000
    assert abs(found["differences"][0]["diff"]) < 1e-9 and found["winner"] is None
    assert found["verdict"] != "winner"


async def _rated_across_a_change(
    redis: aioredis.Redis, stores: tuple[Recorder, FeedbackStore], monkeypatch: pytest.MonkeyPatch
) -> tuple[ExperimentStore, FeedbackStore]:
    """50/50 (at least 10 ratings an arm for a verdict); ten ratings up of control's completions, then the split
    changes (60/40), then 20 ratings an arm, half of them up: since the change the arms are alike."""
    recorder, feedback = stores
    await feedback.check_durability()
    monkeypatch.setattr(arm_signal, "SINCE_MARGIN_S", 0)  # ratings given at once after the change count since
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms, min_samples=10), "test")
    await recorder._write(build_entries([raw_record(served(n, "ab"[n >= 50], f"u{n}")) for n in range(100)]))
    for n in range(10):
        await feedback.submit(TENANT, FeedbackIn(completion_id=f"chatcmpl-{n}", user=f"old{n}", thumbs="up"))
    await store.set_weights("t", "e", {"a": 60, "b": 40}, by="test")
    for n in [*range(10, 30), *range(50, 70)]:
        thumbs = "up" if n % 2 else "down"
        await feedback.submit(TENANT, FeedbackIn(completion_id=f"chatcmpl-{n}", user=f"new{n}", thumbs=thumbs))
    found = await results(redis, await store.get("t", "e"))
    assert [found["arms"][arm]["rated_since_change"] for arm in "ab"] == [20, 20]
    assert found["differences"][0]["diff"] == pytest.approx(0.0) and found["winner"] is None
    return store, feedback


async def test_a_rating_given_before_the_change_and_replaced_after_it_counts_as_given_since(
    redis: aioredis.Redis, stores: tuple[Recorder, FeedbackStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ten early ratings, replaced by thumbs down: ten more ratings since for control (10 up of 30), not ten taken
    from its ratings since that were never in them (control at 0 of 20, with no variance, read as a sure loser: the
    guard rail promoted the treatment)."""
    store, feedback = await _rated_across_a_change(redis, stores, monkeypatch)
    for n in range(10):
        await feedback.submit(TENANT, FeedbackIn(completion_id=f"chatcmpl-{n}", user=f"old{n}", thumbs="down"))
    found = await results(redis, await store.get("t", "e"))
    assert [found["arms"][arm]["rated_since_change"] for arm in "ab"] == [30, 20]
    assert found["differences"][0]["diff"] == pytest.approx(0.5 - 10 / 30)
    assert found["winner"] is None and found["verdict"] != "winner"
    assert (found["arms"]["a"]["rated"], found["arms"]["a"]["positive_rate"]) == (30, pytest.approx(10 / 30))


async def test_erasing_ratings_given_before_the_change_leaves_those_since(
    redis: aioredis.Redis, stores: tuple[Recorder, FeedbackStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Erasure takes the early raters' ratings out of the totals, and nothing out of the ratings since, which never
    held them (it took them from those: control at 0 of 10)."""
    store, _ = await _rated_across_a_change(redis, stores, monkeypatch)
    for n in range(10):
        removed = await forget_user(redis, "t", f"old{n}", TENANT.logging)
        assert removed["feedback"] == 1
    found = await results(redis, await store.get("t", "e"))
    assert [found["arms"][arm]["rated_since_change"] for arm in "ab"] == [20, 20]
    assert found["differences"][0]["diff"] == pytest.approx(0.0) and found["winner"] is None
    assert found["arms"]["a"]["rated"] == 20


async def test_an_ended_experiment_keeps_its_sample_ratio_check(redis: aioredis.Redis) -> None:
    """Stopped (or promoted, rolled back), an experiment keeps no allocation: the check counted each arm's share from
    it, found none, and an experiment that ended flagged read as clean (p = 1)."""
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test")
    for arm, requests in (("a", 64), ("b", 6)):
        await redis.hset(keys.arm_counters("t", "e", arm), "requests", requests)
    running = await results(redis, await store.get("t", "e"))
    assert running["sample_ratio_p"] < 1e-6 and running["verdict"] == "sample ratio mismatch"
    stopped = await results(redis, await store.set_status("t", "e", "stopped", by="test"))
    assert stopped["sample_ratio_p"] == running["sample_ratio_p"] and stopped["verdict"] == running["verdict"]


async def test_only_a_new_split_starts_a_new_comparison(redis: aioredis.Redis) -> None:
    """Pause, resume, weights that move no bucket and the end of the experiment leave the comparison period as
    it was: a promoted experiment keeps the verdict it was promoted on (each of them began a new, empty period:
    its results read 0 ratings since). The record an earlier release reads has no rated_before until one."""
    arms = [Arm(name="a", target="helper@1", weight=1), Arm(name="b", target="helper@2", weight=1)]
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test")
    for arm, positive in (("a", 50), ("b", 90)):
        counters = keys.arm_counters("t", "e", arm)
        await redis.hset(counters, mapping={"requests": 100, "rated": 100})
        await redis.hset(counters, mapping={"positive_sum": positive, "positive_squares": positive})
    await store.set_status("t", "e", "paused", by="test")
    await store.set_status("t", "e", "running", by="test")
    await store.set_weights("t", "e", {"a": 2, "b": 2}, by="test")  # the same buckets
    assert "rated_before" not in (await redis.hget(keys.experiments("t"), "e") or ""), "an older gateway reads it"
    promoted = await store.set_status("t", "e", "promoted", by="test", arm="b")
    found = await results(redis, promoted)
    assert [found["arms"][arm]["rated_since_change"] for arm in "ab"] == [100, 100]
    assert found["differences"][0]["diff"] > 0.3


async def test_history_keeps_points_that_moved_and_thins_to_the_whole_span(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = [Arm(name="a", target="helper@1", weight=90), Arm(name="b", target="helper@2", weight=10)]
    experiment = Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms)
    assert await experiment_history.record(redis, experiment, _results(experiment, 1, 0, None))
    assert not await experiment_history.record(redis, experiment, _results(experiment, 1, 0, None)), "nothing moved"
    assert await experiment_history.record(redis, experiment, _results(experiment, 2, 1, 1.0))
    points = await experiment_history.read(redis, experiment)
    assert [p["arms"]["b"]["requests"] for p in points] == [1, 2]
    assert points[1]["arms"]["a"]["weight"] == 90 and points[1]["differences"]["b"]["always_valid"] == [-0.5, 0.7]
    monkeypatch.setattr(experiment_history, "MAX_POINTS", 6)
    for n in range(3, 8):
        await experiment_history.record(redis, experiment, _results(experiment, n, 1, 1.0))
    kept = [p["arms"]["a"]["requests"] for p in await experiment_history.read(redis, experiment)]
    assert kept[0] == 1 and kept[-1] == 7 and len(kept) <= 6, kept


def test_the_page_holds_a_chart_of_every_arm_and_the_changes() -> None:
    arms = [Arm(name="a", target="helper@1", weight=90), Arm(name="b", target="helper@2", weight=10)]
    experiment = Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms)
    history = [experiment_history.point(experiment, _results(experiment, n, n, 0.5), at=1e9 + n) for n in (1, 2)]
    now = {**_results(experiment, 2, 2, 0.5), "winner": None, "sample_ratio_p": 0.5}
    for arm in now["arms"].values():  # type: ignore[attr-defined]
        arm.update(users=1, error_rate=0.0, corrected_share=None)
    change = Change(at=1e9, by="cli:me<script>", action="create", detail="created")
    page = experiment_page.render(experiment, now, history, [change])
    assert page.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in page and "experiment-chart" in page
    assert "cli:me&lt;script&gt;" in page and "cli:me<script>" not in page, "text from users is escaped"
    chart = experiment_page.figure(experiment, history)
    names = {trace.name for trace in chart.data if trace.showlegend is not False}
    assert names == {"a", "b"}
    assert len(chart.data) == 2 * 4 + 3, "per arm: a band (2 traces), the rate, the requests; for b the difference too"


def against_control(experiment: Experiment, arm: str, found: dict[str, Any], control: dict[str, Any]) -> str | None:
    """The guard rails' judgement of an arm whose window control's figures `control` (its `guard_window`) cover."""
    from gateway.guard_rails import _breach

    return _breach(experiment, arm, {**found, "guard_control": control["guard_window"]})


def test_guard_rails_roll_back_errors_beyond_controls_and_negative_ratings_only_when_worse_than_control() -> None:
    _breach = against_control

    arms = [Arm(name="a", target="helper@1", weight=80), Arm(name="b", target="helper@2", weight=20)]
    experiment = Experiment(
        name="e", tenant="t", alias="bot", control="a", arms=arms,
        max_error_rate=0.2, max_negative_rate=0.6, guard_min_requests=5,
    )  # fmt: skip

    def figures(requests: int, errors: float, rated: int, negative: int) -> dict[str, object]:
        return {"guard_window": {"requests": requests, "error_rate": errors, "rated": rated, "negative": negative}}

    control_bad, control_good = figures(100, 0.0, 100, 100), figures(40, 0.0, 30, 6)
    assert _breach(experiment, "b", figures(60, 0.0, 60, 55), control_bad) is None, "better than control: kept"
    reason = _breach(experiment, "b", figures(60, 0.0, 60, 55), control_good)
    assert (
        reason is not None
        and "negative ratings 91.7% (at least 7" in reason
        and "> 60.0% of 60, control 20.0%" in reason
    )
    assert _breach(experiment, "b", figures(30, 0.0, 30, 20), control_good) is None, "66.7% of 30: maybe by chance"
    assert "error rate 50.0%" in (_breach(experiment, "b", figures(6, 0.5, 0, 0), control_bad) or "")
    outage = figures(20, 0.5, 0, 0)  # the engines unreachable for a moment: every arm fails alike
    assert _breach(experiment, "b", figures(8, 0.625, 0, 0), outage) is None, "no worse than control: an outage"
    reason = _breach(experiment, "b", figures(8, 0.75, 0, 0), outage) or ""
    assert reason == "error rate 75.0% > 20.0% beyond control's 50.0% after 8 requests", reason
    assert _breach(experiment, "b", figures(8, 0.25, 0, 0), figures(0, None, 0, 0)) is not None, "control unasked"  # type: ignore[arg-type]
    assert _breach(experiment, "b", figures(4, 0.5, 4, 4), control_good) is None, "too few requests to judge"
    assert _breach(experiment, "b", figures(40, 0.0, 4, 4), control_good) is None, "too few ratings to judge them"
    assert _breach(experiment, "a", figures(40, 0.9, 30, 30), control_bad) is None, "control is never rolled back"


def test_an_arm_rated_as_control_is_seldom_rolled_back_for_its_negative_share_however_often_it_is_looked_at() -> None:
    """Every round looks again: a point estimate over the limit rolled back about a third of canaries as good as
    control (true share 0.5, limit 0.6, a look after each rating); the always-valid bound keeps that under alpha,
    and still rolls back a canary rated down throughout within a few dozen ratings."""
    _breach = against_control

    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    experiment = Experiment(
        name="e", tenant="t", alias="bot", control="a", arms=arms, max_negative_rate=0.6, guard_min_requests=20
    )
    rng = random.Random(7)
    rolled_back = 0
    for _ in range(200):
        negative = 0
        for n in range(1, 601):
            negative += rng.random() < 0.5
            arm = {"requests": n, "error_rate": 0.0, "rated": n, "negative": negative}
            if _breach(experiment, "b", {"guard_window": arm}, {"guard_window": {"rated": 0, "negative": 0}}):
                rolled_back += 1
                break
    assert rolled_back <= 0.05 * 200, rolled_back
    bad = [{"requests": n, "error_rate": 0.0, "rated": n, "negative": n} for n in range(20, 100)]
    none = {"guard_window": {"rated": 0, "negative": 0}}
    first = next(arm["rated"] for arm in bad if _breach(experiment, "b", {"guard_window": arm}, none))
    assert first <= 30, first


async def test_history_thins_in_one_step_whatever_its_length(redis: aioredis.Redis) -> None:
    """Read, cut and written back in one script: a point another process appends meanwhile cannot fall between
    the read and the write (before: LRANGE, then DEL + RPUSH of what was read)."""
    key = keys.experiment_history("t", "long")
    await redis.rpush(key, *[str(n) for n in range(2401)])
    assert await redis.eval(experiment_history._THIN, 1, key, 2400) == 1  # noqa: SLF001
    assert await redis.lrange(key, 0, -1) == [str(n) for n in range(0, 2400, 2)] + ["2400"]
    assert await redis.eval(experiment_history._THIN, 1, key, 2400) == 0, "short enough: left as it is"  # noqa: SLF001


async def test_an_experiment_of_a_tenant_created_again_is_dated_after_the_deletion(redis: aioredis.Redis) -> None:
    """The tombstone is dated by the deleting host's clock, which may run ahead: an experiment created just after the
    tenant was created again was taken for the deleted tenant's (no history point, no new period) for good."""
    ahead = time.time() + 5
    await redis.set(keys.tenant_deleted("t"), f"{ahead!r} 0")
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    created = await ExperimentStore(redis).create(
        Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), "x"
    )
    assert created.created > ahead
    assert await experiment_history.record(redis, created, await results(redis, created))
    begun = await arm_signal.begin_period(redis, "t", "e", created.created, ["a", "b"], set(), "a")
    assert begun != arm_signal.Period({}, {})


async def test_nothing_of_an_experiment_is_written_back_once_its_tenant_is_deleted(redis: aioredis.Redis) -> None:
    """A guard-rail round that read the experiment just before its tenant was deleted neither brings its purged
    history back (a make test run found its key after the deletion) nor its arms' counters (a roll-back's new
    comparison period); the experiment of a tenant created again under the name is written as ever."""
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    old = await ExperimentStore(redis).create(
        Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), "x"
    )
    found = await results(redis, old)
    await mark_tenant_deleted(redis, "t", TENANT.created, 3600)
    assert not await experiment_history.record(redis, old, found)
    begun = await arm_signal.begin_period(redis, "t", "e", old.created, ["a", "b"], set(), "a")
    assert begun == arm_signal.Period({}, {})
    written = [keys.experiment_history("t", "e"), keys.arm_counters("t", "e", "a"), keys.arm_counters("t", "e", "b")]
    assert await redis.exists(*written) == 0
    await asyncio.sleep(0.01)
    new = old.model_copy(update={"created": time.time()})
    assert await experiment_history.record(redis, new, found)
    begun = await arm_signal.begin_period(redis, "t", "e", new.created, ["a", "b"], set(), "a")
    assert begun.exposed == {"a": 0, "b": 0}


async def test_a_split_change_keeps_the_snapshot_the_release_before_compares_from(redis: aioredis.Redis) -> None:
    """During a rolling upgrade both releases read and change experiments. This one stores `rated_before` (the totals
    at the change) as the release before did, so that release compares from it; and when that release changes the
    split later (a new snapshot, no new period in the counters), this one compares as it does, not on a period that
    began at an earlier change."""
    arms = [Arm(name="a", target="helper@1", weight=90), Arm(name="b", target="helper@2", weight=10)]
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test")
    for arm in "ab":
        await redis.hset(
            keys.arm_counters("t", "e", arm), mapping={"rated": 10, "positive_sum": 4, "positive_squares": 4}
        )
    changed = await store.set_weights("t", "e", {"a": 50, "b": 50}, by="test")
    assert changed.rated_before == {"a": (10, 4.0, 4.0), "b": (10, 4.0, 4.0)}
    assert json.loads(await redis.hget(keys.experiments("t"), "e") or "{}")["rated_before"]["a"] == [10, 4.0, 4.0]
    for arm in "ab":  # two thumbs up each since, as arm_signal counts them
        for field in ("rated", "positive_sum", "positive_squares", "since:rated", "since:positive_sum"):
            await redis.hincrbyfloat(keys.arm_counters("t", "e", arm), field, 2)
    found = await results(redis, changed)
    assert [found["arms"][arm]["rated_since_change"] for arm in "ab"] == [2, 2]
    by_the_release_before = changed.model_copy(update={"rated_before": {"a": (12, 6.0, 6.0), "b": (12, 6.0, 6.0)}})
    found = await results(redis, by_the_release_before)
    assert [found["arms"][arm]["rated_since_change"] for arm in "ab"] == [0, 0], "its snapshot, not the period"


def test_an_arm_whose_shared_adapter_was_unshared_counts_its_404s_as_its_errors(
    api: TestClient, tmp_path: Path, base: BaseModelSpec
) -> None:
    """The owner of an arm's adapter stops sharing it: that arm's users get the 404 any model they may not use gets
    (naming neither the owner nor the adapter), and each counts as an error of the arm, so that its guard rail
    (max_error_rate) rolls it back; before, none counted and the arm stayed, serving nothing, for good."""
    experiment_on_a_withdrawn_share(api, tmp_path, base, control_weight=0)
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    chat = {"model": "helper", "messages": [{"role": "user", "content": "hi"}], "user": "u1"}
    refused = api.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert "beta" not in refused.text and "tool" not in refused.text
    deadline = time.monotonic() + 60
    while (arm := api.get("/admin/tenants/acme/experiments/borrow/results").json()["arms"]["lent"])["errors"] < 1:
        assert time.monotonic() < deadline, arm
        time.sleep(0.1)
    assert arm["requests"] == 1


async def test_the_statistics_of_many_arms_are_computed_off_the_event_loop(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """255 arms (the most an experiment has) took the event loop, and every tenant's requests on it, a tenth of a
    second and more to compare (on the AVX2 kind), at every results page and guard-rail round."""
    arms = [Arm(name=f"a{i}", target="helper@1", weight=1) for i in range(255)]
    experiment = Experiment(name="wide", tenant="t", alias="bot", control="a0", arms=arms)
    for i, arm in enumerate(arms):
        counters = {"requests": 40 + i, "rated": 30, "positive_sum": 10 + i % 20, "positive_squares": 10 + i % 20}
        await redis.hset(keys.arm_counters("t", "wide", arm.name), mapping=counters)
    threads = []
    summary = experiment_results._summary

    def watched(*args: Any) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return summary(*args)

    monkeypatch.setattr(experiment_results, "_summary", watched)
    found = await results(redis, experiment)
    assert len(found["arms"]) == 255 and len(found["differences"]) == 254
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
