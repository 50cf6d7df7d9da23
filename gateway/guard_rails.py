"""Guard rails: what an experiment does by itself, when its owner asked for it.

Every `interval_s`, one gateway process (whichever takes a short Redis lock) reads the results of every
running experiment, adds them to its history (gateway.experiment_history: the page's chart) and, when
the experiment has guard rails, acts:
- an arm (not control) whose error rate passes `max_error_rate`, or whose share of negative ratings
  passes `max_negative_rate`, after `guard_min_requests`, is rolled back: its weight goes to 0, so its
  users move to the other arms, and the rest stay where they are;
- with `auto_promote`, an arm that wins (always-valid interval, after `min_samples`) is promoted: the
  alias points at its version and the experiment ends.
Each action is in the experiment's audit log, by "guard rail", with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import experiment_history, keys
from gateway.experiment_results import results
from gateway.experiments import Experiment, ExperimentStore
from gateway.tenants import TenantStore

log = logging.getLogger("loragate.experiments")
BY = "guard rail"


def _negative_share(figures: dict[str, Any]) -> float | None:
    rated, negative = figures["rated"], figures["negative"]
    return negative / rated if isinstance(rated, int) and isinstance(negative, int) and rated else None


def _breach(experiment: Experiment, arm: str, figures: dict[str, Any], control: dict[str, Any]) -> str | None:
    """Why an arm must be rolled back, if it must. Negative ratings count only when they are also worse
    than control's: a canary rated better than what it would replace is not rolled back for being
    imperfect."""
    requests = figures["requests"]
    if arm == experiment.control or not isinstance(requests, int) or requests < experiment.guard_min_requests:
        return None
    errors = figures["error_rate"]
    if experiment.max_error_rate is not None and isinstance(errors, float) and errors > experiment.max_error_rate:
        return f"error rate {errors:.1%} > {experiment.max_error_rate:.1%} after {requests} requests"
    share, baseline = _negative_share(figures), _negative_share(control)
    limit = experiment.max_negative_rate
    if limit is not None and share is not None and share > limit and (baseline is None or share > baseline):
        versus = "" if baseline is None else f", control {baseline:.1%}"
        return f"negative ratings {share:.1%} > {limit:.1%} of {figures['rated']}{versus}"
    return None


def guarded(experiment: Experiment) -> bool:
    return bool(experiment.auto_promote or experiment.max_error_rate or experiment.max_negative_rate)


async def check(experiment: Experiment, store: ExperimentStore, found: dict[str, Any]) -> list[str]:
    """Act on one experiment's results (gateway.experiment_results); returns what was done."""
    done = []
    live = [arm.name for arm in experiment.arms if arm.weight > 0]
    for arm, figures in found["arms"].items():
        reason = _breach(experiment, arm, figures, found["arms"][experiment.control])
        if reason and arm in live:
            await store.set_weights(
                experiment.tenant, experiment.name, {arm: 0}, BY, reason=f"roll back {arm}: {reason}"
            )
            done.append(f"rolled back {arm}: {reason}")
    winner = found["winner"]
    if experiment.auto_promote and found["verdict"] == "winner" and winner and winner != experiment.control:
        diff = next(d for d in found["differences"] if d["arm"] == winner)
        low, high = (f"{x:+.3f}" if x is not None else "?" for x in diff["always_valid"])
        reason = f"{winner} wins: positive rate {diff['diff']:+.3f} vs control, always-valid [{low}, {high}]"
        await store.set_status(experiment.tenant, experiment.name, "promoted", BY, winner, reason=reason)
        done.append(reason)
    return done


async def run(state: aioredis.Redis, records: aioredis.Redis, store: ExperimentStore, interval_s: float) -> None:
    """Check every running experiment with guard rails, every `interval_s`, in one process at a time."""
    tenants = TenantStore(state)
    while True:
        await asyncio.sleep(interval_s)
        try:
            if not await state.set(keys.guard_rails_lock(), secrets.token_hex(8), nx=True, px=int(interval_s * 900)):
                continue
            for tenant in await tenants.names():
                for experiment in await store.all(tenant):
                    if experiment.status != "running":
                        continue
                    found = await results(records, experiment)
                    await experiment_history.record(records, experiment, found)
                    for action in await check(experiment, store, found) if guarded(experiment) else []:
                        log.warning("experiment %s/%s: %s", tenant, experiment.name, action)
        except (RedisError, OSError) as exc:
            log.warning("guard rails skipped a round: %r", exc)
        except Exception:
            log.exception("guard rails failed a round; trying again next one")
