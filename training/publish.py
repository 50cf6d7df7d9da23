"""From a trained adapter to a version clients get: staged as a candidate, published, canaried.

Training writes only through the adapter registry (adapters.store):
1. `stage`: the trained folder becomes the next version of the adapter the alias serves, **unlisted**:
   no client sees or calls it; only the tenant's `training` keys, by its exact `name@V`, so the eval
   gate can ask it through the real gateway and vLLM.
2. `publish`: a candidate that passed the gate is listed, its manifest's provenance completed with
   the eval's metrics (the weights and their sha256 are those evaluated). `discard` removes one that
   did not; version numbers are never reused either way. Before it, `still_serving` checks that the
   alias serves what the run measured the candidate against, and `hold_bare_name` pins the bare
   adapter name to what it serves now: listed, the candidate is its latest version, which unpinned
   callers of the name would otherwise get at once.
3. `start_canary`: an experiment on the alias (gateway.experiments) between what it served (control)
   and the new version, with the guard rails that promote it or roll it back by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest, check_name
from adapters.store import AdapterNotFound, AdapterStore
from adapters.validate import BaseModelSpec
from gateway import version_guard
from gateway.experiments import PREFIX as EXPERIMENT
from gateway.experiments import Arm, Experiment, ExperimentNotFound, ExperimentStore
from gateway.pointers import PointerStore
from gateway.routing import Router
from training.config import RetrainConfig

PIN_TRIES = 3
"""How often `hold_bare_name` reads the pin again when someone moved it between its read and its write."""


class RetrainRefused(ValueError):
    """The run cannot go on as asked; the message says why and what to do."""


CANARY_PREFIX = "retrain-"
"""A run's canary experiment is named this and its run id (`Run.canary_name`)."""


@dataclass(frozen=True)
class Serving:
    """What an alias serves before the run, and the adapter name its new version takes."""

    alias: str
    target: str
    """`name@V` of one of the tenant's versions, or the base model's name."""
    adapter_name: str
    parent: str | None
    """The version the candidate improves on (None: the base)."""


async def serving(
    pointers: PointerStore, experiments: ExperimentStore, tenant: str, alias: str, by: str = "retraining"
) -> Serving:
    """The alias's current target; refused when it has none or is in a running experiment, but for an earlier
    run's canary whose guard rails rolled its candidate back (weight 0, the experiment left running): that one is
    rolled back (the alias then serves what it served before the canary, as every request did already), or a
    retraining job on a schedule was refused until somebody ended it by hand."""
    aliases = (await pointers.of(tenant)).aliases
    target = aliases.get(alias)
    if target is None:
        raise RetrainRefused(
            f"Tenant {tenant} has no alias `{alias}`: create it first "
            f"(loragate aliases set {alias} TARGET --tenant {tenant})."
        )
    if target.startswith(EXPERIMENT):
        name = target.removeprefix(EXPERIMENT)
        found = await experiments.get(tenant, name)
        if _rolled_back_canary(found):
            reason = "its candidate was rolled back by the guard rails; a new retraining run starts"
            found = await experiments.set_status(
                tenant, name, "rolled back", by, reason=reason, revision=found.revision
            )
        if found.status in ("running", "paused"):
            raise RetrainRefused(
                f"Alias `{alias}` is in experiment `{name}` ({found.status}): promote, roll back or stop it first."
            )
        target = found.arm(found.control).target
    ref = target.partition("/")[2] if "/" in target else target
    if "@" in ref and "/" not in target:
        return Serving(alias, target, AdapterRef.parse(ref).name, target)
    name = check_name(f"{alias}-tuned")
    if name in aliases:  # an adapter of that name would freeze that alias (and hide)
        raise RetrainRefused(alias_named(tenant, name, alias))
    return Serving(alias, target, name, None)


def alias_named(tenant: str, name: str, alias: str) -> str:
    """Why a candidate cannot be staged under `name`, the adapter name a run on `alias` takes."""
    return (
        f"Tenant {tenant} has an alias `{name}`, the name of the adapter a retraining run on `{alias}` trains (it "
        f"serves the base model or another tenant's adapter): delete or rename that alias and ask again, or point "
        f"`{alias}` at a version of an adapter of {tenant}'s and start a new run."
    )


def _rolled_back_canary(experiment: Experiment) -> bool:
    """A retraining run's canary, running with every arm but control at weight 0 (rolled back)."""
    others = [arm for arm in experiment.arms if arm.name != experiment.control]
    canary = experiment.name.startswith(CANARY_PREFIX) and experiment.status == "running"
    return canary and bool(others) and all(arm.weight == 0 for arm in others)


async def still_serving(
    pointers: PointerStore, experiments: ExperimentStore, tenant: str, before: Serving, listed: str | None = None
) -> str:
    """Refuse (RetrainRefused, nothing changed) when the alias no longer serves what the run found when it built
    its dataset: the canary's control arm would send the alias's traffic back to `before.target`, undoing whoever
    repointed it, and the eval measured the candidate against `before.target`, not against what it serves now.
    Returns the alias's target as stored: the canary starts only if the alias still points there then. `listed`:
    the candidate's version, listed by an earlier try whose canary did not start."""
    now = await serving(pointers, experiments, tenant, before.alias)
    if now.target != before.target:
        raise RetrainRefused(
            f"Alias `{before.alias}` serves {now.target} now, not {before.target} as when the run built its dataset: "
            f"its canary would send the alias's traffic back to {before.target}, and its eval did not measure the "
            f"candidate against {now.target}. "
            + (
                f"{listed} is listed (its bare name pinned to what it served) but has no canary: point the alias "
                f"at {before.target} again and `train publish --run` starts it."
                if listed
                else f"Nothing was published. Point the alias at {before.target} again and ask again (after `train "
                "run`, which removed its candidate, `train eval --run` stages it again), or start a new run."
            )
        )
    stored = (await pointers.of(tenant)).aliases.get(before.alias)
    assert stored is not None  # `serving` found it
    return stored


async def hold_bare_name(
    pointers: PointerStore,
    store: AdapterStore,
    tenant: str,
    name: str,
    intend: Callable[[Manifest], None] | None = None,
) -> Manifest | None:
    """Pin the bare adapter `name` to the version it serves now, unless a pin already holds it there; returns that
    version (None: nothing to hold). Listed, a candidate is the name's latest version, which every unpinned caller
    of `name` (and every tenant it is shared with: they resolve it with its owner's pins) would get at once and at
    100%, whatever the canary's split. A name with no listed version serves no one yet, and is not pinned. The pin
    is written only while the name is pinned as it was read (an operator's pin meanwhile is read again); `intend` is
    told the version before each write (a write whose reply is lost may have happened). Done under the adapter's
    lock, as every pin is (gateway.version_guard): a delete of the version cannot come between its read and the pin."""
    async with version_guard.holding(pointers.redis, [(tenant, name)], tenant):
        for _ in range(PIN_TRIES):
            pinned = (await pointers.of(tenant)).pins.get(name)
            try:
                now = await asyncio.to_thread(store.resolve, AdapterRef(name), pinned)
            except AdapterNotFound:
                return None
            if now.version == pinned:
                return None
            if intend is not None:
                intend(now)
            if await pointers.pin_if(tenant, name, pinned, now.version):
                return now
    raise RetrainRefused(f"The pin of `{name}` kept moving while the run tried to hold it: ask again.")


async def release_bare_name(pointers: PointerStore, store: AdapterStore, tenant: str, held: str) -> bool:
    """Undo `hold_bare_name` for a candidate that was not listed: unpin the name, only where that changes nothing
    (the name's latest listed version is still `held`, `name@V`: another run's listed candidate, or this one's, keeps
    its pin) and only if it is still pinned where the run pinned it (an operator's pin since stays)."""
    ref = AdapterRef.parse(held)
    async with version_guard.holding(pointers.redis, [(tenant, ref.name)], tenant):
        try:
            latest = await asyncio.to_thread(store.resolve, AdapterRef(ref.name), None)
        except AdapterNotFound:
            return False
        return latest.version == ref.version and await pointers.pin_if(tenant, ref.name, ref.version, None)


async def canary_started(experiments: ExperimentStore, tenant: str, name: str) -> bool:
    """Whether the run's canary exists already (an earlier try started it, then failed before saying so)."""
    try:
        await experiments.get(tenant, name)
    except ExperimentNotFound:
        return False
    return True


def stage(
    store: AdapterStore, adapter_dir: Path, name: str, base: BaseModelSpec, max_rank: int, provenance: dict[str, Any]
) -> Manifest:
    """The trained adapter as an unlisted candidate version (validated like any upload). File work:
    callers on an event loop run it in a thread."""
    return store.add(adapter_dir, name, base, max_rank, origin=str(adapter_dir), listed=False, provenance=provenance)


def publish(store: AdapterStore, candidate: Manifest, provenance: dict[str, Any]) -> Manifest:
    """List a candidate that passed the gate, its provenance completed (file work: run in a thread)."""
    return store.publish(candidate.name, candidate.version, provenance)


def discard(store: AdapterStore, candidate: Manifest) -> None:
    """Remove a candidate that failed the gate or whose run failed; gone already is fine."""
    try:
        if not store.manifest(candidate.name, candidate.version).listed:
            store.remove(candidate.name, candidate.version)
    except AdapterNotFound:
        pass


def canary(tenant: str, before: Serving, version: str, config: RetrainConfig, name: str) -> Experiment:
    """The canary experiment on the alias (validated, not started): control keeps `before.target`,
    `version` gets `config.canary_weight` percent, and the guard rails promote it when it wins or roll it
    back when it errs or is rated down."""
    arms = [
        Arm(name="control", target=before.target, weight=100 - config.canary_weight),
        Arm(name="candidate", target=version, weight=config.canary_weight),
    ]
    return Experiment(
        name=name,
        tenant=tenant,
        alias=before.alias,
        control="control",
        arms=arms,
        min_samples=config.canary_min_samples,
        auto_promote=True,
        max_error_rate=config.canary_max_error_rate,
        max_negative_rate=config.canary_max_negative_rate,
        guard_min_requests=max(5, config.canary_min_samples // 2),
    )


async def start_canary(
    redis: aioredis.Redis, router: Router, experiment: Experiment, version: Manifest, by: str, expect_alias: str
) -> Experiment:
    """Start the canary of a published version (its alias then routes through the experiment), holding its
    arms' adapters (gateway.version_guard) while it checks that both still exist, as the admin API does; only
    while the alias still points at `expect_alias` (`still_serving`), or ExperimentConflict."""
    if not version.listed:
        raise InvalidAdapter(f"{version.ref} is not published: a canary serves clients.")
    try:
        async with version_guard.pointing_at(redis, router, [a.target for a in experiment.arms], experiment.tenant):
            return await router.experiments.create(experiment, by, expect_alias=expect_alias)
    except version_guard.TargetMissing as exc:
        raise InvalidAdapter(f"The canary cannot start: `{exc.target}` does not exist any more.") from exc
