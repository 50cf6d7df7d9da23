"""A Redis server's clock, as seen from this host.

What is compared across processes is dated by a Redis's clock, not by the hosts' (which may differ by
seconds): quota windows are named by the state Redis's minute and adapter uses on the replicas are dated
by its clock (one `RedisClock`, measured by the quota gate's loop), and completion records and ratings
carry the records Redis's time, which its scripts compare with erasure tombstones (dated by `TIME`) and
with the age limit (measured by the records upkeep loop). Each process measures the offset now and then
(`sync`) and dates by `now()`, which runs on this host's monotonic clock in between (a step of the host's
wall clock changes nothing).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

SYNC_EVERY_S = 10.0
"""How often the processes' upkeep loops measure the offset again."""
SAMPLES = 3
"""`TIME` asked this many times per measurement; the quickest round trip is kept."""
MAX_ROUND_TRIP_S = 0.1
"""A measurement whose quickest round trip took longer (it waited for a pooled connection, or for a busy
Redis or event loop) is not kept: its error could be half that."""


class RedisClock:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._base = time.time() - time.monotonic()
        """Redis's time minus this host's monotonic clock (this host's wall clock until measured)."""
        self.measured = False
        """Whether a measurement was kept yet: until then `now()` is this host's clock."""

    async def sync(self) -> bool:
        """Measure Redis's clock: `TIME` taken halfway through the round trip, the quickest of SAMPLES. Returns
        whether the measurement was kept (not when every round trip took over MAX_ROUND_TRIP_S)."""
        best: tuple[float, float] | None = None
        for _ in range(SAMPLES):
            sent = time.monotonic()
            seconds, micros = await self._redis.time()
            back = time.monotonic()
            if best is None or back - sent < best[0]:
                best = (back - sent, seconds + micros / 1e6 - (sent + back) / 2)
        assert best is not None
        if best[0] > MAX_ROUND_TRIP_S:
            return False
        self._base, self.measured = best[1], True
        return True

    def now(self) -> float:
        """Now by Redis's clock (Unix seconds)."""
        return time.monotonic() + self._base

    @property
    def offset_s(self) -> float:
        """Redis's clock minus this host's wall clock, now."""
        return self.now() - time.time()
