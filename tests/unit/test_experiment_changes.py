"""Changes of experiments that must not break an alias: weights at the edges, guard rails that act once and
on their own, versions and aliases in use, and changes that race (real Redis; the admin API in process,
with no engine behind it)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from starlette.testclient import TestClient

from adapters.registry import Registry
from gateway import guard_rails, keys
from gateway.assignment import BUCKETS, allocate, arm_for, reallocate, shares
from gateway.experiments import (
    PREFIX,
    Arm,
    Change,
    Experiment,
    ExperimentConflict,
    ExperimentStore,
    InvalidExperiment,
)
from gateway.pointers import PointerStore
from gateway.routing import Router
from gateway.tenants import TenantNotFound, TenantStore
from tests.conftest import RedisServer, redis_client
from tests.unit.admin_api import BASE, refused

pytestmark = pytest.mark.usefixtures("experiment_tenants")


def _experiment(tenant: str, name: str, alias: str, weights: tuple[float, float], **rails: Any) -> Experiment:
    arms = [Arm(name="control", target=BASE, weight=weights[0]), Arm(name="treat", target="bot@2", weight=weights[1])]
    return Experiment(name=name, tenant=tenant, alias=alias, control="control", arms=arms, **rails)


async def _counters(redis: aioredis.Redis, tenant: str, name: str, arm: str, **figures: int) -> None:
    requests, errors, rated, positive = (figures.get(k, 0) for k in ("requests", "errors", "rated", "positive"))
    counters = {"requests": requests, "errors": errors, "rated": rated, "negative": rated - positive}
    await redis.hset(
        keys.arm_counters(tenant, name, arm),
        mapping={**counters, "positive_sum": positive, "positive_squares": positive},
    )


# 1, 2: weights


def test_huge_weights_still_split_every_bucket_and_bad_ones_are_refused() -> None:
    for weights in ([1e308, 1e308], [1e308, 1.0], [5e-324, 0.0], [0.1] * 255):
        counts = shares(weights)
        assert sum(counts) == BUCKETS and min(counts) >= 0, weights
    allocation = allocate([1e308, 1e308])
    assert len(allocation) == BUCKETS and allocation.count(1) == BUCKETS // 2
    assert arm_for(allocation, "t", "e", "someone") in (0, 1)
    for bad in ([-1.0, 2.0], [math.nan, 1.0], [math.inf, 1.0], [0.0, 0.0], []):
        with pytest.raises(ValueError, match="finite and non-negative"):
            reallocate(allocation, bad)
    for weight in (1e308, 1e6 + 1, -5.0, math.nan, math.inf):
        with pytest.raises(ValidationError):
            Arm(name="a", target=BASE, weight=weight)
    assert Arm(name="a", target=BASE, weight=1e6).weight == 1e6 and Arm(name="a", target=BASE, weight=0).weight == 0


async def test_new_weights_out_of_bounds_are_refused_and_change_nothing(redis: aioredis.Redis) -> None:
    store = ExperimentStore(redis)
    created = await store.create(_experiment("t", "tone", "bot", (50, 50)), by="test")
    for weight in (-5.0, math.nan, math.inf, 1e308, 2e6):
        with pytest.raises(InvalidExperiment, match="from 0 to 1e"):
            await store.set_weights("t", "tone", {"treat": weight}, by="test")
    with pytest.raises(InvalidExperiment, match="above 0"):
        await store.set_weights("t", "tone", {"control": 0, "treat": 0}, by="test")
    changed = await store.set_weights("t", "tone", {"control": 1e6, "treat": 1e6}, by="test")
    assert changed.buckets == created.buckets, "1e6/1e6 is 50/50: nobody moves"
    assert [c.action for c in await store.audit("t", "tone")] == ["create", "weights"]


# 3, 4: guard rails


def rails_router(store: ExperimentStore) -> Router:
    """What the guard rails need of a router here: its experiments (nothing they do in these tests is promoted)."""
    return Router(BASE, None, None, store)  # type: ignore[arg-type]


async def test_an_arm_rolled_back_is_not_promoted_in_the_same_round(redis: aioredis.Redis) -> None:
    """Its users rate it far better, but it errs: roll back, and no promotion (then or later)."""
    await TenantStore(redis).create("zz")
    store = ExperimentStore(redis)
    rails = {"auto_promote": True, "max_error_rate": 0.1, "min_samples": 10}
    await store.create(_experiment("zz", "canary", "bot", (50, 50), **rails), by="test")
    await _counters(redis, "zz", "canary", "control", requests=500, rated=300, positive=90)
    await _counters(redis, "zz", "canary", "treat", requests=500, errors=200, rated=300, positive=280)
    for _ in range(2):  # two rounds
        experiment = await ExperimentStore(redis).get("zz", "canary")
        if experiment.status == "running":
            await guard_rails.check(experiment, rails_router(store), await guard_rails.results(redis, experiment))
    found = await store.get("zz", "canary")
    assert found.status == "running" and [a.weight for a in found.arms] == [50, 0]
    assert await redis.hget(keys.aliases("zz"), "bot") == PREFIX + "canary", "the alias did not move"
    audit = await store.audit("zz", "canary")
    assert [c.action for c in audit] == ["create", "weights"] and "error rate 40.0%" in audit[1].detail


async def test_guard_rails_judge_what_an_arm_did_since_its_split_changed_or_its_experiment_resumed(
    redis: aioredis.Redis,
) -> None:
    """An arm rolled back for its errors and given a weight again once they were mended, or an experiment paused by
    its guard rail and resumed, was rolled back (paused) again at once for the same old errors: the guard rails
    judged whole lives. They judge each arm's guard window now, which a new split or a resume begins."""
    await TenantStore(redis).create("gw")
    store, router = ExperimentStore(redis), rails_router(ExperimentStore(redis))

    async def round_() -> list[str]:
        experiment = await store.get("gw", "canary")
        return await guard_rails.check(experiment, router, await guard_rails.results(redis, experiment))

    await store.create(_experiment("gw", "canary", "bot", (50, 50), max_error_rate=0.2), by="test")
    await _counters(redis, "gw", "canary", "control", requests=100)
    await _counters(redis, "gw", "canary", "treat", requests=100, errors=100)
    assert (await round_())[0].startswith("rolled back treat: error rate 100.0%")
    await store.set_weights("gw", "canary", {"treat": 50}, by="operator", reason="mended")
    assert await round_() == [], "its old errors are not judged again"
    await _counters(redis, "gw", "canary", "treat", requests=130, errors=100)  # 30 good requests since
    assert await round_() == []
    found = await guard_rails.results(redis, await store.get("gw", "canary"))
    assert found["arms"]["treat"]["guard_window"] == {
        "requests": 30, "errors": 0, "rated": 0, "negative": 0, "error_rate": 0.0,
    }  # fmt: skip
    assert found["arms"]["treat"]["requests"] == 130, "its whole life, as ever, beside the window"
    await _counters(redis, "gw", "canary", "treat", requests=160, errors=115)  # then it fails again: 15 of 30
    assert (await round_())[0].startswith("rolled back treat: error rate 25.0%"), "judged on its window: 50%"

    await store.set_weights("gw", "canary", {"control": 0, "treat": 100}, by="operator")
    await _counters(redis, "gw", "canary", "treat", requests=200, errors=155)
    assert (await round_())[0].startswith("paused: roll back treat"), "no other arm has a weight"
    await store.set_status("gw", "canary", "running", by="operator", reason="mended again")
    assert await round_() == [], "resumed: what it did before is not judged again"
    assert (await store.get("gw", "canary")).status == "running"


async def test_an_arm_is_judged_against_control_over_its_own_window(redis: aioredis.Redis) -> None:
    """A canary's weight raised began its window, while control's figures stayed its whole life: an outage failing
    both alike (30%) read as 30% against control's 1.4%, and the canary was rolled back."""
    await TenantStore(redis).create("ramp")
    store, router = ExperimentStore(redis), rails_router(ExperimentStore(redis))
    await store.create(_experiment("ramp", "canary", "bot", (90, 10), max_error_rate=0.2, guard_min_requests=50), "t")
    await _counters(redis, "ramp", "canary", "control", requests=10_000, errors=30)
    await _counters(redis, "ramp", "canary", "treat", requests=1_100, errors=3)
    await store.set_weights("ramp", "canary", {"treat": 20}, by="operator")

    async def round_() -> list[str]:
        experiment = await store.get("ramp", "canary")
        return await guard_rails.check(experiment, router, await guard_rails.results(redis, experiment))

    await _counters(redis, "ramp", "canary", "control", requests=10_400, errors=150)  # both fail alike: 30%
    await _counters(redis, "ramp", "canary", "treat", requests=1_200, errors=33)
    assert await round_() == [], "an outage of every arm is not the canary's"
    await _counters(redis, "ramp", "canary", "treat", requests=1_300, errors=133)  # then the canary alone fails
    assert (await round_())[0].startswith("rolled back treat: error rate 65.0% > 20.0% beyond control's 30.0%")


async def test_a_roll_back_begins_the_guard_window_of_the_arm_rolled_back_only(redis: aioredis.Redis) -> None:
    """Any change of split began every arm's window: another arm's roll-back (or a tweak of control's weight) sent a
    failing arm, 90 requests into its window, back to none. Each field stays a number, as the release before reads
    every field but `since:base`."""
    store = ExperimentStore(redis)
    arms = [Arm(name=n, target=BASE if n == "control" else "bot@2", weight=30) for n in ("control", "x", "y")]
    await store.create(Experiment(name="three", tenant="t", alias="bot", control="control", arms=arms), by="test")
    await store.set_weights("t", "three", {"x": 0}, by="guard rail")
    began = {a: await redis.hget(keys.arm_counters("t", "three", a), "guard:at") for a in ("control", "x", "y")}
    assert began["x"] is not None and began["control"] is None and began["y"] is None, began
    for arm in ("control", "x", "y"):
        fields = await redis.hgetall(keys.arm_counters("t", "three", arm))
        assert all(isinstance(float(v), float) for k, v in fields.items() if k != "since:base"), fields


async def test_a_roll_back_that_leaves_no_weight_pauses_and_no_experiment_holds_up_the_others(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tenants, store = TenantStore(redis), ExperimentStore(redis)
    for tenant in ("aa", "mm", "zz"):
        await tenants.create(tenant)
    await store.create(_experiment("aa", "rollout", "bot", (0, 100), max_error_rate=0.1), by="test")
    await _counters(redis, "aa", "rollout", "treat", requests=100, errors=50)
    await store.create(_experiment("mm", "broken", "bot", (50, 50), max_error_rate=0.1), by="test")
    await store.create(_experiment("zz", "other", "bot", (50, 50), max_error_rate=0.1), by="test")
    await _counters(redis, "zz", "other", "treat", requests=100, errors=50)
    real_results = guard_rails.results

    async def results(records: aioredis.Redis, experiment: Experiment) -> dict[str, Any]:
        if experiment.name == "broken":
            raise RuntimeError("a bug in one experiment")
        return await real_results(records, experiment)

    monkeypatch.setattr(guard_rails, "results", results)
    # Earlier tests in this process (the integration suite runs first) may leave the logger's propagation or
    # `disabled` flag changed, so the capture hangs on the logger itself.
    monkeypatch.setattr(guard_rails.log, "disabled", False)
    guard_rails.log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, "loragate.experiments"):
            rounds = asyncio.create_task(guard_rails.run(redis, redis, rails_router(store), 0.05))
            for _ in range(200):  # a round or two; more on a loaded machine (10 s at most)
                await asyncio.sleep(0.05)
                if (await store.get("zz", "other")).arms[1].weight == 0 and "mm/broken failed" in caplog.text:
                    break
            rounds.cancel()
    finally:
        guard_rails.log.removeHandler(caplog.handler)
    paused = await store.get("aa", "rollout")
    assert paused.status == "paused" and [a.weight for a in paused.arms] == [0, 100], "paused: all to control"
    change = (await store.audit("aa", "rollout"))[-1]
    assert (change.by, change.action) == ("guard rail", "pause") and "no other arm has a weight" in change.detail
    other = await store.get("zz", "other")
    assert [a.weight for a in other.arms] == [50, 0], "checked after the ones that could not go on"
    assert await experiment_history_points(redis, "zz", "other") >= 1
    assert "mm/broken failed; the others go on" in caplog.text


async def test_a_round_reads_running_experiments_only_and_audit_logs_keep_the_latest_changes(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant keeps every ended experiment (a retraining run's canary each), which every guard-rail round parsed;
    and an audit log grew with every change, read whole at every look."""
    from gateway import experiments

    store = ExperimentStore(redis)
    await store.create(_experiment("t", "old", "bot", (50, 50)), by="test")
    await store.set_status("t", "old", "stopped", by="test")
    await store.create(_experiment("t", "new", "bot", (50, 50)), by="test")
    await store.create(_experiment("t", "held", "other", (50, 50)), by="test")
    await store.set_status("t", "held", "paused", by="test")
    assert [e.name for e in await store.running("t")] == ["new"]
    monkeypatch.setattr(experiments, "MAX_AUDIT", 3)
    for weight in (10, 20, 30, 40):
        await store.set_weights("t", "new", {"treat": weight}, by="test")
    assert [c.detail for c in await store.audit("t", "new")] == [f"control=50, treat={w}" for w in (20, 30, 40)]


async def test_a_tenant_runs_at_most_max_running_experiments_at_once(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One guard-rail round judges every tenant's experiments: one tenant's thousands would hold back the others'
    rollbacks. Running and paused ones count; ended ones do not."""
    from gateway import experiments

    monkeypatch.setattr(experiments, "MAX_RUNNING", 2)
    store = ExperimentStore(redis)
    await store.create(_experiment("t", "one", "a1", (50, 50)), by="test")
    await store.create(_experiment("t", "two", "a2", (50, 50)), by="test")
    await store.set_status("t", "two", "paused", by="test")
    with pytest.raises(experiments.TooManyExperiments, match="2 experiments running or paused"):
        await store.create(_experiment("t", "three", "a3", (50, 50)), by="test")
    await store.create(_experiment("acme", "three", "a3", (50, 50)), by="test")  # another tenant's own count
    await store.set_status("t", "one", "stopped", by="test")
    await store.create(_experiment("t", "three", "a3", (50, 50)), by="test")
    assert [e.name for e in await store.live("t")] == ["two", "three"]
    await store.set_status("t", "two", "stopped", by="test")
    await store.set_status("t", "three", "stopped", by="test")
    # creates at once each counted none live before the script ran, and all were saved: the script counts too
    racing = [store.create(_experiment("t", f"race{i}", f"r{i}", (50, 50)), by="test") for i in range(6)]
    done = await asyncio.gather(*racing, return_exceptions=True)
    assert sum(isinstance(d, experiments.TooManyExperiments) for d in done) == 4, done
    assert len(await store.live("t")) == 2


async def test_a_redis_error_of_one_experiment_holds_up_no_other(redis: aioredis.Redis) -> None:
    """A key of another type under one experiment's name (WRONGTYPE) failed every round for every tenant after
    it: only an unreachable Redis stops a round."""
    tenants, store = TenantStore(redis), ExperimentStore(redis)
    for tenant in ("mm", "zz"):
        await tenants.create(tenant)
    await store.create(_experiment("mm", "odd", "bot", (50, 50), max_error_rate=0.1), by="test")
    await redis.set(keys.arm_counters("mm", "odd", "treat"), "not a hash")
    await store.create(_experiment("zz", "other", "bot", (50, 50), max_error_rate=0.1), by="test")
    await _counters(redis, "zz", "other", "treat", requests=100, errors=50)
    await redis.set(keys.experiments("ll"), "not a hash either")  # a tenant whose experiments cannot be read
    await guard_rails.check_all(redis, rails_router(store), ["ll", "mm", "zz"])
    assert [a.weight for a in (await store.get("zz", "other")).arms] == [50, 0]


@pytest.mark.parametrize(
    "name", ["Ctl", "bad arm", "x:users", "evil\r\nSet-Cookie: a=b", "arm✓", "a[/b]", "-a", "a" * 64]
)
async def test_arm_names_are_checked_whole(redis: aioredis.Redis, name: str) -> None:
    """pydantic's `pattern` searches: any name with one of a-z 0-9 in it passed, and `x:users` shared a Redis key
    with arm `x`'s users, `bad arm` lost its ratings (the completion index is space-separated) and a CR LF broke
    the `x-loragate-arm` header."""
    store = ExperimentStore(redis)
    arms = [Arm(name="control", target=BASE, weight=50), Arm(name=name, target="bot@2", weight=50)]
    bad = Experiment(name="tone", tenant="t", alias="bot", control="control", arms=arms)
    with pytest.raises(InvalidExperiment, match="Invalid arm name"):
        await store.create(bad, by="test")
    assert await redis.hget(keys.aliases("t"), "bot") is None, "nothing was written"


async def test_an_arm_named_by_an_earlier_release_is_still_read(redis: aioredis.Redis) -> None:
    store = ExperimentStore(redis)
    created = await store.create(_experiment("t", "tone", "bot", (50, 50)), by="test")
    stored = json.loads(created.model_dump_json())
    stored["arms"][1]["name"] = "Treat B"
    await redis.hset(keys.experiments("t"), "tone", json.dumps(stored))
    store.forget_cached()
    assert [a.name for a in (await store.get("t", "tone")).arms] == ["control", "Treat B"]


async def experiment_history_points(redis: aioredis.Redis, tenant: str, name: str) -> int:
    from gateway import experiment_history

    return len(await experiment_history.read(redis, await ExperimentStore(redis).get(tenant, name)))


async def test_a_guard_rail_overtaken_by_an_operator_changes_nothing_and_decides_next_round(
    redis: aioredis.Redis,
) -> None:
    store = ExperimentStore(redis)
    await store.create(_experiment("t", "tone", "bot", (50, 50), max_error_rate=0.1), by="test")
    await _counters(redis, "t", "tone", "treat", requests=100, errors=50)
    seen = await store.get("t", "tone")
    found = await guard_rails.results(redis, seen)
    await ExperimentStore(redis).set_weights("t", "tone", {"control": 90, "treat": 10}, by="admin")
    with pytest.raises(ExperimentConflict):
        await guard_rails.check(seen, rails_router(store), found)
    store.forget_cached()  # as the state watch does, in a gateway
    assert [a.weight for a in (await store.get("t", "tone")).arms] == [90, 10]
    await _counters(redis, "t", "tone", "treat", requests=120, errors=70)  # failing on under the new split
    await guard_rails.check_all(redis, rails_router(store), ["t"])  # the next round reads it again
    assert [a.weight for a in (await store.get("t", "tone")).arms] == [90, 0]


# 7: changes that race


async def test_a_change_from_a_stale_read_is_refused_whole(redis: aioredis.Redis) -> None:
    """A promotion read before another process changed the weights: its save is refused, alias and all."""
    store, other = ExperimentStore(redis), ExperimentStore(redis)
    await store.create(_experiment("t", "tone", "bot", (50, 50)), by="test")
    stale = await store._live("t", "tone")
    await other.set_weights("t", "tone", {"treat": 20}, by="other")
    promoted = stale.model_copy(update={"status": "promoted"})
    with pytest.raises(ExperimentConflict, match="another change came first"):
        await store._save(promoted, Change(at=time.time(), by="test", action="promote"), alias="bot@2")
    now = await store.get("t", "tone")
    assert (now.status, now.revision, [a.weight for a in now.arms]) == ("running", 1, [50, 20])
    assert await redis.hget(keys.aliases("t"), "bot") == PREFIX + "tone"
    with pytest.raises(ExperimentConflict):
        await store.set_status("t", "tone", "promoted", by="test", arm="treat", revision=0)


async def test_racing_changes_leave_one_winner(redis_server: RedisServer, redis: aioredis.Redis) -> None:
    """Two processes (two clients) at once: creates of one name, creates on one alias, promote + weights."""
    clients = [redis_client(redis_server.url, decode_responses=True) for _ in range(2)]
    one, two = (ExperimentStore(client) for client in clients)
    try:
        for trial in range(10):
            same_name = await asyncio.gather(
                one.create(_experiment("t", f"n{trial}", f"a{trial}", (50, 50)), by="one"),
                two.create(_experiment("t", f"n{trial}", f"b{trial}", (50, 50)), by="two"),
                return_exceptions=True,
            )
            same_alias = await asyncio.gather(
                one.create(_experiment("t", f"x{trial}", f"c{trial}", (50, 50)), by="one"),
                two.create(_experiment("t", f"y{trial}", f"c{trial}", (50, 50)), by="two"),
                return_exceptions=True,
            )
            for pair in (same_name, same_alias):
                assert sorted(type(x).__name__ for x in pair) == ["Experiment", "ExperimentConflict"], pair
            changes = await asyncio.gather(
                one.set_status("t", f"n{trial}", "promoted", by="one", arm="treat"),
                two.set_weights("t", f"n{trial}", {"treat": 20}, by="two"),
                return_exceptions=True,
            )
            assert sum(isinstance(x, Experiment) for x in changes) >= 1, changes
            found, alias = await one.get("t", f"n{trial}"), await redis.hget(keys.aliases("t"), found_alias(same_name))
            assert (found.status == "running") == (alias == PREFIX + f"n{trial}"), (found.status, alias)
    finally:
        for client in clients:
            await client.aclose()


def found_alias(created: list[Any]) -> str:
    return next(x.alias for x in created if isinstance(x, Experiment))


async def test_an_alias_running_an_experiment_is_neither_repointed_nor_deleted(redis: aioredis.Redis) -> None:
    store = ExperimentStore(redis)
    assert await store.set_alias("t", "bot", "bot@1") and not await store.set_alias("t", "gone", None)
    await store.create(_experiment("t", "tone", "bot", (50, 50)), by="test")
    for target in ("bot@2", None):
        with pytest.raises(ExperimentConflict, match="runs experiment `tone`"):
            await store.set_alias("t", "bot", target)
    await store.set_status("t", "tone", "paused", by="test")
    with pytest.raises(ExperimentConflict):
        await store.set_alias("t", "bot", None)
    await store.set_status("t", "tone", "rolled back", by="test")
    assert await redis.hget(keys.aliases("t"), "bot") == "bot@1"
    assert await store.set_alias("t", "bot", "bot@2") and await store.set_alias("t", "bot", None)


# 2, 5, 6: through the admin API


def _create(api: TestClient, name: str, alias: str, control: str, treat: str) -> None:
    arms = [{"name": "control", "target": control, "weight": 50}, {"name": "treat", "target": treat, "weight": 50}]
    created = api.post(
        "/admin/tenants/acme/experiments", json={"name": name, "alias": alias, "control": "control", "arms": arms}
    )
    assert created.status_code == 201, created.text


def test_every_route_of_an_unknown_tenant_is_its_404_and_of_a_bad_name_its_400(api: TestClient) -> None:
    """As on the other admin routes (an experiment's routes had answered `experiment_not_found` for any tenant)."""
    _create(api, "tone", "prod", BASE, "bot@1")
    routes = [("get", ""), ("get", "/tone"), ("get", "/tone/results"), ("get", "/tone/page"), ("post", "/tone/pause")]
    routes += [("post", "/tone/resume"), ("post", "/tone/stop"), ("post", "/tone/rollback")]
    bodies = [("put", "/tone/weights", {"weights": {"treat": 1}}), ("post", "/tone/promote", {"arm": "treat"})]
    bodies += [("post", "", {"name": "x", "alias": "y", "control": "a", "arms": []})]
    for method, path, *body in [*routes, *bodies]:
        for tenant, status, code in (("nosuch", 404, "tenant_not_found"), ("BAD!", 400, "invalid_tenant")):
            sent = getattr(api, method)(
                f"/admin/tenants/{tenant}/experiments{path}", **({"json": body[0]} if body else {})
            )
            refused(sent, status, code)
    assert api.get("/admin/tenants/acme/experiments/tone").json()["status"] == "running", "acme's: untouched"


def test_bad_weights_answer_400_in_the_envelope(api: TestClient) -> None:
    _create(api, "tone", "prod", BASE, "bot@1")
    url = "/admin/tenants/acme/experiments/tone/weights"
    for raw in ("-5", "NaN", "Infinity", "1e400", "1e308"):
        response = api.put(
            url, content=f'{{"weights": {{"treat": {raw}}}}}', headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", raw
    arms = [{"name": "a", "target": BASE, "weight": 1e308}, {"name": "b", "target": "bot@1", "weight": 1e308}]
    huge = api.post(
        "/admin/tenants/acme/experiments", json={"name": "huge", "alias": "big", "control": "a", "arms": arms}
    )
    assert huge.status_code == 400, huge.text
    assert api.put(url, json={"weights": {"treat": 10}}).json()["arms"][1]["weight"] == 10


def test_settings_that_are_not_finite_numbers_are_refused_and_nothing_is_stored(api: TestClient) -> None:
    """An infinite setting would be stored as null (JSON has no inf) and break the alias for good."""
    arms = json.dumps([{"name": "a", "target": BASE, "weight": 1}, {"name": "b", "target": "bot@1", "weight": 1}])
    for field, raw in (
        ("smallest_effect", "1e400"),
        ("smallest_effect", "Infinity"),
        ("smallest_effect", "2"),
        ("mixture_sd", "NaN"),
        ("alpha", "-Infinity"),
    ):
        body = f'{{"name": "inf", "alias": "odd", "control": "a", "arms": {arms}, "{field}": {raw}}}'
        response = api.post(
            "/admin/tenants/acme/experiments", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", raw
    assert api.get("/admin/tenants/acme/experiments").json()["data"] == []
    assert api.get("/admin/tenants/acme/aliases").status_code == 200
    with pytest.raises(ValidationError):
        Experiment(name="x", tenant="acme", alias="y", control="a", arms=[], smallest_effect=math.inf)


def test_versions_in_use_are_not_deleted_and_nothing_points_an_alias_at_a_missing_one(api: TestClient) -> None:
    tenant = "/admin/tenants/acme"
    assert api.put(f"{tenant}/aliases/prod", json={"target": "bot@1"}).status_code == 200
    _create(api, "tone", "prod", "bot@2", "bot@3")
    for version, user in (("bot@2", "arm control"), ("bot@3", "arm treat"), ("bot@1", "what a roll-back")):
        message = refused(api.delete(f"{tenant}/adapters/{version}"), 409, "version_in_use")
        assert "experiment `tone`" in message and user in message, message
    assert api.put(f"{tenant}/aliases/other", json={"target": BASE}).status_code == 200
    svc = api.app.state.services  # type: ignore[attr-defined]
    svc.registry.store("acme").remove("bot", 3)  # gone all the same (by hand, or a share withdrawn)
    svc.registry.invalidate("acme", "bot")
    message = refused(api.post(f"{tenant}/experiments/tone/promote", json={"arm": "treat"}), 409, "target_missing")
    assert "bot@3" in message
    svc.registry.store("acme").remove("bot", 1)
    svc.registry.invalidate("acme", "bot")
    refused(api.post(f"{tenant}/experiments/tone/rollback"), 409, "target_missing")
    assert api.get(f"{tenant}/experiments/tone").json()["status"] == "running"
    assert api.post(f"{tenant}/experiments/tone/stop").json()["status"] == "stopped", "stop stays possible"
    message = refused(api.delete(f"{tenant}/adapters/bot@2"), 409, "version_in_use")
    assert "alias `prod`" in message, "the alias serves control now"


def test_an_alias_in_an_experiment_moves_only_with_it(api: TestClient) -> None:
    tenant = "/admin/tenants/acme"
    assert api.put(f"{tenant}/aliases/prod", json={"target": BASE}).status_code == 200
    _create(api, "tone", "prod", BASE, "bot@1")
    message = refused(api.put(f"{tenant}/aliases/prod", json={"target": "bot@2"}), 409, "alias_in_experiment")
    assert "experiment `tone`" in message
    refused(api.delete(f"{tenant}/aliases/prod"), 409, "alias_in_experiment")
    arms = [{"name": "control", "target": BASE, "weight": 1}, {"name": "treat", "target": "bot@2", "weight": 1}]
    again = {"name": "tone2", "alias": "prod", "control": "control", "arms": arms}
    refused(api.post(f"{tenant}/experiments", json=again), 409, "experiment_conflict")
    assert api.post(f"{tenant}/experiments/tone/promote", json={"arm": "treat"}).status_code == 200
    assert api.put(f"{tenant}/aliases/prod", json={"target": "bot@2"}).status_code == 200
    assert api.delete(f"{tenant}/aliases/prod").status_code == 200


@pytest.mark.parametrize("verb", ["put", "delete"])
def test_an_alias_set_as_its_tenant_is_deleted_is_a_404(api: TestClient, verb: str, monkeypatch: Any) -> None:
    """Another process deletes the tenant after the route found it: refused, not a 500."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    set_alias = svc.experiments.set_alias

    async def deleted_first(tenant: str, alias: str, target: str | None) -> bool:
        await svc.redis.delete(keys.tenant(tenant))
        return bool(await set_alias(tenant, alias, target))

    monkeypatch.setattr(svc.experiments, "set_alias", deleted_first)
    sent = api.put("/admin/tenants/acme/aliases/prod", json={"target": BASE}) if verb == "put" else None
    refused(sent or api.delete("/admin/tenants/acme/aliases/prod"), 404, "tenant_not_found")


async def test_the_guard_rail_promotes_no_arm_whose_version_no_longer_serves(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """As the admin API refuses with target_missing: the winner's version is gone (a share withdrawn, say), so
    the alias is not pointed at it, and the experiment goes on."""
    await TenantStore(redis).create("zz")
    store = ExperimentStore(redis)
    await store.create(_experiment("zz", "canary", "bot", (50, 50), auto_promote=True, min_samples=10), by="test")
    await _counters(redis, "zz", "canary", "control", requests=500, rated=300, positive=90)
    await _counters(redis, "zz", "canary", "treat", requests=500, rated=300, positive=280)
    router = Router(BASE, Registry(tmp_path), PointerStore(redis), store)  # bot@2 is in no folder
    experiment = await store.get("zz", "canary")
    found = await guard_rails.results(redis, experiment)
    assert (found["verdict"], found["winner"]) == ("winner", "treat")
    assert await guard_rails.check(experiment, router, found) == [
        "treat not promoted: `bot@2` does not serve the tenant any more"
    ]
    assert (await store.get("zz", "canary")).status == "running"
    assert await redis.hget(keys.aliases("zz"), "bot") == PREFIX + "canary"


async def test_a_change_that_changes_nothing_is_not_recorded(redis: aioredis.Redis) -> None:
    """Weights as they are, a pause while paused, a resume while running: each bumped the revision (refusing other
    changes made from the read before) and added an audit entry."""
    store = ExperimentStore(redis)
    created = await store.create(_experiment("t", "tone", "bot", (50, 50)), by="test")
    assert (await store.set_weights("t", "tone", {}, by="test")).revision == created.revision
    assert (await store.set_weights("t", "tone", {"treat": 50}, by="test")).revision == created.revision
    assert (await store.set_status("t", "tone", "running", by="test")).revision == created.revision
    paused = await store.set_status("t", "tone", "paused", by="test")
    assert (await store.set_status("t", "tone", "paused", by="test")).revision == paused.revision
    assert [c.action for c in await store.audit("t", "tone")] == ["create", "pause"]


async def test_a_tenant_deleted_while_its_experiment_or_alias_is_made_gets_neither(redis: aioredis.Redis) -> None:
    """The tenant is deleted after the caller checked it (another process deleted it): the experiment and the alias
    are refused, and nothing of them is left for a tenant created again under the name."""
    tenants, store = TenantStore(redis), ExperimentStore(redis)
    await tenants.create("late")
    experiment = _experiment("late", "tone", "bot", (50, 50))
    await tenants.delete("late")
    with pytest.raises(TenantNotFound):
        await store.create(experiment, by="test")
    with pytest.raises(TenantNotFound):
        await store.set_alias("late", "prod", "m")
    left = [keys.experiments("late"), keys.aliases("late"), keys.experiment_audit("late", "tone")]
    assert await redis.exists(*left) == 0


async def test_a_change_of_an_ended_experiment_is_a_conflict(redis: aioredis.Redis) -> None:
    """As for the loser of two changes made at once when the winner ended it: read it again."""
    store = ExperimentStore(redis)
    await store.create(_experiment("t", "tone", "bot", (50, 50)), by="test")
    await store.set_status("t", "tone", "promoted", by="test", arm="treat")
    with pytest.raises(ExperimentConflict, match="has ended"):
        await store.set_status("t", "tone", "paused", by="test")
    with pytest.raises(ExperimentConflict, match="has ended"):
        await store.set_weights("t", "tone", {"control": 1}, by="test")
