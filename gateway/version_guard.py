"""A version is deleted only while nothing points at it, and nothing is pointed at a version being deleted.

Deleting `name@V` checks that no alias and no live experiment points at it (of its owner, or of a tenant it
is shared with), then removes it (the caller unloads it from the replicas after). Pointing an alias or an
experiment's arm at `name@V` checks that it exists, then writes the pointer. Run side by side, in two
gateway processes or in a gateway and the CLI, each check could pass before the other's write, leaving an
alias on a removed version. So both hold the adapter's lock (one Redis lock per owner and adapter name,
redis-py's `Lock`) from their check to their write: whichever comes second sees what the first did. The
pointer's check (`pointing_at`) reads the adapter's folder afresh, not this process's registry cache, which
may not have seen another process's delete yet.

A version added while its tenant is deleted (an upload, `loragate adapters add`, a retraining run's candidate:
each takes seconds to minutes) must not outlive the tenant, nor pass to a tenant created again under its name:
it is stored unlisted, and `keep_if_still_owned` removes it unless the same tenant (same `created`) still exists,
or lists it. A deletion that comes after that check removes the version itself: it deletes the tenant in Redis before it
sweeps the tenant's adapter folders.

A lock is held for the time of one check and write (a delete unloads the version from the replicas after
letting go); a process that dies holding it frees it after `HOLD_S`. A change that waits longer than
`WAIT_S` for it is refused (`AdapterBusy`: 409 `adapter_busy`), to be tried again. Targets are compared as
versions, not as text (`bot@02` is `bot@2`). A tenant refused a delete learns how many aliases and
experiments of the tenants it shares the adapter with use it, not their names; the operator sees them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import redis.asyncio as aioredis
from redis.exceptions import LockError

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest, check_name
from adapters.store import AdapterNotFound, AdapterStore
from gateway import keys
from gateway.errors import ModelNotFound
from gateway.experiments import LIVE, Experiment, ExperimentStore, Status, alias_target
from gateway.pointers import PointerStore
from gateway.routing import Route, Router
from gateway.tenants import Tenant, TenantNotFound, TenantStore, check_tenant_name

HOLD_S = 60.0
WAIT_S = 10.0

Adapter = tuple[str, str]
"""(owner tenant, adapter name)."""


class VersionInUse(Exception):
    """A version something serves: its message names what (or counts it, for other tenants)."""


class AdapterBusy(Exception):
    def __init__(self, adapter: Adapter, tenant: str) -> None:
        owner, name = adapter
        shown = name if owner == tenant else f"{owner}/{name}"
        super().__init__(f"Another change to `{shown}` is in progress; try again in a moment.")


def adapter_of(target: str, tenant: str) -> Adapter | None:
    """The adapter an alias target (`name@V`, `owner/name@V`) names, as `tenant` calls it; None for the base
    model and for targets that name no adapter at all (the check then refuses them, with no lock held)."""
    if "@" not in target:
        return None
    owner, slash, rest = target.partition("/")
    if not slash:
        owner, rest = tenant, target
    name = rest.partition("@")[0]
    try:
        check_tenant_name(owner)
        check_name(name)
    except ValueError:
        return None
    return owner, name


@asynccontextmanager
async def holding(
    redis: aioredis.Redis, adapters: Iterable[Adapter], tenant: str, wait_s: float | None = None
) -> AsyncIterator[None]:
    """Hold the locks of `adapters`, taken in one order everywhere (no two changes wait on each other), each waited
    for `wait_s` (default WAIT_S) at most, then AdapterBusy."""
    wait = WAIT_S if wait_s is None else wait_s  # read at the call: tests lower WAIT_S
    async with AsyncExitStack() as stack:
        for adapter in sorted(set(adapters)):
            lock = redis.lock(keys.adapter_lock(*adapter), timeout=HOLD_S, blocking_timeout=wait)
            if not await lock.acquire():
                raise AdapterBusy(adapter, tenant)
            stack.push_async_callback(_release, lock)
        yield


async def _release(lock: aioredis.lock.Lock) -> None:
    with suppress(LockError):  # held past HOLD_S: it has expired, and may be another's by now
        await lock.release()


class TargetMissing(Exception):
    """`targets[index]` is neither the base model nor a version the tenant can use (any more)."""

    def __init__(self, index: int, target: str) -> None:
        super().__init__(target)
        self.index, self.target = index, target


class NameTaken(Exception):
    """The alias to be written is the name of a model of its tenant: an adapter (a version of it stored, listed or
    not yet) or the base model; or an adapter being published is the name of an alias of its tenant."""


@asynccontextmanager
async def pointing_at(
    redis: aioredis.Redis, router: Router, targets: Sequence[str], tenant: str, alias: str | None = None
) -> AsyncIterator[list[Route]]:
    """Hold the locks of the adapters `targets` name and check that each still serves for `tenant` (reading
    their folders afresh, past the registry's cache, so every delete that has finished is seen): their
    routes, for the pointer to be written inside; TargetMissing for the first that does not. Another tenant's
    adapter that is not shared with `tenant` is refused before any lock is taken, as a name that does not
    exist is: its lock would say that it exists, and when its owner is changing it.

    With `alias`, the pointer to be written is that alias: the lock of the adapter of that name is held too, and
    NameTaken raised if the tenant has a model of that name, so that an upload of an adapter of the name cannot
    be published beside it (`publish_unaliased` holds the same lock)."""
    named = [adapter_of(target, tenant) for target in targets]
    shares = await router.pointers.shares()
    for index, adapter in enumerate(named):
        if adapter is not None and adapter[0] != tenant and tenant not in shares.get("/".join(adapter), ()):
            raise TargetMissing(index, targets[index])
    adapters = {adapter for adapter in named if adapter is not None}
    async with holding(redis, adapters | ({(tenant, alias)} if alias else set()), tenant):
        if alias is not None:
            taken: bool = await asyncio.to_thread(
                names_a_model, router.registry.store(tenant), router.base_model, alias
            )
            if taken:
                raise NameTaken(alias)
        for owner, name in adapters:
            router.registry.invalidate(owner, name)
        routes = []
        for index, target in enumerate(targets):
            try:
                routes.append(await router.target(target, tenant))
            except ModelNotFound as exc:
                raise TargetMissing(index, target) from exc
        yield routes


def names_a_model(store: AdapterStore, base_model: str, name: str) -> bool:
    """Whether `name` is the name of one of the store's tenant's models, which an alias may not take: the base model
    (in any case) or an adapter with a version on disk (listed or not yet), read afresh. Blocking (the disk)."""
    return name.lower() == base_model.lower() or bool(store.versions(name))


def _names(target: str | None, tenant: str, owner: str, ref: AdapterRef) -> bool:
    """Whether `target`, as `tenant` wrote it, names `owner`'s version `ref` (`bot@02` names `bot@2`)."""
    if target is None or adapter_of(target, tenant) != (owner, ref.name):
        return False
    try:
        return AdapterRef.parse(target.rpartition("/")[2]).version == ref.version
    except InvalidAdapter:
        return False


async def users(
    redis: aioredis.Redis, experiments: ExperimentStore, owner: str, ref: str, *, name_others: bool = True
) -> list[str]:
    """What serves `owner`'s version `ref` (name@V): the aliases and the live experiments (an arm, or what
    a roll-back would point the alias at) of `owner` and of the tenants it is shared with, read from Redis,
    not from this process's caches. Without `name_others` (a tenant's own key asks, not the operator),
    other tenants' aliases and experiments are counted, not named."""
    wanted = AdapterRef.parse(ref)
    shared = await redis.hget(keys.shares(), f"{owner}/{wanted.name}")
    found, elsewhere = [], 0
    for tenant in [owner, *sorted(set(json.loads(shared or "[]")) - {owner})]:
        async with redis.pipeline(transaction=True) as pipe:  # one moment: a promote or roll-back moves a use
            pipe.hgetall(keys.aliases(tenant))  # from an experiment to its alias at once, never between two reads
            pipe.hgetall(keys.experiments(tenant))
            raw_aliases, raw_experiments = await pipe.execute()
        aliases = sorted(raw_aliases.items())
        here = [f"alias `{alias}`" for alias, target in aliases if _names(target, tenant, owner, wanted)]
        for experiment in experiments.parsed(raw_experiments):
            if experiment.status not in LIVE:
                continue
            arms = [arm.name for arm in experiment.arms if _names(arm.target, tenant, owner, wanted)]
            if arms or _names(experiment.previous_target, tenant, owner, wanted):
                why = f"arm {', '.join(arms)}" if arms else "what a roll-back would point its alias at"
                here.append(f"experiment `{experiment.name}` ({why})")
        if tenant == owner:
            found += here
        elif name_others:
            found += [f"{user} of tenant {tenant}" for user in here]
        else:
            elsewhere += len(here)
    if elsewhere:
        found.append(f"{elsewhere} alias(es) or experiment(s) of tenants it is shared with")
    return found


def _in_use(ref: str, found: list[str]) -> str:
    """The refusal of a delete of `ref` while `found` (users) serve it."""
    return (
        f"`{ref}` is in use by {'; '.join(found)}: repoint the alias or the pin, or promote, roll back or stop the "
        "experiment first."
    )


def _other_listed(store: AdapterStore, name: str, version: int) -> bool:
    """Whether `name` has a listed version besides `version` (deleting a pinned `version` would move the bare name's
    callers there, at once and at 100%: a retraining run's candidate, say, in the middle of its canary)."""
    for other in store.versions(name):
        with suppress(AdapterNotFound):
            if other != version and store.manifest(name, other).listed:
                return True
    return False


async def delete_version(
    redis: aioredis.Redis,
    experiments: ExperimentStore,
    store: AdapterStore,
    tenant: str,
    ref: AdapterRef,
    *,
    name_others: bool,
) -> str:
    """Delete `tenant`'s version `ref` (name@V) from its `store` unless something serves it (VersionInUse), one
    whose manifest is damaged too (its weights must not stay behind); its pin and shares go with its adapter's
    last version. Returns the deleted name@V. Unloading it from the replicas is the caller's, after: the lock is
    held for moments, not for as long as replicas take."""
    if ref.version is None:
        raise InvalidAdapter("Delete one version at a time: name@version.", param="ref")
    version, deleted = ref.version, f"{ref.name}@{ref.version}"
    async with holding(redis, [(tenant, ref.name)], tenant):
        readable = await asyncio.to_thread(_readable, store, ref.name, version)
        found = await users(redis, experiments, tenant, deleted, name_others=name_others)
        if await redis.hget(keys.pins(tenant), ref.name) == str(version):
            if await asyncio.to_thread(_other_listed, store, ref.name, version):
                found.append(f"the pin of `{ref.name}` (its callers would move to another version)")
        if found:
            raise VersionInUse(_in_use(deleted, found))
        remove = store.remove if readable else store.remove_unreadable
        await asyncio.to_thread(remove, ref.name, version)
        if not await asyncio.to_thread(store.versions, ref.name):
            await PointerStore(redis).forget_adapter(tenant, ref.name)
    return deleted


def _readable(store: AdapterStore, name: str, version: int) -> bool:
    """Whether the version's manifest reads; False for a version whose manifest is damaged, AdapterNotFound for
    one that is not there."""
    try:
        store.manifest(name, version)
    except AdapterNotFound:
        if store.version_dir(name, version).is_dir():
            return False
        raise
    return True


async def set_status(
    router: Router,
    tenant: str,
    name: str,
    status: Status,
    by: str,
    arm: str | None = None,
    reason: str = "",
    revision: int | None = None,
) -> Experiment:
    """ExperimentStore.set_status, unless it would point the alias at a version that no longer serves `tenant`
    (TargetMissing: its owner stopped sharing it, say). A stop is never refused: the way out whatever is gone.
    No lock is needed: a version an experiment's arm or roll-back names is never deleted while it runs (`users`)."""
    target = alias_target(await router.experiments.get(tenant, name), status, arm)
    if target is not None and status != "stopped":
        try:
            await router.target(target, tenant)
        except ModelNotFound as exc:
            raise TargetMissing(0, target) from exc
    return await router.experiments.set_status(tenant, name, status, by, arm, reason=reason, revision=revision)


async def same_tenant(tenants: TenantStore, name: str, created: float | None) -> Tenant | None:
    """Tenant `name` if it exists and is the one created at `created` (None: whichever); None otherwise (deleted,
    or deleted and created again: another tenant)."""
    try:
        current = await tenants.get(name)
    except TenantNotFound:
        return None
    return current if created is None or current.created == created else None


async def publish_unaliased(
    redis: aioredis.Redis,
    tenants: TenantStore,
    store: AdapterStore,
    owner: Tenant,
    manifest: Manifest,
    *,
    publish: bool = True,
    wait_s: float | None = None,
) -> Manifest:
    """`keep_if_still_owned(publish=publish)` of a version just stored unlisted, unless its name became an alias
    of its tenant while it was uploaded or trained (an alias set then checked for versions before there was one):
    the version is removed and NameTaken raised. Holds the name's lock, as `pointing_at` does to write an alias, so
    that one of the two always sees the other (once a version is on disk, listed or not, no alias takes its name).
    The lock is waited for `wait_s` (a retraining run waits out a holder that died: HOLD_S + WAIT_S)."""
    try:
        async with holding(redis, [(owner.name, manifest.name)], owner.name, wait_s):
            if await redis.hexists(keys.aliases(owner.name), manifest.name):
                raise NameTaken(manifest.name)
            return await keep_if_still_owned(tenants, store, owner, manifest, publish=publish)
    except BaseException:  # the lock not had (AdapterBusy), Redis away, the name taken: nothing left unlisted
        with suppress(Exception):  # removed already (keep_if_still_owned's own failures), or the disk fails too
            await asyncio.to_thread(store.remove, manifest.name, manifest.version)
        raise


async def keep_if_still_owned(
    tenants: TenantStore, store: AdapterStore, owner: Tenant, manifest: Manifest, *, publish: bool = False
) -> Manifest:
    """Keep `manifest`, just stored in `owner`'s `store`, only if `owner` still exists (the same tenant, not one
    created again under its name); otherwise remove it and raise TenantNotFound. With `publish`, a version stored
    unlisted (so that no tenant could call it before this check) is listed once kept; the manifest kept."""
    try:
        if await same_tenant(tenants, owner.name, owner.created) is not None:
            return await asyncio.to_thread(store.publish, manifest.name, manifest.version, {}) if publish else manifest
    except AdapterNotFound as exc:  # removed between the check and the listing: by a deletion's sweep?
        if await same_tenant(tenants, owner.name, owner.created) is None:
            raise TenantNotFound(owner.name) from exc
        raise
    except BaseException:  # Redis, the disk: nothing is left half-added (unlisted, for no one)
        with suppress(Exception):
            await asyncio.to_thread(store.remove, manifest.name, manifest.version)
        raise
    with suppress(AdapterNotFound):  # the deletion's own sweep may have come first
        await asyncio.to_thread(store.remove, manifest.name, manifest.version)
    raise TenantNotFound(owner.name)
