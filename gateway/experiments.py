"""A/B experiments behind a tenant's alias: two or more arms (adapter versions, or the base) with
weights, a sticky per-user split, and a lifecycle that ends in a promotion or a roll-back.

An experiment lives in Redis as one JSON document per tenant and name, with its bucket allocation
(gateway.assignment), and every change is appended to its audit log with who made it and when. While
it runs, its alias points at `experiment:NAME`; promoting an arm points the alias at that arm's
target, rolling back points it at the target it had before the experiment. Every change bumps the
state version that all gateway processes watch, so a change reaches every process within a second.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from gateway import keys
from gateway.assignment import allocate, reallocate

# KEYS: the tenant's experiments, the experiment's audit log, the tenant's aliases, the state version. ARGV:
# name, experiment JSON, change JSON, alias target ('' for none), alias, 1 when the experiment must exist
# already (a change, not a creation: one made as its tenant is deleted does not bring its keys back).
_SAVE = """
if ARGV[6] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[5], ARGV[4]) end
redis.call('INCR', KEYS[4])
return 1
"""

PREFIX = "experiment:"
"""An alias target that names an experiment."""
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
Status = Literal["running", "paused", "stopped", "promoted", "rolled back"]


class ExperimentNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Experiment `{name}` does not exist.")


class InvalidExperiment(ValueError):
    """An experiment or a change of it is refused; the message says why."""


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=NAME.pattern)
    target: str = Field(min_length=1, description="An adapter version (name@V, owner/name@V) or the base model.")
    weight: float = Field(ge=0)


class Change(BaseModel):
    at: float
    by: str
    action: str
    detail: str = ""


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    tenant: str
    alias: str
    previous_target: str | None = None
    """What the alias pointed at before the experiment (a roll-back points it there again)."""
    arms: list[Arm]
    control: str
    status: Status = "running"
    created: float = Field(default_factory=time.time)
    allocation: str = ""
    """Base64 of the bucket -> arm index map (gateway.assignment)."""
    alpha: float = Field(0.05, gt=0, lt=0.5, description="False-positive rate of a verdict, at any number of looks.")
    min_samples: int = Field(100, ge=10, description="Rated completions per arm before any verdict.")
    mixture_sd: float = Field(
        0.1, gt=0, description="The effect size (in positive rate) the sequential test is tuned to."
    )
    smallest_effect: float = Field(0.02, gt=0, description="Differences smaller than this do not matter.")
    auto_promote: bool = Field(False, description="Promote an arm that wins (always-valid, after min_samples).")
    max_error_rate: float | None = Field(None, gt=0, le=1, description="Roll back (weight 0) an arm erring more.")
    max_negative_rate: float | None = Field(
        None, gt=0, le=1, description="Roll back (weight 0) an arm whose share of negative ratings is higher."
    )
    guard_min_requests: int = Field(20, ge=1, description="Requests an arm serves before a guard rail judges it.")

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[Arm]) -> list[Arm]:
        if len(arms) < 2:
            raise ValueError("an experiment needs at least two arms")
        if len({arm.name for arm in arms}) != len(arms):
            raise ValueError("arm names must differ")
        if not any(arm.weight > 0 for arm in arms):
            raise ValueError("at least one arm needs a weight above 0")
        return arms

    @model_validator(mode="after")
    def _control(self) -> Experiment:
        if self.control not in {arm.name for arm in self.arms}:
            raise ValueError(f"control `{self.control}` is not one of the arms")
        if not self.allocation:
            self.allocation = base64.b64encode(allocate([arm.weight for arm in self.arms])).decode()
        return self

    _decoded: tuple[str, bytes] | None = PrivateAttr(None)

    @property
    def buckets(self) -> bytes:
        """The allocation, decoded once per allocation (routing reads it on every request)."""
        decoded = self._decoded
        if decoded is None or decoded[0] is not self.allocation:
            decoded = self._decoded = (self.allocation, base64.b64decode(self.allocation))
        return decoded[1]

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise InvalidExperiment(f"Experiment `{self.name}` has no arm `{name}`.")

    @property
    def control_index(self) -> int:
        return [arm.name for arm in self.arms].index(self.control)


class ExperimentStore:
    """Experiments in Redis (decode_responses=True), cached per process until the state version moves."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._save_script = redis.register_script(_SAVE)
        self._cache: dict[tuple[str, str], Experiment] = {}
        self._generation = 0

    def forget_cached(self) -> None:
        self._generation += 1
        self._cache.clear()

    async def get(self, tenant: str, name: str) -> Experiment:
        found = self._cache.get((tenant, name))
        if found is None:
            generation = self._generation
            raw = await self._redis.hget(keys.experiments(tenant), name)
            if raw is None:
                raise ExperimentNotFound(name)
            found = Experiment.model_validate_json(raw)
            if generation == self._generation:
                self._cache[(tenant, name)] = found
        return found

    async def all(self, tenant: str) -> list[Experiment]:
        raw = await self._redis.hgetall(keys.experiments(tenant))
        return sorted((Experiment.model_validate_json(v) for v in raw.values()), key=lambda e: e.created)

    async def audit(self, tenant: str, name: str) -> list[Change]:
        return [
            Change.model_validate_json(raw)
            for raw in await self._redis.lrange(keys.experiment_audit(tenant, name), 0, -1)
        ]

    async def create(self, experiment: Experiment, by: str) -> Experiment:
        if not NAME.fullmatch(experiment.name):
            raise InvalidExperiment(f"Invalid experiment name {experiment.name!r}: a-z 0-9 . _ -, up to 63.")
        if await self._redis.hexists(keys.experiments(experiment.tenant), experiment.name):
            raise InvalidExperiment(f"Experiment `{experiment.name}` already exists.")
        aliases = keys.aliases(experiment.tenant)
        experiment.previous_target = await self._redis.hget(aliases, experiment.alias)
        if experiment.previous_target and experiment.previous_target.startswith(PREFIX):
            running = experiment.previous_target.removeprefix(PREFIX)
            raise InvalidExperiment(f"Alias `{experiment.alias}` already runs experiment `{running}`; end it first.")
        arms = ", ".join(f"{a.name}={a.target}:{a.weight:g}" for a in experiment.arms)
        change = Change(at=time.time(), by=by, action="create", detail=arms)
        await self._save(experiment, change, alias=PREFIX + experiment.name, new=True)
        return experiment

    async def set_weights(
        self, tenant: str, name: str, weights: dict[str, float], by: str, reason: str = ""
    ) -> Experiment:
        experiment = await self._live(tenant, name)
        unknown = set(weights) - {arm.name for arm in experiment.arms}
        if unknown:
            raise InvalidExperiment(f"No arm named {', '.join(sorted(unknown))} in `{name}`.")
        arms = [arm.model_copy(update={"weight": weights.get(arm.name, arm.weight)}) for arm in experiment.arms]
        if not any(arm.weight > 0 for arm in arms):
            raise InvalidExperiment("At least one arm needs a weight above 0.")
        buckets = reallocate(experiment.buckets, [arm.weight for arm in arms])
        changed = experiment.model_copy(update={"arms": arms, "allocation": base64.b64encode(buckets).decode()})
        detail = ", ".join(f"{a.name}={a.weight:g}" for a in arms) + (f" ({reason})" if reason else "")
        await self._save(changed, Change(at=time.time(), by=by, action="weights", detail=detail))
        return changed

    async def set_status(
        self, tenant: str, name: str, status: Status, by: str, arm: str | None = None, reason: str = ""
    ) -> Experiment:
        """pause / resume (running) / stop (the alias then serves control) / promote ARM / roll back."""
        experiment = await self._live(tenant, name)
        alias: str | None = None
        if status == "promoted":
            alias = experiment.arm(arm or "").target
        elif status == "rolled back":
            alias = experiment.previous_target or experiment.arm(experiment.control).target
        elif status == "stopped":
            alias = experiment.arm(experiment.control).target
        changed = experiment.model_copy(update={"status": status})
        action = {"running": "resume", "paused": "pause", "stopped": "stop", "promoted": "promote"}.get(
            status, "rollback"
        )
        detail = reason or arm or ""
        await self._save(changed, Change(at=time.time(), by=by, action=action, detail=detail), alias=alias)
        return changed

    async def _live(self, tenant: str, name: str) -> Experiment:
        raw = await self._redis.hget(keys.experiments(tenant), name)
        if raw is None:
            raise ExperimentNotFound(name)
        experiment = Experiment.model_validate_json(raw)
        if experiment.status not in ("running", "paused"):
            raise InvalidExperiment(f"Experiment `{name}` has ended ({experiment.status}).")
        return experiment

    async def _save(self, experiment: Experiment, change: Change, alias: str | None = None, new: bool = False) -> None:
        """Write the experiment, its change to the audit log and its alias at once. A change of an experiment
        that is gone meanwhile (its tenant deleted) is refused: ExperimentNotFound."""
        tenant, name = experiment.tenant, experiment.name
        script_keys = [keys.experiments(tenant), keys.experiment_audit(tenant, name), keys.aliases(tenant)]
        script_keys.append(keys.state_version())
        args = [name, experiment.model_dump_json(), change.model_dump_json(), alias or "", experiment.alias]
        saved = await self._save_script(keys=script_keys, args=[*args, "0" if new else "1"])
        self.forget_cached()
        if not saved:
            raise ExperimentNotFound(name)


def parse_arm(spec: str) -> Arm:
    """`name=target:weight` (the CLI's --arm)."""
    name, _, rest = spec.partition("=")
    target, _, weight = rest.rpartition(":")
    try:
        return Arm(name=name, target=target, weight=float(weight))
    except ValueError as exc:
        raise InvalidExperiment(
            f"--arm must be NAME=TARGET:WEIGHT (e.g. treatment=support-bot@2:10), not {spec!r}"
        ) from exc
