"""Which adapters are loaded on which vLLM replica, agreed between any number of gateway processes.

- vLLM's own `/v1/models` is the truth about what a replica holds; each gateway keeps a view of it,
  refreshed every maintenance round and whenever it is about to load or evict.
- A short Redis lock per replica (SET NX PX, released by its owner only) lets one process at a time
  make room and load there, so processes never overshoot a replica's capacity together.
- Least-recently-used is shared: every gateway adds the times it sent each adapter a request to a
  Redis sorted set per replica (batched, off the request path). An adapter that another gateway used
  more recently than this one, within `protect_s`, is never evicted by this one (it cannot know
  whether that gateway's requests are still on their way), so gateways neither evict what another
  is using nor thrash; its own uses it knows exactly (LRU, and in-flight requests are never evicted).
  When nothing can go, vLLM's own `--max-cpu-loras` LRU keeps its memory bounded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys

log = logging.getLogger("loragate.residency")

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Residency:
    LOCK_TTL_MS = 30_000
    """A lock outlives a crashed owner by at most this long."""

    def __init__(self, redis: aioredis.Redis, session: aiohttp.ClientSession, capacity: int, protect_s: float = 10.0):
        self._redis = redis
        self._session = session
        self.capacity = capacity
        self.protect_s = protect_s
        self._release = redis.register_script(_RELEASE)
        self._used: defaultdict[str, dict[str, float]] = defaultdict(dict)
        """This process's last use of each adapter, by replica."""
        self._unshared: defaultdict[str, dict[str, float]] = defaultdict(dict)

    @asynccontextmanager
    async def exclusive(self, replica: str) -> AsyncIterator[None]:
        """Hold the replica's lock (waiting for another process to finish). Without Redis, go on alone:
        the worst case is one eviction too many, never a failed request."""
        token = secrets.token_hex(8)
        held = False
        deadline = time.monotonic() + self.LOCK_TTL_MS / 1000
        try:
            while not held and time.monotonic() < deadline:
                held = bool(await self._redis.set(keys.replica_lock(replica), token, nx=True, px=self.LOCK_TTL_MS))
                if not held:
                    await asyncio.sleep(0.05)
        except (RedisError, OSError) as exc:
            log.warning("no residency lock for %s (Redis: %s); loading without it", replica, exc)
        try:
            yield
        finally:
            if held:
                try:
                    await self._release(keys=[keys.replica_lock(replica)], args=[token])
                except (RedisError, OSError):
                    pass  # it expires on its own

    async def loaded(self, replica: str) -> list[str] | None:
        """The adapters vLLM says the replica holds, or None when it cannot be asked."""
        try:
            async with self._session.get(f"{replica}/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                models = (await resp.json()).get("data", []) if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
        if models is None:
            return None
        return [m["id"] for m in models if isinstance(m, dict) and m.get("parent") and isinstance(m.get("id"), str)]

    def note_use(self, replica: str, name: str) -> None:
        now = time.time()
        self._used[replica][name] = now
        self._unshared[replica][name] = now

    async def flush_uses(self) -> None:
        """Share this process's adapter uses (a later time never goes back: ZADD GT)."""
        used, self._unshared = self._unshared, defaultdict(dict)
        if not used:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for replica, names in used.items():
                    pipe.zadd(keys.replica_usage(replica), names, gt=True)
                    pipe.expire(keys.replica_usage(replica), 86400)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("could not share adapter uses: %s", exc)

    async def evictable(self, replica: str, resident: list[str], keep: set[str]) -> list[str]:
        """Adapters that may be unloaded to make room, least recently used (by any gateway) first."""
        candidates = [name for name in resident if name not in keep]
        if not candidates:
            return []
        local = self._used.get(replica, {})
        try:
            shared = await self._redis.zmscore(keys.replica_usage(replica), candidates)
        except (RedisError, OSError):
            shared = [None] * len(candidates)
        last = {name: max(local.get(name, 0.0), score or 0.0) for name, score in zip(candidates, shared, strict=True)}
        now = time.time()
        by_others = {
            name for name in candidates if last[name] > local.get(name, 0.0) and now - last[name] < self.protect_s
        }
        return sorted((name for name in candidates if name not in by_others), key=lambda name: last[name])
