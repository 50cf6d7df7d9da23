"""Tenants' API keys: `sk-lg-<id>_<secret>`, stored in Redis as the sha256 of the whole key only.

The id (12 hex characters) names the key in listings, revocation and rotation, and finds its record
in one lookup; the secret never leaves the `create` or `rotate` answer. `verify` runs on every
request from a per-process cache that the state watcher empties whenever a key or tenant changes,
so a revoked key fails in every gateway process within the watch interval; an expiry is checked on
every request against the cached expiry time. While Redis cannot be reached from this process, keys
it verified within the last minute keep working; unknown keys get 503.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

from gateway import keys
from gateway.clock import RedisClock
from gateway.errors import AuthenticationFailed, StateUnavailable
from gateway.principal import ROLES, Principal, Role
from gateway.tenants import STORED, Limits, TenantNotFound, check_tenant_name

KEY_PREFIX = "sk-lg-"
STALE_S = 60.0
"""How long past its cache time a verified key keeps working while Redis cannot be reached from this
process (a revocation made meanwhile through another process takes effect once it is reached again)."""
KEY_FORMAT = re.compile(r"sk-lg-(?P<id>[0-9a-f]{12})_[A-Za-z0-9_-]{20,}")
# KEYS: the tenant, the new key's record, the tenant's key set. ARGV: the key id, its expiry ('' for none, seconds
# from now, or '@' and a Unix time), the `created` the tenant must have ('' for any; a rotation: the replaced key's
# `tenant_created`), then the record's other fields. The tenant must still exist and the id must be new, checked and
# written in one step; dated by Redis's clock (`created`, `expires_at`), whatever the clock of the host that asks.
# The key keeps when its tenant was created (`tenant_created`, exact to the bit: '%.17g'), so that it works for that
# tenant only, never for one created again under the name (_LOOKUP).
# Returns [created, expires_at], or -1 (no tenant), 0 (the id is taken), -2 (that time has passed), -3 (the tenant
# is not the one it must be).
_CREATE = """
local tenant = redis.call('GET', KEYS[1])
if not tenant then return -1 end
local tenant_created = cjson.decode(tenant)['created']
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= tenant_created then return -3 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local expires = ''
if string.sub(ARGV[2], 1, 1) == '@' then
  local at = tonumber(string.sub(ARGV[2], 2))
  if at <= now then return -2 end
  expires = string.format('%.6f', at)
elseif ARGV[2] ~= '' then
  expires = string.format('%.6f', now + tonumber(ARGV[2]))
end
local created = string.format('%.6f', now)
local stamp = string.format('%.17g', tenant_created)
redis.call('HSET', KEYS[2], 'created', created, 'expires_at', expires, 'tenant_created', stamp, unpack(ARGV, 4))
redis.call('SADD', KEYS[3], ARGV[1])
return {created, expires}
"""
# KEYS: the key, the state version. ARGV: seconds it works from now (by Redis's clock), unless it expires sooner.
# The expiry it had before its first grace is kept (`expires_before_grace`, '' for never): what its successors get.
_GRACE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local clock = redis.call('TIME')
local ends = tonumber(clock[1]) + tonumber(clock[2]) / 1000000 + tonumber(ARGV[1])
local before = redis.call('HGET', KEYS[1], 'expires_at') or ''
local expires = tonumber(before)
if expires == nil or ends < expires then
  if redis.call('HEXISTS', KEYS[1], 'expires_before_grace') == 0 then
    redis.call('HSET', KEYS[1], 'expires_before_grace', before)
  end
  redis.call('HSET', KEYS[1], 'expires_at', string.format('%.6f', ends))
  redis.call('INCR', KEYS[2])
end
return 1
"""
# KEYS: the key's record. ARGV: what a tenant's key starts with (keys.tenant('')). The record, flat; none when the key
# was made for another tenant of its name (one deleted since): its `tenant_created` is not the tenant's `created`.
# A key stored before keys carried `tenant_created` is not checked.
_LOOKUP = """
local record = redis.call('HGETALL', KEYS[1])
local fields = {}
for i = 1, #record, 2 do fields[record[i]] = record[i + 1] end
if fields['tenant_created'] == nil or fields['tenant'] == nil then return record end
local tenant = redis.call('GET', ARGV[1] .. fields['tenant'])
if not tenant then return {} end
local ok, parsed = pcall(cjson.decode, tenant)  -- a tenant record it cannot read: the key is checked as before
if ok and type(parsed) == 'table' and tonumber(fields['tenant_created']) ~= tonumber(parsed['created']) then
  return {}
end
return record
"""


class KeyNotFound(LookupError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key `{key_id}` does not exist.")


class InvalidKeyRequest(ValueError):
    """A key setting is refused (role, expiry, grace); the message says why."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class KeyInfo(BaseModel):
    """What may be shown of a key: never the key itself, nor its hash."""

    id: str
    tenant: str
    role: Role
    name: str
    prefix: str
    created: float
    expires_at: float | None = None
    last_used: float | None = None
    limits: Limits = Limits()

    @classmethod
    def from_record(cls, key_id: str, record: dict[str, str]) -> KeyInfo:
        def number(field: str) -> float | None:
            return float(record[field]) if record.get(field) else None

        def count(field: str) -> int | None:
            return int(record[field]) if record.get(field) else None

        return cls(
            id=key_id,
            tenant=record["tenant"],
            role=record["role"],  # type: ignore[arg-type]
            name=record.get("name", ""),
            prefix=f"{KEY_PREFIX}{key_id}",
            created=float(record["created"]),
            expires_at=number("expires_at"),
            last_used=number("last_used"),
            limits=Limits.model_validate({"rpm": count("rpm"), "tpm": count("tpm")}, context=STORED),
        )


MAX_DURATION_S = 100 * 365 * 86400.0
"""Longest duration a key may be given (expiry, rotation grace): a century."""
_DURATION = re.compile(r"(?:([0-9]{1,12})d)?(?:([0-9]{1,12})h)?(?:([0-9]{1,12})m)?(?:([0-9]{1,12})s)?|([0-9]{1,12})")
"""At most 12 digits a part (longer is past MAX_DURATION_S anyway): a 5000-digit one is refused, not parsed. ASCII
digits only (a Unicode digit class took Arabic-Indic ones: "٣٠d" was 30 days)."""


def parse_duration(text: str | float | int, allow_zero: bool = False) -> float:
    """Seconds, from a number of seconds (`3600`, also as text: the CLI's `--expires 3600`) or a duration like `30s`,
    `15m`, `1h`, `7d`, `1h30m`."""
    try:
        if isinstance(text, int | float) and not isinstance(text, bool):
            seconds = float(text)
        else:
            found = _DURATION.fullmatch(str(text).strip())
            if not str(text).strip() or found is None:
                raise InvalidKeyRequest(
                    f"Invalid duration {str(text)[:40]!r}: use seconds or e.g. 30s, 15m, 1h, 7d, 1h30m."
                )
            days, hours, minutes, secs, bare = (int(part or 0) for part in found.groups())
            seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs + bare)
    except OverflowError:
        seconds = math.inf
    if not seconds <= MAX_DURATION_S:
        raise InvalidKeyRequest(f"Invalid duration {str(text)[:40]!r}: at most {MAX_DURATION_S // 86400:.0f} days.")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidKeyRequest(f"Invalid duration {str(text)[:40]!r}: it must be longer than zero.")
    return seconds


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def redacted(token: str) -> str:
    return token[:10] + "***" + token[-4:] if len(token) > 16 else "***"


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise InvalidKeyRequest(f"Unknown role {role!r}: use one of {', '.join(ROLES)}.", param="role")
    return role  # type: ignore[return-value]


class KeyStore:
    """API keys in Redis (a client with decode_responses=True)."""

    def __init__(self, redis: aioredis.Redis, cache_seconds: float = 5.0, clock: RedisClock | None = None) -> None:
        self._redis = redis
        self._clock = clock or RedisClock(redis)
        """Expiries are set and checked by Redis's clock: a key made on one host expires when it says on every other."""
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._used: dict[str, float] = {}
        self._generation = 0
        """Bumped by every forget: a lookup begun before it is not cached after it."""
        self._create = redis.register_script(_CREATE)
        self._grace = redis.register_script(_GRACE)
        self._lookup_record = redis.register_script(_LOOKUP)
        self._touch = redis.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_used', ARGV[1]) end"
        )

    async def measure_clock(self) -> None:
        """Measure Redis's clock if it was not yet (a CLI's store; the gateway's is measured by the quota gate)."""
        if not self._clock.measured:
            await self._clock.try_sync()

    def note_use(self, key_id: str | None) -> None:
        """Remember that a key was used now; `flush_uses` writes it to Redis later, off the request path."""
        if key_id is not None:
            self._used[key_id] = self._clock.now()

    async def flush_uses(self) -> None:
        """Write the keys' last-use times (only to keys that still exist: a revoked key stays gone)."""
        used, self._used = self._used, {}
        for key_id, when in used.items():
            await self._touch(keys=[keys.api_key(key_id)], args=[when])

    def forget_cached(self) -> None:
        """Something changed (a key revoked or rotated, a tenant deleted): ask Redis again."""
        self._generation += 1
        self._cache.clear()

    async def _record(self, key_id: str) -> dict[str, str]:
        record: dict[str, str] = await self._redis.hgetall(keys.api_key(key_id))
        if not record:
            raise KeyNotFound(key_id)
        return record

    async def create(
        self,
        tenant: str,
        role: str = "inference",
        name: str = "default",
        expires_in_s: float | None = None,
        limits: Limits | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key for an existing tenant: (the key, shown once; what may be shown of it later)."""
        check_role(role)
        check_tenant_name(tenant)
        if expires_in_s is not None and not 0 < expires_in_s < math.inf:
            raise InvalidKeyRequest("A key's expiry must be in the future.")
        return await self._store(tenant, role, name, "" if expires_in_s is None else repr(float(expires_in_s)), limits)

    async def _store(
        self,
        tenant: str,
        role: str,
        name: str,
        expiry: str,
        limits: Limits | None,
        replaces: tuple[str, dict[str, str]] | None = None,
    ) -> tuple[str, KeyInfo]:
        """Store a new key (`expiry` as _CREATE takes it); raises InvalidKeyRequest when its expiry has passed.
        `replaces`: the id and record of the key it replaces, whose tenant it must be (not one re-created since)."""
        must_be = replaces[1].get("tenant_created", "") if replaces else ""
        limits = limits or Limits()
        while True:
            key_id = secrets.token_hex(6)
            api_key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            record: dict[str, Any] = {
                "tenant": tenant,
                "role": role,
                "name": name,
                "sha256": hash_key(api_key),
                "rpm": limits.rpm or "",
                "tpm": limits.tpm or "",
            }
            fields = [str(part) for pair in record.items() for part in pair]
            stored = await self._create(
                keys=[keys.tenant(tenant), keys.api_key(key_id), keys.tenant_keys(tenant)],
                args=[key_id, expiry, must_be, *fields],
            )
            if stored == -1:
                raise TenantNotFound(tenant)
            if stored == -3 and replaces:  # a key of a tenant deleted since: none of the tenant of that name now
                raise KeyNotFound(replaces[0])
            if stored == -2:
                raise InvalidKeyRequest("That key has expired: create a new key instead.", param="key_id")
            if stored != 0:
                record |= {"created": stored[0], "expires_at": stored[1]}
                return api_key, KeyInfo.from_record(key_id, {k: str(v) for k, v in record.items()})

    async def list(self, tenant: str) -> list[KeyInfo]:
        if not await self._redis.exists(keys.tenant(check_tenant_name(tenant))):
            raise TenantNotFound(tenant)
        infos = []
        ids = sorted(await self._redis.smembers(keys.tenant_keys(tenant)))
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(keys.api_key(key_id))
            records = await pipe.execute()
        for key_id, record in zip(ids, records, strict=True):
            if record and record.get("tenant") == tenant:
                infos.append(KeyInfo.from_record(key_id, record))
        return sorted(infos, key=lambda info: info.created)

    async def get(self, key_id: str) -> KeyInfo:
        return KeyInfo.from_record(key_id, await self._record(key_id))

    async def revoke(self, key_id: str) -> KeyInfo:
        info = await self.get(key_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(key_id))
            pipe.srem(keys.tenant_keys(info.tenant), key_id)
            pipe.incr(keys.state_version())
            await pipe.execute()
        self.forget_cached()
        return info

    async def rotate(self, key_id: str, grace_s: float) -> tuple[str, KeyInfo]:
        """A new key like `key_id` (tenant, role, name, limits, expiry); the old one works `grace_s` more seconds.
        The new key expires when the old one did before any grace (rotating a key again while in its grace does
        not hand the grace's end on); a key put in grace before `expires_before_grace` was kept hands on its grace's."""
        if not 0 <= grace_s < math.inf:
            raise InvalidKeyRequest("The grace period cannot be negative.")
        record = await self._record(key_id)
        old = KeyInfo.from_record(key_id, record)
        await self.measure_clock()
        if (ends_at := record.get("expires_at")) and self._clock.now() >= float(ends_at):  # its grace too, if rotated
            raise InvalidKeyRequest(f"API key `{key_id}` has expired: create a new key instead.", param="key_id")
        ends = record.get("expires_before_grace", record.get("expires_at", ""))
        expiry = f"@{float(ends)!r}" if ends else ""  # the same moment, by Redis's clock
        try:
            api_key, new = await self._store(old.tenant, old.role, old.name, expiry, old.limits, (key_id, record))
        except InvalidKeyRequest as exc:
            raise InvalidKeyRequest(
                f"API key `{key_id}` has expired: create a new key instead.", param="key_id"
            ) from exc
        await self._grace(keys=[keys.api_key(key_id), keys.state_version()], args=[repr(float(grace_s))])
        self.forget_cached()
        return api_key, new

    async def verify(self, token: str) -> Principal:
        """The principal of a tenant's key, or AuthenticationFailed; StateUnavailable when Redis is down
        and the key is not cached."""
        digest = hash_key(token)
        cached = self._cache.get(digest)
        if cached is None or cached[1] <= time.monotonic():
            generation = self._generation
            try:
                cached = (await self._lookup(token, digest), time.monotonic() + self._cache_seconds)
            except StateUnavailable:
                # Redis unreachable from here: a key verified within the last STALE_S stays valid.
                if cached is None or time.monotonic() - cached[1] > STALE_S:
                    raise
            if self._cache_seconds > 0 and generation == self._generation:
                self._cache[digest] = cached
        principal = cached[0]
        if principal.expires_at is not None and self._clock.now() >= principal.expires_at:
            raise AuthenticationFailed(f"The API key {redacted(token)} has expired.")
        return principal

    async def _lookup(self, token: str, digest: str) -> Principal:
        found = KEY_FORMAT.fullmatch(token)
        if found is None:
            raise AuthenticationFailed(f"Incorrect API key provided: {redacted(token)}.")
        try:  # one call, as one HGETALL was: the key's record, checked against its tenant's
            flat = await self._lookup_record(
                keys=[keys.api_key(found["id"])], args=[keys.tenant_prefix()], client=self._redis
            )
        except RedisError as exc:
            raise StateUnavailable(f"The key store is unavailable: {type(exc).__name__}.") from exc
        record = dict(zip(flat[::2], flat[1::2], strict=True))
        if not record or not hmac.compare_digest(record.get("sha256", ""), digest):
            raise AuthenticationFailed(f"Incorrect API key provided: {redacted(token)}.")
        info = KeyInfo.from_record(found["id"], record)
        return Principal(
            tenant=info.tenant,
            key_id=info.id,
            role=info.role,
            expires_at=info.expires_at,
            rpm=info.limits.rpm,
            tpm=info.limits.tpm,
        )
