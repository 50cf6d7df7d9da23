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

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("loragate.clock")

SYNC_EVERY_S = 10.0
"""How often the processes' upkeep loops measure the offset again."""
SYNC_TIMEOUT_S = 1.0
"""`try_sync` gives up after this long (a loop that measures between other work is not held up)."""
SAMPLES = 3
"""`TIME` asked this many times per measurement; the quickest round trip is kept."""
MAX_ROUND_TRIP_S = 0.1
"""A measurement whose quickest round trip took longer than this, and than twice the kept one's (it waited
for a pooled connection, or for a busy Redis or event loop), is not kept: its error could be half that. The
first is always kept (a far Redis is measured too, to within half its round trip)."""


class RedisClock:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._base = 0.0
        """Redis's time minus this host's monotonic clock."""
        self._round_trip_s = 0.0
        """The kept measurement's round trip."""
        self.measured = False
        """Whether a measurement was kept yet: until then `now()` is this host's wall clock."""

    async def sync(self) -> bool:
        """Measure Redis's clock: `TIME` taken halfway through the round trip, the quickest of SAMPLES. Returns
        whether the measurement was kept (see MAX_ROUND_TRIP_S)."""
        best: tuple[float, float] | None = None
        for _ in range(SAMPLES):
            sent = time.monotonic()
            seconds, micros = await self._redis.time()
            back = time.monotonic()
            if best is None or back - sent < best[0]:
                best = (back - sent, seconds + micros / 1e6 - (sent + back) / 2)
        assert best is not None
        if self.measured and best[0] > max(MAX_ROUND_TRIP_S, 2 * self._round_trip_s):
            return False
        self._round_trip_s, self._base, self.measured = best[0], best[1], True
        return True

    async def try_sync(self) -> bool:
        """`sync`, within SYNC_TIMEOUT_S; False when Redis cannot be reached or is slower than that."""
        try:
            return await asyncio.wait_for(self.sync(), SYNC_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("Redis's clock not measured: %r", exc)
            return False

    def now(self) -> float:
        """Now by Redis's clock (Unix seconds); this host's until measured."""
        return time.monotonic() + self._base if self.measured else time.time()

    @property
    def offset_s(self) -> float:
        """Redis's clock minus this host's wall clock, now."""
        return self.now() - time.time()
