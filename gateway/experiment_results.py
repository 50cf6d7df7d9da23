"""What an experiment has shown so far, per arm and against control, read from the counters the recorder
and the feedback store keep in Redis (gateway.recorder, gateway.feedback): no log is rescanned.

Per arm: exposures (requests, distinct end users, requests without one), errors, latency p50/p95 (from
a histogram), tokens, and the feedback signal: rated completions, positive rate (the mean judgement,
thumbs up 1 / down 0 / a score scaled to 0..1), and the share of requests corrected. Then the sample
ratio check of identified requests against the weights, each arm's difference in positive rate from
control with a fixed and an always-valid interval, and the verdict (gateway.verdict).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import redis.asyncio as aioredis

from gateway import keys
from gateway.arm_signal import control_window, counted_since, guard_window
from gateway.assignment import shares
from gateway.experiments import Experiment
from gateway.record_builder import LATENCY_BUCKETS_MS
from gateway.verdict import Sample, difference, mean_interval, sample_ratio_mismatch, verdict


def percentile(counts: dict[int, int], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile q."""
    total = sum(counts.values())
    if not total:
        return None
    seen = 0
    for bound in sorted(counts):
        seen += counts[bound]
        if seen >= q * total:
            return float(bound)
    return float(max(counts))


def _since(counters: dict[str, str], number: dict[str, float], before: tuple[int, float, float] | None) -> Sample:
    """An arm's ratings since the split last changed, as its counters keep them (gateway.arm_signal); where they
    keep no period of their own (an earlier release's counters, or a split that release changed since), its totals
    less `before` (the experiment's snapshot at the change)."""
    if counted_since(counters, before):
        return Sample(
            int(number.get("since:rated", 0)),
            number.get("since:positive_sum", 0.0),
            number.get("since:positive_squares", 0.0),
        )
    rated = int(number.get("rated", 0))
    total, squares = number.get("positive_sum", 0.0), number.get("positive_squares", 0.0)
    before = before or (0, 0.0, 0.0)
    return Sample(max(rated - before[0], 0), total - before[1], squares - before[2])


def _numbers(counters: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in counters.items() if k != "since:base"}


def _with_rate(figures: dict[str, int]) -> dict[str, Any]:
    return {**figures, "error_rate": figures["errors"] / figures["requests"] if figures["requests"] else None}


def _arm(
    counters: dict[str, str], users: int, before: tuple[int, float, float] | None, control: dict[str, float]
) -> dict[str, Any]:
    """One arm's figures; `_sample`, its ratings since the split last changed, which the comparisons read;
    `guard_window` and `guard_control`, its own and `control`'s over its guard window, which the guard rails read."""
    number = _numbers(counters)
    requests = int(number.get("requests", 0))
    latency = {int(k.split(":")[1]): int(v) for k, v in number.items() if k.startswith("latency:")}
    rated = int(number.get("rated", 0))
    return {
        "requests": requests,
        "users": users,
        "anonymous": int(number.get("anonymous", 0)),
        "errors": int(number.get("errors", 0)),
        "error_rate": number.get("errors", 0) / requests if requests else None,
        "latency_p50_ms": percentile(latency, 0.5),
        "latency_p95_ms": percentile(latency, 0.95),
        "prompt_tokens": int(number.get("prompt_tokens", 0)),
        "completion_tokens": int(number.get("completion_tokens", 0)),
        "rated": rated,
        "positive_rate": number.get("positive_sum", 0) / rated if rated else None,
        "negative": int(number.get("negative", 0)),
        "corrected_share": number.get("corrected", 0) / requests if requests else None,
        "guard_window": _with_rate(guard_window(number)),
        "guard_control": _with_rate(control_window(control, number)),
        "_all": Sample(rated, number.get("positive_sum", 0.0), number.get("positive_squares", 0.0)),
        "_sample": _since(counters, number, before),
    }


def _bounds(low: float, high: float) -> list[float | None]:
    """An interval for JSON: an unbounded end (too few samples yet) is null."""
    return [x if math.isfinite(x) else None for x in (low, high)]


async def results(redis: aioredis.Redis, experiment: Experiment) -> dict[str, Any]:
    """An experiment's results from its arms' counters. The statistics run in a thread: with many arms (up to 255)
    they take a tenth of a second and more of CPU, which would hold up every request the process serves."""
    tenant, name = experiment.tenant, experiment.name
    async with redis.pipeline(transaction=False) as pipe:
        for arm in experiment.arms:
            pipe.hgetall(keys.arm_counters(tenant, name, arm.name))
            pipe.pfcount(keys.arm_users(tenant, name, arm.name))
        read = await pipe.execute()
    return await asyncio.to_thread(_summary, experiment, read)


def _summary(experiment: Experiment, read: list[Any]) -> dict[str, Any]:
    """The results, from each arm's counters and distinct users as `results` read them (two replies an arm)."""
    before = experiment.rated_before  # arms are compared on the ratings since the split last changed
    counts = _numbers(read[2 * [arm.name for arm in experiment.arms].index(experiment.control)])  # control's, once
    arms = {
        arm.name: _arm(read[2 * i], read[2 * i + 1], before.get(arm.name), counts)
        for i, arm in enumerate(experiment.arms)
    }
    since = experiment.exposed_before  # the split the weights describe began then
    identified = [max(a["requests"] - a["anonymous"] - since.get(arm, 0), 0) for arm, a in arms.items()]
    # each arm's buckets, as its allocation holds them (the weights rounded to whole buckets, one at least): from the
    # weights, which an ended experiment keeps (not its allocation: its results are those it ended with)
    srm_p = sample_ratio_mismatch(identified, shares([arm.weight for arm in experiment.arms]))
    control = arms[experiment.control]["_sample"]
    live = {arm.name for arm in experiment.arms if arm.weight > 0} | {experiment.control}  # rolled-back arms aside
    compared = [arm for arm in arms if arm != experiment.control and arm in live]
    # Bonferroni over every arm the experiment compares or compared (one rolled back since took its looks at this
    # level): a false winner among them stays within alpha.
    alpha = experiment.alpha / max(len(experiment.arms) - 1, 1)
    differences = [difference(arm, arms[arm]["_sample"], control, alpha, experiment.mixture_sd) for arm in compared]
    enough = all(found["_sample"].n >= experiment.min_samples for arm, found in arms.items() if arm in live)
    found, winner = verdict(experiment.control, differences, srm_p, enough, experiment.smallest_effect)
    for found_arm in arms.values():
        found_arm["rated_since_change"] = found_arm.pop("_sample").n
        found_arm["positive_interval"] = _bounds(*mean_interval(found_arm.pop("_all"), experiment.alpha))
    return {
        "object": "experiment.results",
        "experiment": experiment.name,
        "status": experiment.status,
        "control": experiment.control,
        "arms": arms,
        "sample_ratio_p": srm_p,
        "differences": [
            {
                "arm": d.arm,
                "diff": d.diff,
                "fixed": _bounds(d.fixed_low, d.fixed_high),
                "always_valid": _bounds(d.low, d.high),
            }
            for d in differences
        ],
        "verdict": found,
        "winner": winner,
        "alpha": experiment.alpha,
        "latency_buckets_ms": list(LATENCY_BUCKETS_MS),
    }
