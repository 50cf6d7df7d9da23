"""An experiment's results over time: the points its page plots (gateway.experiment_page).

The guard-rail loop (gateway.guard_rails) takes one point per round of every running experiment,
and keeps it only when something moved since the last one (a request, a rating or a weight), so an
idle experiment adds nothing. A point holds, per arm, the cumulative exposures, the positive rate
with its interval, and each arm's difference from control with its always-valid interval.

At most MAX_POINTS are kept per experiment: past that, every other old point is dropped, so the
history always spans the whole experiment, at a resolution that halves as it grows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from gateway import keys
from gateway.experiments import Experiment

MAX_POINTS = 1000


def point(experiment: Experiment, results: dict[str, Any], at: float | None = None) -> dict[str, Any]:
    """The point of these results (gateway.experiment_results.results), stamped `at` (now by default)."""
    arms = {
        name: {
            "requests": arm["requests"],
            "rated": arm["rated"],
            "positive_rate": arm["positive_rate"],
            "interval": arm["positive_interval"],
            "weight": experiment.arm(name).weight,
        }
        for name, arm in results["arms"].items()
    }
    differences = {d["arm"]: {"diff": d["diff"], "always_valid": d["always_valid"]} for d in results["differences"]}
    return {
        "at": round(time.time() if at is None else at, 3),
        "arms": arms,
        "differences": differences,
        "verdict": results["verdict"],
    }


def _moved(last: dict[str, Any], new: dict[str, Any]) -> bool:
    def state(p: dict[str, Any]) -> list[tuple[str, int, int, float]]:
        return sorted((name, a["requests"], a["rated"], a["weight"]) for name, a in p["arms"].items())

    return state(last) != state(new)


_THIN = """
local kept = redis.call('LRANGE', KEYS[1], 0, -1)
if #kept <= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
local batch = {}
for i = 1, #kept - 1, 2 do
  batch[#batch + 1] = kept[i]
  if #batch == 500 then redis.call('RPUSH', KEYS[1], unpack(batch)); batch = {} end
end
batch[#batch + 1] = kept[#kept]
redis.call('RPUSH', KEYS[1], unpack(batch))
return 1
"""
"""Drop every other point but the last (the same span at half the resolution), in one step: a point another
process appends meanwhile is neither lost nor copied."""


# KEYS: the history, its tenant's deletion tombstone (keys.tenant_deleted). ARGV: the point, when the experiment was
# created. Appended unless the experiment's tenant was deleted since (a guard-rail round that read the experiment
# just before: its point would bring the purged history back); returns the length, 0 if not appended.
_APPEND = """
local deleted = redis.call('GET', KEYS[2])
if deleted and tonumber(string.match(deleted, '^%S+')) >= tonumber(ARGV[2]) then return 0 end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""


async def record(redis: aioredis.Redis, experiment: Experiment, results: dict[str, Any]) -> bool:
    """Append the point of `results` unless nothing moved since the last; True when appended."""
    key = keys.experiment_history(experiment.tenant, experiment.name)
    new = point(experiment, results)
    last = await redis.lindex(key, -1)
    if last is not None and not _moved(json.loads(last), new):
        return False
    script_keys = [key, keys.tenant_deleted(experiment.tenant)]
    length = await redis.eval(
        _APPEND, 2, *script_keys, json.dumps(new, separators=(",", ":")), repr(experiment.created)
    )
    if not length:
        return False
    if length > MAX_POINTS:
        await redis.eval(_THIN, 1, key, MAX_POINTS)
    return True


async def read(redis: aioredis.Redis, experiment: Experiment) -> list[dict[str, Any]]:
    """Every kept point, oldest first."""
    found = await redis.lrange(keys.experiment_history(experiment.tenant, experiment.name), 0, -1)
    return [json.loads(raw) for raw in found]
