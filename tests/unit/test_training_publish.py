"""What a retraining run improves on and what its canary is, read from (real) Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway.experiments import Arm, Experiment, ExperimentStore
from gateway.pointers import PointerStore
from training.config import RetrainConfig
from training.publish import RetrainRefused, canary, serving

pytestmark = pytest.mark.usefixtures("experiment_tenants")


async def test_the_alias_target_names_the_parent_and_the_new_versions_name(redis: aioredis.Redis) -> None:
    pointers, experiments = PointerStore(redis), ExperimentStore(redis)
    await pointers.set_alias("t", "bot", "helper@2")
    await pointers.set_alias("t", "plain", "SmolLM2-135M-Instruct")
    await pointers.set_alias("t", "borrowed", "other/helper@1")
    found = await serving(pointers, experiments, "t", "bot")
    assert (found.target, found.adapter_name, found.parent) == ("helper@2", "helper", "helper@2")
    found = await serving(pointers, experiments, "t", "plain")
    assert (found.adapter_name, found.parent) == ("plain-tuned", None), "from the base: a new adapter"
    found = await serving(pointers, experiments, "t", "borrowed")
    assert (found.adapter_name, found.parent) == ("borrowed-tuned", None), "a shared adapter is not ours to version"
    with pytest.raises(RetrainRefused, match="no alias `nope`"):
        await serving(pointers, experiments, "t", "nope")
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    await experiments.create(Experiment(name="e", tenant="t", alias="bot", control="a", arms=arms), by="test")
    pointers.forget_cached()
    with pytest.raises(RetrainRefused, match="in experiment `e` \\(running\\)"):
        await serving(pointers, experiments, "t", "bot")


async def test_the_canary_is_a_guarded_split_of_the_config(redis: aioredis.Redis) -> None:
    pointers = PointerStore(redis)
    await pointers.set_alias("t", "bot", "helper@2")
    before = await serving(pointers, ExperimentStore(redis), "t", "bot")
    config = RetrainConfig(canary_weight=20, canary_min_samples=30, canary_max_error_rate=0.1)
    experiment = canary("t", before, "helper@3", config, "retrain-x")
    assert [(a.name, a.target, a.weight) for a in experiment.arms] == [
        ("control", "helper@2", 80), ("candidate", "helper@3", 20)
    ]  # fmt: skip
    assert experiment.auto_promote and experiment.min_samples == 30 and experiment.max_error_rate == 0.1
    for rate in (1e-9, 1.0):  # every rate the config takes makes a canary (0 and 1.5 failed only at publish)
        edges = RetrainConfig(canary_max_error_rate=rate, canary_max_negative_rate=rate)
        assert canary("t", before, "helper@3", edges, "retrain-y").max_negative_rate == rate


async def test_an_earlier_runs_canary_rolled_back_by_its_guard_rails_is_ended_not_a_refusal(
    redis: aioredis.Redis,
) -> None:
    """The guard rails roll a candidate back by its weight (0) and leave the experiment running: every later run on
    the alias was refused until somebody ended it by hand. A canary still weighing its candidate, and any other
    experiment, still refuse."""
    pointers, experiments = PointerStore(redis), ExperimentStore(redis)
    await pointers.set_alias("t", "bot", "helper@2")
    before = await serving(pointers, experiments, "t", "bot")
    for name, weight in (("retrain-old", 0.0), ("retrain-live", 10.0)):
        await pointers.set_alias("t", "bot", "helper@2")
        rolled = canary("t", before, "helper@3", RetrainConfig(), name)
        rolled.arms[1] = Arm(name="candidate", target="helper@3", weight=weight)
        await experiments.create(rolled, by="test")
        pointers.forget_cached()
        if weight:
            with pytest.raises(RetrainRefused, match="in experiment `retrain-live` \\(running\\)"):
                await serving(pointers, experiments, "t", "bot")
            continue
        found = await serving(pointers, experiments, "t", "bot", by="retraining run new")
        assert (found.target, found.parent) == ("helper@2", "helper@2")
        ended = await experiments.get("t", name)
        assert ended.status == "rolled back" and (await experiments.audit("t", name))[-1].by == "retraining run new"
        pointers.forget_cached()
        assert (await pointers.of("t")).aliases["bot"] == "helper@2", "the alias serves what it served before"
