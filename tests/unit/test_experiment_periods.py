"""An experiment's split changes (weights, pause, resume) without ruining its results: requests served while it
is paused are not counted in it, and the sample ratio test counts what came since the last change (real Redis)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from gateway import keys
from gateway.assignment import BUCKETS, shares
from gateway.experiment_results import results
from gateway.experiments import Arm, Experiment, ExperimentStore
from gateway.routing import Router
from tests.conftest import RedisServer
from tests.unit.admin_api import BASE

ARMS = [Arm(name="a", target="helper@1", weight=90), Arm(name="b", target="helper@2", weight=10)]

pytestmark = pytest.mark.usefixtures("experiment_tenants")


async def served(redis: aioredis.Redis, arm: str, requests: int, rated: int = 0, positive: int = 0) -> None:
    counters = keys.arm_counters("t", "e", arm)
    await redis.hincrby(counters, "requests", requests)
    for field, count in (("rated", rated), ("positive_sum", positive), ("positive_squares", positive)):
        await redis.hincrbyfloat(counters, field, count)


async def test_a_new_split_is_tested_from_when_it_began(redis: aioredis.Redis) -> None:
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=ARMS), by="test")
    await served(redis, "a", 900, 300, 100)  # exactly 90/10 ...
    await served(redis, "b", 100, 100, 60)
    halves = await store.set_weights("t", "e", {"a": 50, "b": 50}, "test")
    await served(redis, "a", 100)  # ... then exactly 50/50
    await served(redis, "b", 100)
    found = await results(redis, halves)
    assert found["sample_ratio_p"] == 1.0 and found["verdict"] != "sample ratio mismatch"
    await served(redis, "a", 300)  # 400 / 100 under 50/50: a real mismatch is still found
    assert (await results(redis, halves))["verdict"] == "sample ratio mismatch"


async def test_requests_served_while_paused_count_for_no_arm(redis: aioredis.Redis) -> None:
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=ARMS), by="test")
    router = Router("base", None, None, store)  # type: ignore[arg-type]
    await store.set_status("t", "e", "paused", "test")
    assert await router._arm("t", "e", "someone") == (None, "a", "helper@1"), "control serves, uncounted"
    await store.set_status("t", "e", "running", "test")
    experiment, arm, _ = await router._arm("t", "e", "someone")
    assert experiment == "e" and arm in ("a", "b")


@pytest.mark.parametrize("mixture_sd", [1e-200, 0.0, 5.0])
def test_a_mixture_sd_its_results_could_not_use_is_refused(api: TestClient, mixture_sd: float) -> None:
    """1e-200 squared is 0: the results (and the page, and the guard rails) divided by it."""
    arms = [{"name": "control", "target": BASE, "weight": 1}, {"name": "treat", "target": "bot@2", "weight": 1}]
    new = {"name": "tone", "alias": "beta", "control": "control", "arms": arms, "mixture_sd": mixture_sd}
    answer = api.post("/admin/tenants/acme/experiments", json=new)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "mixture_sd", answer.text


async def test_the_split_change_counts_arms_in_the_records_redis(redis: aioredis.Redis, own_redis: RedisServer) -> None:
    """With the completion log in a Redis of its own (LORAGATE_RECORDS_REDIS_URL), the arms' counters are read
    there when the split changes: before, they were read from the state Redis as 0 and every request from before
    the change counted against the new split (a sample ratio mismatch for good)."""
    records = aioredis.from_url(own_redis.url, decode_responses=True)
    store = ExperimentStore(redis, records)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=ARMS), by="test")
    await served(records, "a", 900, 300, 100)
    await served(records, "b", 100, 100, 60)
    halves = await store.set_weights("t", "e", {"a": 50, "b": 50}, "test")
    assert halves.exposed_before == {"a": 900, "b": 100}
    await served(records, "a", 100)
    await served(records, "b", 100)
    assert (await results(records, halves))["verdict"] != "sample ratio mismatch"
    await records.aclose()


async def test_with_more_arms_each_comparison_is_stricter(redis: aioredis.Redis) -> None:
    """Each arm compared with control at alpha / (arms compared) (Bonferroni): with k arms, a false winner for
    auto-promotion to act on stays within alpha, not k * alpha."""
    widths = []
    for name, arms in (("two", ARMS), ("three", [*ARMS, Arm(name="c", target="helper@3", weight=10)])):
        experiment = Experiment(name=name, tenant="t", alias=name, control="a", arms=arms)
        for arm, positive in (("a", 100), ("b", 60), ("c", 50)):
            counters = keys.arm_counters("t", name, arm)
            await redis.hset(counters, mapping={"requests": 300, "rated": 200})
            await redis.hset(counters, mapping={"positive_sum": positive, "positive_squares": positive})
        found = await results(redis, experiment)
        low, high = next(d["always_valid"] for d in found["differences"] if d["arm"] == "b")
        widths.append(high - low)
    assert widths[1] > widths[0] * 1.02, widths


def test_an_arm_with_a_weight_gets_users_however_small() -> None:
    assert shares([1e6, 1]) == [BUCKETS - 1, 1]
    assert shares([1e6, 0]) == [BUCKETS, 0]


async def test_an_ended_experiment_keeps_no_allocation(redis: aioredis.Redis) -> None:
    """Ended experiments are kept (audit, results) and read by every guard-rail round and version delete: without
    their 10,000-bucket allocation (13 KB of JSON each)."""
    store = ExperimentStore(redis)
    await store.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=ARMS), by="test")
    assert len(await redis.hget(keys.experiments("t"), "e") or "") > 13_000
    await store.set_status("t", "e", "stopped", "test")
    assert len(await redis.hget(keys.experiments("t"), "e") or "") < 2_000
    store.forget_cached()
    stopped = await store.get("t", "e")
    assert stopped.status == "stopped" and [a.weight for a in stopped.arms] == [90, 10]
