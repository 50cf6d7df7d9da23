"""Which adapters are loaded on which vLLM replica, agreed between any number of gateway processes.

- vLLM's own `/v1/models` is the truth about what a replica holds; each gateway keeps a view of it,
  refreshed every maintenance round and whenever it is about to load or evict.
- A short Redis lock per replica (SET NX PX, released by its owner only) lets one process at a time
  make room and load there, so processes never overshoot a replica's capacity together.
- Least-recently-used is shared: every gateway adds the times it sent each adapter a request to a
  Redis sorted set per replica (batched, off the request path). An adapter that another gateway used
  within `protect_s` is never evicted by this one, even where this one used it since (it cannot know
  whether that gateway's requests are still on their way): each process also shares its own last uses
  under its own name (`replica_recent_uses`, trimmed to the last minutes). So gateways neither evict
  what another is using nor thrash; their own uses they know exactly (LRU, and in-flight requests are
  never evicted).
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
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from gateway import keys
from gateway.clock import RedisClock
from gateway.engine.pool import loaded_adapters
from gateway.errors import EngineUnavailable

log = logging.getLogger("loragate.residency")

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""
"""The owner's lock: renewed for ARGV[2] ms, or released when that is 0; another owner's is left alone."""


RECENT_KEEP_S = 300.0
"""Each process's own recent uses are shared for this long (at least `protect_s`)."""


class Residency:
    """Residency on the replicas, shared through Redis (a client with decode_responses=True)."""

    LOCK_TTL_MS = 30_000
    """A lock outlives a crashed owner by at most this long."""

    def __init__(
        self,
        redis: aioredis.Redis,
        session: aiohttp.ClientSession,
        capacity: int,
        protect_s: float = 10.0,
        clock: RedisClock | None = None,
    ) -> None:
        self._redis = redis
        self._clock = clock or RedisClock(redis)
        """Uses are dated by Redis's clock (shared with the quota gate, which measures it): hosts' clocks may differ."""
        self._session = session
        self.capacity = capacity
        self.protect_s = protect_s
        self._release = redis.register_script(_RELEASE)
        self._used: defaultdict[str, dict[str, float]] = defaultdict(dict)
        """This process's last use of each adapter, by replica."""
        self._unshared: defaultdict[str, dict[str, float]] = defaultdict(dict)
        self._process = secrets.token_hex(8)
        """This process's name among those sharing the replicas' recent uses."""

    @asynccontextmanager
    async def exclusive(self, replica: str) -> AsyncIterator[None]:
        """Hold the replica's lock, renewed while held, waiting up to LOCK_TTL_MS for another process to
        finish (then EngineUnavailable). Without Redis, go on alone: the worst case is one eviction too
        many, never a failed request."""
        token = secrets.token_hex(8)
        try:
            held = await self._acquire(replica, token)
        except (RedisError, OSError) as exc:
            log.warning("no residency lock for %s (Redis: %s); loading without it", replica, exc)
            held = False
        renewing = asyncio.create_task(self._renew(replica, token)) if held else None
        try:
            yield
        finally:
            if renewing is not None:
                renewing.cancel()
                try:
                    await self._release(keys=[keys.replica_lock(replica)], args=[token, 0])
                except (RedisError, OSError):
                    pass  # it expires on its own

    async def _acquire(self, replica: str, token: str) -> bool:
        deadline = time.monotonic() + self.LOCK_TTL_MS / 1000
        while not await self._redis.set(keys.replica_lock(replica), token, nx=True, px=self.LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise EngineUnavailable("Another gateway is loading adapters on the engine; try again shortly.")
            await asyncio.sleep(0.05)
        return True

    async def _renew(self, replica: str, token: str) -> None:
        """Keep the lock while its owner works (a load can wait long behind generation steps); a renewal Redis did
        not answer is tried again at the next (the lock lasts three of them), until the lock is given back."""
        while True:
            await asyncio.sleep(self.LOCK_TTL_MS / 3000)
            try:
                await self._release(keys=[keys.replica_lock(replica)], args=[token, self.LOCK_TTL_MS])
            except (RedisError, OSError) as exc:
                log.debug("residency lock of %s not renewed this time: %r", replica, exc)

    async def loaded(self, replica: str) -> list[str] | None:
        """The adapters vLLM says the replica holds, or None when it cannot be asked."""
        return await loaded_adapters(self._session, replica, timeout_s=5)

    def note_use(self, replica: str, name: str) -> None:
        now = self._clock.now()
        self._used[replica][name] = now
        self._unshared[replica][name] = now

    def forget(self, replica: str, name: str) -> None:
        """The adapter left the replica: this process's record of its uses goes (a new load notes it again)."""
        self._used.get(replica, {}).pop(name, None)
        self._unshared.get(replica, {}).pop(name, None)

    async def forget_everywhere(self, replicas: list[str], name: str) -> None:
        """A deleted version: its uses go from this process and from Redis, for every replica."""
        for replica in replicas:
            self.forget(replica, name)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for replica in replicas:
                    pipe.zrem(keys.replica_usage(replica), name)
                    pipe.zrem(keys.replica_recent_uses(replica), f"{name}\0{self._process}")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("could not drop the uses of %s: %s", name, exc)

    async def loaded_now(self, replica: str, name: str) -> None:
        """A load this process just made: its use is shared at once, not at the next flush, so that another process
        making room there meanwhile does not take it for the least recently used (it never was used, to it)."""
        self.note_use(replica, name)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._share(pipe, replica, {name: self._used[replica][name]})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("could not share the load of %s: %s", name, exc)

    async def flush_uses(self) -> None:
        """Share this process's adapter uses (a later time never goes back: ZADD GT)."""
        unshared, self._unshared = self._unshared, defaultdict(dict)
        used = {replica: names for replica, names in unshared.items() if names}  # `forget` may have emptied one
        if not used:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for replica, names in used.items():
                    self._share(pipe, replica, names)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("could not share adapter uses: %s", exc)
            for replica, names in used.items():  # shared at the next flush, unless used again (later) or forgotten
                for name, at in names.items():
                    if name in self._used.get(replica, {}):
                        self._unshared[replica].setdefault(name, at)

    def _share(self, pipe: Pipeline, replica: str, names: dict[str, float]) -> None:
        """Queue on `pipe`: the last uses of `names` by any process (a later time never goes back: ZADD GT), and by
        this one, under its name (uses older than RECENT_KEEP_S leave that set)."""
        recent = keys.replica_recent_uses(replica)
        pipe.zadd(keys.replica_usage(replica), names, gt=True)
        pipe.expire(keys.replica_usage(replica), 86400)
        pipe.zadd(recent, {f"{name}\0{self._process}": at for name, at in names.items()}, gt=True)
        pipe.zremrangebyscore(recent, "-inf", self._clock.now() - max(self.protect_s, RECENT_KEEP_S))
        pipe.expire(recent, int(max(self.protect_s, RECENT_KEEP_S)) + 60)

    async def evictable(self, replica: str, resident: list[str], keep: set[str]) -> list[str]:
        """Adapters that may be unloaded to make room, least recently used (by any gateway) first."""
        candidates = [name for name in resident if name not in keep]
        if not candidates:
            return []
        local = self._used.get(replica, {})
        now = self._clock.now()
        shared, recent = [None] * len(candidates), []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zmscore(keys.replica_usage(replica), candidates)
                pipe.zrange(keys.replica_recent_uses(replica), now - self.protect_s, "+inf", byscore=True)
                shared, recent = await pipe.execute()
        except (RedisError, OSError):
            pass
        last = {name: max(local.get(name, 0.0), score or 0.0) for name, score in zip(candidates, shared, strict=True)}
        by_others = {name for name, _, process in (m.partition("\0") for m in recent) if process != self._process}
        by_others |= {
            name for name in candidates if last[name] > local.get(name, 0.0) and now - last[name] < self.protect_s
        }
        return sorted((name for name in candidates if name not in by_others), key=lambda name: last[name])
