"""The mutable pointers of the adapter namespace, kept in Redis and cached in every gateway process:

- pins: a tenant's bare adapter name -> the version it means (else its latest);
- aliases: a tenant-level name -> a target model (`name@V`, `owner/name@V`, or the base model);
  later also an experiment;
- shares: `owner/adapter` -> the tenants the global admin lets use it.

Every write bumps the state version in the same transaction; the state watcher empties these caches
when it moves, so a repointed alias reaches every gateway process within the watch interval.
Adapter files stay immutable in the store: only these pointers change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway import keys
from gateway.tenants import TenantNotFound

# KEYS: the tenant's pins, the state version. ARGV: adapter, the version it must be pinned to now ('': unpinned),
# the version to pin ('': unpin). 1: changed; 0: it was pinned otherwise, nothing written.
_PIN_IF = """
local now = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if now ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
redis.call('INCR', KEYS[2])
return 1
"""


# KEYS: the shares hash, the state version, then the owner's and each consumer's tenant key. ARGV: owner/adapter,
# the consumers' JSON list ('' to share with no one). Written only while every one of those tenants exists: a
# tenant deleted meanwhile (its deletion removes its shares) gets none back. Returns the index (1-based, among the
# tenant keys) of a tenant that does not exist, or 0 once written.
_SHARE = """
for i = 3, ARGV[2] == '' and 0 or #KEYS do  -- an unshare needs no one to exist
  if redis.call('EXISTS', KEYS[i]) == 0 then return i - 2 end
end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('INCR', KEYS[2])
return 0
"""


@dataclass(frozen=True)
class TenantPointers:
    pins: dict[str, int]
    aliases: dict[str, str]


class PointerStore:
    """Redis client with decode_responses=True."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pin_if = redis.register_script(_PIN_IF)
        self._share = redis.register_script(_SHARE)
        self._tenants: dict[str, TenantPointers] = {}
        self._shares: dict[str, frozenset[str]] | None = None
        self._generation = 0
        """Bumped by every forget: a read begun before it is not cached after it."""

    @property
    def redis(self) -> aioredis.Redis:
        """The state Redis the pointers are in (its adapter locks guard them: gateway.version_guard)."""
        return self._redis

    def forget_cached(self) -> None:
        self._generation += 1
        self._tenants.clear()
        self._shares = None

    async def of(self, tenant: str) -> TenantPointers:
        cached = self._tenants.get(tenant)
        if cached is None:
            generation = self._generation
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.pins(tenant))
                pipe.hgetall(keys.aliases(tenant))
                pins, aliases = await pipe.execute()
            cached = TenantPointers({k: int(v) for k, v in pins.items()}, dict(aliases))
            if generation == self._generation:  # not read across a change: safe to keep
                self._tenants[tenant] = cached
        return cached

    async def shares(self) -> dict[str, frozenset[str]]:
        """`owner/adapter` -> tenants it is shared with."""
        shares = self._shares
        if shares is None:
            generation = self._generation
            raw = await self._redis.hgetall(keys.shares())
            shares = {adapter: frozenset(json.loads(tenants)) for adapter, tenants in raw.items()}
            if generation == self._generation:
                self._shares = shares
        return shares

    async def shared_with(self, tenant: str) -> list[tuple[str, str]]:
        """(owner, adapter) pairs shared with `tenant`."""
        return sorted(
            (owner, name)
            for qualified, tenants in (await self.shares()).items()
            if tenant in tenants
            for owner, _, name in [qualified.partition("/")]
        )

    async def _write(self, *commands: tuple[str, tuple[object, ...]]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for command, args in commands:
                getattr(pipe, command)(*args)
            pipe.incr(keys.state_version())
            await pipe.execute()
        self.forget_cached()

    async def pin(self, tenant: str, adapter: str, version: int | None) -> None:
        if version is None:
            await self._write(("hdel", (keys.pins(tenant), adapter)))
        else:
            await self._write(("hset", (keys.pins(tenant), adapter, version)))

    async def pin_if(self, tenant: str, adapter: str, expected: int | None, version: int | None) -> bool:
        """Pin `adapter` to `version` (None: unpin) only while it is pinned to `expected` (None: unpinned):
        False, nothing written, when someone moved the pin since the caller read it."""
        args = [adapter, "" if expected is None else str(expected), "" if version is None else str(version)]
        changed = await self._pin_if(keys=[keys.pins(tenant), keys.state_version()], args=args)
        self.forget_cached()
        return bool(changed)

    async def set_alias(self, tenant: str, alias: str, target: str) -> None:
        """Point `alias` at `target` (one HSET: a repoint is atomic), whatever it pointed at: the admin API
        and the CLI go through `ExperimentStore.set_alias`, which refuses an alias running an experiment."""
        await self._write(("hset", (keys.aliases(tenant), alias, target)))

    async def share(self, owner: str, adapter: str, tenants: list[str]) -> None:
        """Share `owner`'s adapter (every version) with exactly `tenants` (empty: share with no one); TenantNotFound,
        nothing written, when one of them (or the owner) does not exist, checked and written in one step."""
        everyone = [owner, *sorted(set(tenants))]
        script_keys = [keys.shares(), keys.state_version(), *(keys.tenant(t) for t in everyone)]
        consumers = json.dumps(everyone[1:]) if tenants else ""
        missing = await self._share(keys=script_keys, args=[f"{owner}/{adapter}", consumers])
        self.forget_cached()
        if missing:
            raise TenantNotFound(everyone[int(missing) - 1])

    async def forget_adapter(self, tenant: str, adapter: str) -> None:
        """The adapter's last version is gone: drop its pin and shares (aliases name versions; they stay
        and answer 404 until repointed)."""
        await self._write(("hdel", (keys.pins(tenant), adapter)), ("hdel", (keys.shares(), f"{tenant}/{adapter}")))
