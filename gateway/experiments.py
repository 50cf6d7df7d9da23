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
import functools
import re
import time
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway import experiment_scripts, keys
from gateway.arm_signal import begin_period, restart_guard
from gateway.assignment import BUCKETS, allocate, reallocate
from gateway.tenants import TenantNotFound

PREFIX = "experiment:"
"""An alias target that names an experiment."""
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
Status = Literal["running", "paused", "stopped", "promoted", "rolled back"]
LIVE = ("running", "paused")
RUNNING = '"status":"running"'
"""How a running experiment's JSON says so (pydantic's compact JSON): what `running` looks for before parsing."""
MAX_AUDIT = 1000
"""Changes an experiment's audit log keeps, the latest: it is read whole by the admin API and the page."""
MAX_RUNNING = 16
"""Experiments a tenant runs (or has paused) at once: one guard-rail round judges every tenant's, so one tenant's
thousands of experiments (255 arms each) would hold back every other tenant's rollbacks."""
MAX_WEIGHT = 1e6
"""Weights are relative: up to a million is plenty (and their sum stays finite)."""
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False, description=f"0 to {MAX_WEIGHT:g}.")]


class ExperimentNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Experiment `{name}` does not exist.")


class InvalidExperiment(ValueError):
    """An experiment or a change of it is refused; the message says why."""


class TooManyExperiments(InvalidExperiment):
    """The tenant runs (or has paused) MAX_RUNNING experiments already."""

    def __init__(self, live: int) -> None:
        super().__init__(
            f"This tenant has {live} experiments running or paused, the most it may: stop or end one first."
        )


class ExperimentConflict(InvalidExperiment):
    """Refused for what is there now: the name or the alias is taken, or another change of the experiment
    came first (read it again and retry)."""


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, description="a-z 0-9 . _ -, up to 63, starting with a letter or digit.")
    """Checked in full when an experiment is created (`ExperimentStore.create`), not when one is read back: an
    earlier release took any name with one such character in it (pydantic's `pattern` searches)."""
    target: str = Field(min_length=1, description="An adapter version (name@V, owner/name@V) or the base model.")
    weight: Weight


class Change(BaseModel):
    at: float
    by: str
    action: str
    detail: str = ""


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # stored as JSON: inf would come back as null

    name: str
    tenant: str
    alias: str
    previous_target: str | None = None
    """What the alias pointed at before the experiment (a roll-back points it there again)."""
    arms: list[Arm]
    control: str
    status: Status = "running"
    revision: int = Field(0, ge=0, description="Bumped by every change; a change made from an older one is refused.")
    created: float = Field(default_factory=time.time)
    allocation: str = ""
    """Base64 of the bucket -> arm index map (gateway.assignment)."""
    alpha: float = Field(0.05, gt=0, lt=0.5, description="False-positive rate of a verdict, at any number of looks.")
    min_samples: int = Field(100, ge=10, description="Rated completions per arm before any verdict.")
    mixture_sd: float = Field(
        0.1, ge=1e-3, le=1, description="The effect size (in positive rate) the sequential test is tuned to."
    )
    smallest_effect: float = Field(
        0.02, gt=0, description="Differences (in positive rate) smaller than this do not matter."
    )
    auto_promote: bool = Field(False, description="Promote an arm that wins (always-valid, after min_samples).")
    max_error_rate: float | None = Field(
        None, gt=0, le=1, description="Roll back (weight 0) an arm whose error rate passes control's by more."
    )
    max_negative_rate: float | None = Field(
        None, gt=0, le=1, description="Roll back (weight 0) an arm whose share of negative ratings is higher."
    )
    guard_min_requests: int = Field(
        20,
        ge=1,
        description="Requests an arm serves (and ratings, for max_negative_rate) before a guard rail judges it.",
    )
    exposed_before: dict[str, int] = Field(
        default_factory=dict,
        description="Identified requests per arm when the split last changed (weights that moved buckets): the"
        " sample ratio test counts those since, against the weights now. A pause changes nothing here: requests"
        " served while paused count for no arm.",
    )
    rated_before: dict[str, tuple[int, float, float]] = Field(
        default_factory=dict,
        description="Each arm's ratings (count, sum, sum of squares) when the split last changed. Gateways of the "
        "release before compare on the totals less these; this one on the period its counters keep "
        "(gateway.arm_signal) while that period began at these (else as the release before did). Omitted from "
        "the stored JSON while empty (a gateway of an earlier release reads that record).",
    )

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
        if self.status not in LIVE:
            return self  # ended: no allocation kept (each took 13 KB, read by every guard-rail round and delete)
        if not self.allocation or len(base64.b64decode(self.allocation)) != BUCKETS:  # none yet, or a broken one
            self.allocation = base64.b64encode(allocate([arm.weight for arm in self.arms])).decode()
        return self

    @property
    def buckets(self) -> bytes:
        """The allocation, decoded once per allocation (routing reads it on every request)."""
        return _decoded(self.allocation)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise InvalidExperiment(f"Experiment `{self.name}` has no arm `{name}`.")

    @property
    def control_index(self) -> int:
        return [arm.name for arm in self.arms].index(self.control)


@functools.lru_cache(maxsize=256)
def _decoded(allocation: str) -> bytes:
    """An allocation's buckets. Cached by its text, whose hash Python keeps on the string: a cached experiment's
    lookup is one dict probe (a private attribute of the pydantic model went through its `__getattr__`)."""
    return base64.b64decode(allocation)


class ExperimentStore:
    """Experiments in Redis (decode_responses=True), cached per process until the state version moves."""

    def __init__(self, redis: aioredis.Redis, counters: aioredis.Redis | None = None) -> None:
        """`counters`: the Redis of the completion log, where the arms' counters are (the state Redis by default)."""
        self._redis = redis
        self._counters = counters or redis
        self._save_script = redis.register_script(experiment_scripts.SAVE)
        self._alias_script = redis.register_script(experiment_scripts.SET_ALIAS)
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
        return self.parsed(await self._redis.hgetall(keys.experiments(tenant)))

    async def running(self, tenant: str) -> list[Experiment]:
        """The tenant's running experiments, oldest first: the others are not parsed (a tenant keeps every ended
        one, a retraining run's canary each: the guard rails parsed them all, every round)."""
        raw = await self._redis.hgetall(keys.experiments(tenant))
        return [e for e in self.parsed({k: v for k, v in raw.items() if RUNNING in v}) if e.status == "running"]

    async def live(self, tenant: str) -> list[Experiment]:
        """The tenant's experiments running or paused."""
        return [e for e in await self.all(tenant) if e.status in LIVE]

    @staticmethod
    def parsed(raw: dict[str, str]) -> list[Experiment]:
        """The experiments of a tenant's hash (keys.experiments), oldest first."""
        return sorted((Experiment.model_validate_json(v) for v in raw.values()), key=lambda e: e.created)

    async def audit(self, tenant: str, name: str) -> list[Change]:
        return [
            Change.model_validate_json(raw)
            for raw in await self._redis.lrange(keys.experiment_audit(tenant, name), 0, -1)
        ]

    async def create(self, experiment: Experiment, by: str, expect_alias: str | None = None) -> Experiment:
        """Start it: its alias then points at it. ExperimentConflict when the name is taken or the alias
        already runs an experiment (also when another process got there first), or, given `expect_alias` (what
        the caller decided on, e.g. a canary's control), when the alias points elsewhere now."""
        if not NAME.fullmatch(experiment.name):
            raise InvalidExperiment(f"Invalid experiment name {experiment.name!r}: a-z 0-9 . _ -, up to 63.")
        for arm in experiment.arms:  # they are parts of Redis keys, of the completion index and of a header
            if not NAME.fullmatch(arm.name):
                raise InvalidExperiment(f"Invalid arm name {arm.name[:64]!r}: a-z 0-9 . _ -, up to 63.")
        if len(live := await self.live(experiment.tenant)) >= MAX_RUNNING:  # and again in the script
            raise TooManyExperiments(len(live))
        if expect_alias is None:
            expect_alias = await self._redis.hget(keys.aliases(experiment.tenant), experiment.alias)
        experiment.previous_target = expect_alias  # the script refuses (-1) unless the alias still points there
        # After a deletion of a tenant of its name (gateway.erasure's tombstone, by another host's clock maybe): the
        # experiment was taken for one of the deleted tenant's, and neither its history nor its periods were kept
        if deleted := await self._counters.get(keys.tenant_deleted(experiment.tenant)):
            at = (deleted.decode() if isinstance(deleted, bytes) else deleted).partition(" ")[0]
            experiment.created = max(experiment.created, float(at) + 0.001)
        arms = ", ".join(f"{a.name}={a.target}:{a.weight:g}" for a in experiment.arms)
        change = Change(at=time.time(), by=by, action="create", detail=arms)
        return await self._save(experiment, change, alias=PREFIX + experiment.name, new=True)

    async def set_weights(
        self,
        tenant: str,
        name: str,
        weights: dict[str, float],
        by: str,
        reason: str = "",
        revision: int | None = None,
    ) -> Experiment:
        """New weights (0 to MAX_WEIGHT, one above 0 at least): only the buckets the change needs move.
        `revision`: refuse (ExperimentConflict) unless the experiment is still at that revision."""
        experiment = await self._live(tenant, name, revision)
        unknown = set(weights) - {arm.name for arm in experiment.arms}
        if unknown:
            raise InvalidExperiment(f"No arm named {', '.join(sorted(unknown))} in `{name}`.")
        try:
            arms = [
                Arm.model_validate({**arm.model_dump(), "weight": weights.get(arm.name, arm.weight)})
                for arm in experiment.arms
            ]
        except ValidationError as exc:
            raise InvalidExperiment(f"A weight is a number from 0 to {MAX_WEIGHT:g}: {weights}") from exc
        if not any(arm.weight > 0 for arm in arms):
            raise InvalidExperiment("At least one arm needs a weight above 0.")
        if [arm.weight for arm in arms] == [arm.weight for arm in experiment.arms]:
            return experiment  # nothing changes: no revision, no audit entry
        buckets = reallocate(experiment.buckets, [arm.weight for arm in arms])
        update: dict[str, Any] = {"arms": arms, "allocation": base64.b64encode(buckets).decode()}
        if buckets != experiment.buckets:  # a new split: its sample ratio and comparisons begin now
            moved = {new.name for new, old in zip(arms, experiment.arms, strict=True) if new.weight != old.weight}
            update.update(await self._split_changed(experiment, moved))
        changed = experiment.model_copy(update=update)
        detail = ", ".join(f"{a.name}={a.weight:g}" for a in arms) + (f" ({reason})" if reason else "")
        return await self._save(changed, Change(at=time.time(), by=by, action="weights", detail=detail))

    async def set_status(
        self,
        tenant: str,
        name: str,
        status: Status,
        by: str,
        arm: str | None = None,
        reason: str = "",
        revision: int | None = None,
    ) -> Experiment:
        """pause / resume (running) / stop (the alias then serves control) / promote ARM / roll back.
        `revision`: refuse (ExperimentConflict) unless the experiment is still at that revision."""
        experiment = await self._live(tenant, name, revision)
        if status == experiment.status:  # pause while paused, resume while running: nothing changes
            return experiment
        alias = alias_target(experiment, status, arm)
        # The split stays as it was: paused requests count for no arm, and an ended experiment keeps the
        # results (and the comparison period) it ended with. Resumed, its guard rails judge what comes from here.
        if status == "running":
            arms = [a.name for a in experiment.arms]
            await restart_guard(self._counters, tenant, name, experiment.created, arms, experiment.control)
        ended = {} if status in LIVE else {"allocation": ""}
        changed = experiment.model_copy(update={"status": status, **ended})
        action = {"running": "resume", "paused": "pause", "stopped": "stop", "promoted": "promote"}.get(
            status, "rollback"
        )
        detail = reason or arm or ""
        return await self._save(changed, Change(at=time.time(), by=by, action=action, detail=detail), alias=alias)

    async def set_alias(self, tenant: str, alias: str, target: str | None) -> bool:
        """Point `alias` at `target` (None: delete it), unless it runs an experiment (ExperimentConflict:
        promote, roll back or stop it first). False: there was no such alias to delete."""
        script_keys = [keys.aliases(tenant), keys.state_version(), keys.experiments(tenant), keys.tenant(tenant)]
        done = await self._alias_script(keys=script_keys, args=[alias, target or ""])
        if done == -1:
            raise TenantNotFound(tenant)
        if isinstance(done, str):
            running = done.removeprefix(PREFIX)
            raise ExperimentConflict(
                f"Alias `{alias}` runs experiment `{running}`: promote, roll back or stop it first."
            )
        return bool(done)

    async def _split_changed(self, experiment: Experiment, moved: set[str]) -> dict[str, Any]:
        """A new comparison period, begun in the arms' counters before the change is saved (they may be in another
        Redis), and a new guard window for the arms whose weight `moved`. A change then refused by a conflict has
        restarted the period all the same, and its base is no longer the saved experiment's `rated_before`: its
        results are read the old way (arm_signal.counted_since) until the split next changes. `exposed_before`: each
        arm's identified requests so far (requests less anonymous ones, as the results count them)."""
        arms, created = [arm.name for arm in experiment.arms], experiment.created
        control = experiment.control
        period = await begin_period(self._counters, experiment.tenant, experiment.name, created, arms, moved, control)
        return {"exposed_before": period.exposed, "rated_before": period.rated}

    async def _live(self, tenant: str, name: str, revision: int | None = None) -> Experiment:
        raw = await self._redis.hget(keys.experiments(tenant), name)
        if raw is None:
            raise ExperimentNotFound(name)
        experiment = Experiment.model_validate_json(raw)
        if revision is not None and experiment.revision != revision:
            raise ExperimentConflict(f"Experiment `{name}` changed meanwhile (revision {experiment.revision}).")
        if experiment.status not in LIVE:  # a 409, as for the loser of two changes made at once (one ended it)
            raise ExperimentConflict(f"Experiment `{name}` has ended ({experiment.status}): it takes no other change.")
        return experiment

    async def _save(
        self, experiment: Experiment, change: Change, alias: str | None = None, new: bool = False
    ) -> Experiment:
        """Write the experiment (its revision bumped), its change to the audit log and its alias at once,
        if nobody changed it since it was read at `experiment.revision` (else ExperimentConflict). A change
        of an experiment that is gone meanwhile (its tenant deleted) is refused: ExperimentNotFound."""
        tenant, name = experiment.tenant, experiment.name
        saved = experiment.model_copy(update={"revision": 0 if new else experiment.revision + 1})
        script_keys = [keys.experiments(tenant), keys.experiment_audit(tenant, name), keys.aliases(tenant)]
        script_keys += [keys.state_version(), keys.tenant(tenant)]
        stored = saved.model_dump_json(exclude=None if saved.rated_before else {"rated_before"})
        args = [name, stored, change.model_dump_json(), alias or "", experiment.alias]
        mode = "create" if new else "change"
        args += [mode, str(experiment.revision), experiment.previous_target or "", str(MAX_AUDIT), str(MAX_RUNNING)]
        done = await self._save_script(keys=script_keys, args=args)
        self.forget_cached()
        if done == 0:
            raise ExperimentNotFound(name)
        if done == -4:
            raise TenantNotFound(tenant)
        if done == -2:
            raise ExperimentConflict(f"Experiment `{name}` already exists.")
        if done == -5:
            raise TooManyExperiments(MAX_RUNNING)
        if done == -3:
            running = (await self._redis.hget(keys.aliases(tenant), experiment.alias) or "").removeprefix(PREFIX)
            raise ExperimentConflict(f"Alias `{experiment.alias}` already runs experiment `{running}`; end it first.")
        if done == -1:
            what = "its alias moved" if new else "another change came first"
            raise ExperimentConflict(f"Experiment `{name}` was not saved: {what}. Read it again and retry.")
        return saved


def alias_target(experiment: Experiment, status: Status, arm: str | None = None) -> str | None:
    """Where the alias points once the experiment takes `status` (None: it keeps pointing at it)."""
    if status == "promoted":
        return experiment.arm(arm or "").target
    if status == "rolled back":
        return experiment.previous_target or experiment.arm(experiment.control).target
    if status == "stopped":
        return experiment.arm(experiment.control).target
    return None
