"""Who is calling: a bearer key, checked against hashed keys in Redis, becomes a Principal.

Keys are stored as sha256 digests only; a short in-process cache keeps Redis off the hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys
from gateway.errors import AuthenticationFailed, StateUnavailable

KEY_PREFIX = "sk-lg-"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_name: str


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'."
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
    return token


def _redacted(token: str) -> str:
    return token[:6] + "***" + token[-4:] if len(token) > 12 else "***"


class KeyStore:
    """API keys in Redis (a client with decode_responses=True); `verify` runs on every request."""

    def __init__(self, redis: aioredis.Redis, cache_seconds: float = 5.0) -> None:
        self._redis = redis
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def create(self, tenant: str, name: str = "default") -> str:
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.api_key(digest), mapping={"tenant": tenant, "name": name, "created": int(time.time())})
            pipe.sadd(keys.tenant_keys(tenant), digest)
            await pipe.execute()
        return api_key

    async def revoke(self, api_key: str) -> bool:
        digest = hash_key(api_key)
        self._cache.pop(digest, None)
        tenant = await self._redis.hget(keys.api_key(digest), "tenant")
        if tenant is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(digest))
            pipe.srem(keys.tenant_keys(str(tenant)), digest)
            await pipe.execute()
        return True

    async def verify(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        digest = hash_key(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            record = await self._redis.hgetall(keys.api_key(digest))
        except RedisError as exc:
            raise StateUnavailable(f"The key store is unavailable: {type(exc).__name__}.") from exc
        if not record:
            raise AuthenticationFailed(f"Incorrect API key provided: {_redacted(token)}.")
        principal = Principal(tenant=str(record.get("tenant", "")), key_name=str(record.get("name", "")))
        if self._cache_seconds > 0:
            self._cache[digest] = (principal, now + self._cache_seconds)
        return principal


def bearer_matches(authorization: str | None, secret: str | None) -> bool:
    """Whether the Bearer token is `secret` (a configured key: admin, metrics), compared in constant time."""
    if secret is None:
        return False
    try:
        token = bearer_token(authorization)
    except AuthenticationFailed:
        return False
    return hmac.compare_digest(token.encode(), secret.encode())
