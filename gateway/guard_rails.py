"""Guard rails: what an experiment does by itself, when its owner asked for it.

Every `interval_s`, one gateway process (whichever takes a short Redis lock) reads the results of every
running experiment, adds them to its history (gateway.experiment_history: the page's chart) and, when
the experiment has guard rails, acts:
- an arm (not control) whose error rate passes control's by `max_error_rate`, or whose share of negative ratings is
  shown to pass `max_negative_rate` (its always-valid lower bound does, at the experiment's alpha, however
  many rounds look) and control's share, after `guard_min_requests`, is rolled back: its weight goes to 0, so
  its users move to the other arms, and the rest stay where they are;
- with `auto_promote`, an arm that wins (always-valid interval, after `min_samples`) is promoted: the
  alias points at its version and the experiment ends; never in the round that rolled an arm back;
- when a roll-back would leave no arm with a weight (control has none), the experiment is paused instead:
  every request goes to control, and an operator decides what comes next.
Each experiment is checked on its own: one that fails (or that another change overtook: the next round
decides again) does not hold the others up.
Each action is in the experiment's audit log, by "guard rail", with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import experiment_history, keys, version_guard
from gateway.experiment_results import results
from gateway.experiments import Experiment, ExperimentNotFound, ExperimentStore, InvalidExperiment
from gateway.routing import Router
from gateway.tenants import TenantStore
from gateway.verdict import share_lower_bound

log = logging.getLogger("loragate.experiments")
BY = "guard rail"


def _negative_share(figures: dict[str, Any]) -> float | None:
    rated, negative = figures["rated"], figures["negative"]
    return negative / rated if isinstance(rated, int) and isinstance(negative, int) and rated else None


def _breach(experiment: Experiment, arm: str, found: dict[str, Any]) -> str | None:
    """Why an arm must be rolled back, if it must, judged on its guard window (since its own weight last changed or
    the experiment was resumed: gateway.arm_signal) against control's figures over that window. Errors count beyond
    control's error rate: an outage that fails every arm alike (the engines unreachable for a moment) is not the
    arm's. Negative ratings count only when they are also worse than control's: a canary rated better than what it
    would replace is not rolled back for being imperfect."""
    figures, control = found["guard_window"], found["guard_control"]
    requests = figures["requests"]
    if arm == experiment.control or not isinstance(requests, int) or requests < experiment.guard_min_requests:
        return None
    errors, limit = figures["error_rate"], experiment.max_error_rate
    common = control["error_rate"] if isinstance(control.get("error_rate"), float) else 0.0
    if limit is not None and isinstance(errors, float) and errors - common > limit:
        beyond = f" beyond control's {common:.1%}" if common else ""
        return f"error rate {errors:.1%} > {limit:.1%}{beyond} after {requests} requests"
    share, baseline = _negative_share(figures), _negative_share(control)
    limit, rated = experiment.max_negative_rate, figures["rated"]
    enough = isinstance(rated, int) and rated >= experiment.guard_min_requests  # not one thumbs-down of one rating
    if limit is None or not enough or share is None or (baseline is not None and share <= baseline):
        return None
    low = share_lower_bound(figures["negative"], rated, experiment.alpha, experiment.mixture_sd)
    if low <= limit:  # above the limit by chance, maybe: an arm as good as control would be rolled back often
        return None
    versus = "" if baseline is None else f", control {baseline:.1%}"
    return f"negative ratings {share:.1%} (at least {low:.1%}) > {limit:.1%} of {rated}{versus}"


def guarded(experiment: Experiment) -> bool:
    return bool(experiment.auto_promote or experiment.max_error_rate or experiment.max_negative_rate)


async def check(experiment: Experiment, router: Router, found: dict[str, Any]) -> list[str]:
    """Act on one experiment's results (gateway.experiment_results); returns what was done. Every change is
    made from the revision the results were read at (another change first: ExperimentConflict, and the
    next round decides again). A round that rolls back an arm promotes nothing: the next round reads
    results without it."""
    live = {arm.name for arm in experiment.arms if arm.weight > 0}
    breaches = {
        arm: reason
        for arm, figures in found["arms"].items()
        if arm in live and (reason := _breach(experiment, arm, figures))
    }
    if breaches:
        return await _roll_back(experiment, router.experiments, breaches, live)
    winner = found["winner"]
    if not (experiment.auto_promote and found["verdict"] == "winner" and winner in live - {experiment.control}):
        return []
    diff = next(d for d in found["differences"] if d["arm"] == winner)
    low, high = (f"{x:+.3f}" if x is not None else "?" for x in diff["always_valid"])
    reason = f"{winner} wins: positive rate {diff['diff']:+.3f} vs control, always-valid [{low}, {high}]"
    tenant, name, revision = experiment.tenant, experiment.name, experiment.revision
    try:
        await version_guard.set_status(router, tenant, name, "promoted", BY, winner, reason=reason, revision=revision)
    except version_guard.TargetMissing as exc:
        return [f"{winner} not promoted: `{exc.target}` does not serve the tenant any more"]
    return [reason]


async def _roll_back(
    experiment: Experiment, store: ExperimentStore, breaches: dict[str, str], live: set[str]
) -> list[str]:
    """Weight 0 for the arms that breach. When no arm would keep a weight (control has none, and the
    arms that had one all breach), the experiment is paused instead: every request goes to control,
    which is what the roll-back means, and an operator decides what next (resume, weights, stop)."""
    tenant, name, revision = experiment.tenant, experiment.name, experiment.revision
    why = "; ".join(f"roll back {arm}: {reason}" for arm, reason in breaches.items())
    if live - set(breaches):
        zero = dict.fromkeys(breaches, 0.0)
        await store.set_weights(tenant, name, zero, BY, reason=why, revision=revision)
        return [f"rolled back {arm}: {reason}" for arm, reason in breaches.items()]
    why += f"; no other arm has a weight, so the experiment is paused (every request to {experiment.control})"
    await store.set_status(tenant, name, "paused", BY, reason=why, revision=revision)
    return [f"paused: {why}"]


async def check_all(records: aioredis.Redis, router: Router, tenants: list[str]) -> None:
    """One round: every running experiment of `tenants`, each on its own (one that fails is logged, and
    the others are checked all the same)."""
    for tenant in tenants:
        try:
            experiments = await router.experiments.running(tenant)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise  # Redis is down: the whole round waits for the next one
        except (ValidationError, RedisError) as exc:  # one tenant's (a key of another type): the others go on
            log.warning("guard rails: the experiments of %s cannot be read (%r); skipped", tenant, exc)
            continue
        for experiment in experiments:
            if experiment.status != "running":
                continue
            try:
                found = await results(records, experiment)
                await experiment_history.record(records, experiment, found)
                for action in await check(experiment, router, found) if guarded(experiment) else []:
                    log.warning("experiment %s/%s: %s", tenant, experiment.name, action)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise  # Redis is down: the whole round waits for the next one
            except RedisError as exc:  # this experiment's (a key of another type; Redis full): the others go on
                log.warning("guard rails: %s/%s: Redis refused: %r", tenant, experiment.name, exc)
            except (InvalidExperiment, ExperimentNotFound) as exc:  # changed, ended or gone meanwhile
                log.info("guard rails: %s/%s: %s (next round decides again)", tenant, experiment.name, exc)
            except Exception:
                log.exception("guard rails: experiment %s/%s failed; the others go on", tenant, experiment.name)


async def run(state: aioredis.Redis, records: aioredis.Redis, router: Router, interval_s: float) -> None:
    """Check every running experiment with guard rails, every `interval_s`, in one process at a time."""
    tenants = TenantStore(state)
    while True:
        await asyncio.sleep(interval_s)
        try:
            if not await state.set(keys.guard_rails_lock(), secrets.token_hex(8), nx=True, px=int(interval_s * 900)):
                continue
            await check_all(records, router, await tenants.names())
        except (RedisError, OSError) as exc:
            log.warning("guard rails skipped a round: %r", exc)
        except Exception:
            log.exception("guard rails failed a round; trying again next one")
