"""Tenants: the teams that share one loragate. Each has its own keys, adapters, aliases and limits.

A tenant's settings live in Redis as one JSON document; every change bumps the state version
that all gateway processes watch (gateway.state), so a deleted tenant stops everywhere within 1 s.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from gateway import keys
from gateway.errors import StateUnavailable
from gateway.records import LogPolicy

# KEYS: a tenant, one of the keys under its name. Deletes the key unless the tenant exists (again): -1 then.
_DELETE_IF_GONE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
return redis.call('DEL', KEYS[2])
"""
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class InvalidTenant(ValueError):
    """A tenant name or setting is refused; the message says why."""


class TenantNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Tenant `{name}` does not exist.")


class TenantExists(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"Tenant `{name}` already exists.")


def check_tenant_name(name: str) -> str:
    """1-63 lowercase letters, digits, '_' or '-', starting with a letter or digit: no ':', '/' or '.',
    so a tenant can never be spelled into another tenant's Redis keys, folders or vLLM adapter names."""
    if not TENANT_NAME.fullmatch(name):
        shown = name if len(name) <= 70 else f"{name[:64]}..."  # not all of a name of thousands of characters
        raise InvalidTenant(
            f"Invalid tenant name {shown!r}: use 1-63 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit (no ':', '/', '.' or spaces)."
        )
    return name


MOST_PER_MINUTE = 10**15
"""The largest limit: the quota script counts in Lua's doubles, exact to 2^53 (a limit of 2^63 came back in
the rate-limit headers as -9223372036854775808)."""


STORED = {"stored": True}
"""The validation context of what is read back from Redis (`Limits._stored`)."""


class Limits(BaseModel):
    """Requests and tokens per minute; None is unlimited."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: int | None = Field(None, ge=1, le=MOST_PER_MINUTE, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, le=MOST_PER_MINUTE, description="Tokens per minute (prompt + completion).")

    @field_validator("rpm", "tpm", mode="before")
    @classmethod
    def _stored(cls, value: Any, info: ValidationInfo) -> Any:
        """A limit read back from Redis (`STORED`) that a release before the bound wrote above it is read as the
        bound: refused, it failed every request of its tenant (or key) and the log's upkeep of every tenant."""
        stored = isinstance(info.context, dict) and info.context.get("stored")
        return MOST_PER_MINUTE if stored and isinstance(value, int) and value > MOST_PER_MINUTE else value

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    created: float = Field(default_factory=time.time)
    limits: Limits = Field(default_factory=Limits)
    on_redis_down: Literal["open", "closed"] = Field(
        "open",
        description="When Redis cannot be asked about quotas: admit requests (open) or refuse them (closed).",
    )
    logging: LogPolicy = Field(default_factory=LogPolicy, description="What the completion log keeps, how long.")


class LogPolicyChanges(LogPolicy):
    """A partial logging policy: only the fields sent change. Its score range is checked once merged with the
    tenant's current policy (`{"score_min": 2}` is fine for a 1..5 tenant, though 2 is above the default max)."""

    @model_validator(mode="after")
    def _range(self) -> LogPolicyChanges:  # LogPolicy's, checked on the merged policy instead
        return self


class TenantChanges(BaseModel):
    """What an update may change; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid", strict=True)

    limits: Limits | None = None
    on_redis_down: Literal["open", "closed"] | None = None
    logging: LogPolicyChanges | None = None


def _changed(tenant: Tenant, changes: TenantChanges) -> Tenant:
    merged = tenant.model_dump()
    merged.update(changes.model_dump(exclude_none=True, exclude={"logging", "limits"}))
    for part in ("limits", "logging"):  # a partial one changes only the fields it names (null: no limit)
        if (changed := getattr(changes, part)) is not None:
            merged[part].update(changed.model_dump(exclude_unset=True))
    try:
        return Tenant.model_validate(merged, context=STORED)  # the changes were checked as they came
    except ValidationError as exc:
        raise InvalidTenant(f"Invalid tenant settings: {exc.errors()[0]['msg']}") from exc


class TenantStore:
    """Tenants in Redis (a client with decode_responses=True), and a per-process cache of their settings
    for the request path, emptied by the state watcher."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._cache: dict[str, Tenant] = {}
        self._loading: dict[str, asyncio.Future[Tenant]] = {}
        self._generation = 0
        """Bumped by every forget: a read begun before it is not cached after it."""
        self._delete_if_gone = redis.register_script(_DELETE_IF_GONE)

    def forget_cached(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._loading.clear()

    async def cached(self, name: str) -> Tenant:
        """The tenant's settings, from memory when read since the last change (concurrent first reads share
        one Redis call). Redis unreachable with nothing in memory: StateUnavailable, never "no limits"."""
        tenant = self._cache.get(name)
        if tenant is not None:
            return tenant
        generation = self._generation
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = asyncio.ensure_future(self.get(name))
            loading.add_done_callback(
                lambda done: self._loading.pop(name, None) if self._loading.get(name) is done else None
            )
        try:
            tenant = await asyncio.shield(loading)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"Tenant settings are unavailable: {type(exc).__name__}.") from exc
        if generation == self._generation:  # not read across a change: safe to keep
            self._cache[name] = tenant
        return tenant

    async def create(
        self,
        name: str,
        limits: Limits | None = None,
        on_redis_down: str = "open",
        logging: LogPolicy | None = None,
        not_before: float = 0.0,
    ) -> Tenant:
        """`not_before`: when a tenant of that name was last deleted; the new one is created after it (its
        `created` tells its records from those of the deleted one, gateway.erasure), whatever this host's clock."""
        settings = {"limits": limits or Limits(), "on_redis_down": on_redis_down, "logging": logging or LogPolicy()}
        created = max(time.time(), not_before + 0.001)
        tenant = Tenant.model_validate({"name": check_tenant_name(name), "created": created, **settings})
        if not await self._redis.set(keys.tenant(name), tenant.model_dump_json(), nx=True):
            raise TenantExists(name)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.tenants(), name)
            pipe.incr(keys.state_version())
            await pipe.execute()
        return tenant

    async def get(self, name: str) -> Tenant:
        raw = await self._redis.get(keys.tenant(check_tenant_name(name)))
        if raw is None:
            raise TenantNotFound(name)
        return Tenant.model_validate_json(raw, context=STORED)

    async def names(self) -> list[str]:
        return sorted(await self._redis.smembers(keys.tenants()))

    async def all(self) -> list[Tenant]:
        names = await self.names()
        raws = await self._redis.mget([keys.tenant(n) for n in names]) if names else []
        return [Tenant.model_validate_json(raw, context=STORED) for raw in raws if raw is not None]

    async def update(self, name: str, changes: TenantChanges) -> Tenant:
        """Apply `changes` (partial: what they leave out stays) to the tenant as stored, read and written in one
        transaction (WATCH): two partial changes at once, `{"rpm": ...}` and `{"tpm": ...}` from two gateways,
        both hold, where the later one's write took the other's away."""
        key = keys.tenant(check_tenant_name(name))
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise TenantNotFound(name)
                    updated = _changed(Tenant.model_validate_json(raw, context=STORED), changes)
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json(), xx=True)
                    pipe.incr(keys.state_version())
                    await pipe.execute()
                    return updated
                except WatchError:
                    continue

    async def delete(self, name: str) -> list[str]:
        """Delete the tenant, its keys, pins and aliases, its experiments and their audit logs (every key
        under `loragate:tenant:NAME:`), and its shares (both ways). Returns the ids of the keys it revoked.
        Its adapter files are the registry's to remove; its log and feedback, gateway.erasure's.

        Its key set and the shares are read and the deletion written in one transaction (WATCH): a key created
        or rotated meanwhile is revoked with the others, not left behind to work for a tenant re-created under
        the name (a key also names the tenant it was made for: gateway.apikeys)."""
        check_tenant_name(name)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    key_ids = await self._delete_watched(pipe, name)
                    break
                except WatchError:
                    continue
        async for key in self._redis.scan_iter(match=keys.tenant_state_pattern(name), count=500):
            if await self._delete_if_gone(keys=[keys.tenant(name), key], client=self._redis) == -1:
                break  # created again meanwhile: what is under its name now is the new tenant's
        return key_ids

    async def _delete_watched(self, pipe: Pipeline, name: str) -> list[str]:
        """One try of the deletion's transaction; WatchError when the tenant, its keys or the shares changed."""
        await pipe.watch(keys.tenant(name), keys.tenant_keys(name), keys.shares())
        if not await pipe.exists(keys.tenant(name)):
            raise TenantNotFound(name)
        key_ids = sorted(await pipe.smembers(keys.tenant_keys(name)))
        shares = await pipe.hgetall(keys.shares())
        pipe.multi()
        pipe.delete(keys.tenant(name), keys.tenant_keys(name), keys.pins(name), keys.aliases(name))
        pipe.delete(keys.experiments(name))
        for key_id in key_ids:
            pipe.delete(keys.api_key(key_id))
        pipe.srem(keys.tenants(), name)
        for adapter, raw in shares.items():
            if adapter.startswith(f"{name}/"):
                pipe.hdel(keys.shares(), adapter)
            elif name in (consumers := json.loads(raw)):
                pipe.hset(keys.shares(), adapter, json.dumps([t for t in consumers if t != name]))
        pipe.incr(keys.state_version())
        await pipe.execute()
        return key_ids
