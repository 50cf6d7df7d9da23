"""A Redis server's clock, as seen from this host.

What is compared across processes is dated by a Redis's clock, not by the hosts' (which may differ by
seconds): quota windows are named by the state Redis's minute and adapter uses on the replicas are dated
by its clock (one `RedisClock`, measured by the quota gate's loop), and completion records and ratings
carry the records Redis's time, which its scripts compare with erasure tombstones (dated by `TIME`) and
with the age limit (measured by the records upkeep loop). Each process measures the offset now and then
(`sync`) and dates by `now()`: the host's wall clock where it agrees with Redis's within AGREES_WITHIN_S
(so every process on one host dates alike), else the host's monotonic clock plus the offset (a step of the
host's wall clock between measurements changes nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("loragate.clock")

SYNC_EVERY_S = 10.0
"""How often `upkeep` measures the offset again."""
UNMEASURED_EVERY_S = 1.0
"""How often `upkeep` tries again while nothing was measured yet."""
UNMEASURED_WARN_S = 60.0
"""`upkeep` warns once when nothing was measured this long after its first call."""
SAMPLE_TIMEOUT_S = 1.0
"""A `TIME` that takes longer ends the measurement with the samples taken so far (a loop that measures between
other work is held up this long at most)."""
SAMPLES = 3
"""`TIME` asked this many times per measurement; the quickest round trip is kept."""
MAX_ROUND_TRIP_S = 0.1
"""A measurement whose quickest round trip took longer than this, and than twice the kept one's (it waited
for a pooled connection, or for a busy Redis or event loop), is not kept: its error could be half that. The
first is always kept (a far Redis is measured too, to within half its round trip), and so is the one after
REJECTED_MOST in a row (a failover to a farther Redis)."""
REJECTED_MOST = 3
AGREES_WITHIN_S = 0.05
"""A host whose wall clock agrees with Redis's within this (beyond half the round trip) dates by its own: every
process on it then dates alike (their measurements differ by their errors), which keeps the order of what
they date one after the other (a rating that replaces an earlier one is dated after it)."""


class RedisClock:
    def __init__(self, redis: aioredis.Redis, name: str = "Redis") -> None:
        self._redis = redis
        self._name = name
        """What the warning calls this Redis (e.g. "the records Redis")."""
        self._upkeep_started: float | None = None
        self._next_sync = 0.0
        """Monotonic time from which `upkeep` measures again."""
        self._warned = False
        self._base = 0.0
        """Redis's time minus this host's monotonic clock."""
        self._round_trip_s = 0.0
        """The kept measurement's round trip."""
        self.measured = False
        """Whether a measurement was kept yet: until then `now()` is this host's wall clock."""
        self._rejected = 0
        """Measurements not kept since the last one kept."""
        self._agrees = True
        """This host's wall clock agrees with Redis's (AGREES_WITHIN_S): `now()` is the wall clock."""

    async def sync(self) -> bool:
        """Measure Redis's clock: `TIME` taken halfway through the round trip, the quickest of SAMPLES. Returns
        whether the measurement was kept (see MAX_ROUND_TRIP_S)."""
        best: tuple[float, float, float] | None = None
        for _ in range(SAMPLES):
            sent, wall_sent = time.monotonic(), time.time()
            try:
                seconds, micros = await asyncio.wait_for(self._redis.time(), SAMPLE_TIMEOUT_S)
            except TimeoutError:
                if best is None:
                    raise
                break
            back, wall_back = time.monotonic(), time.time()
            redis_now = seconds + micros / 1e6
            if best is None or back - sent < best[0]:
                best = (back - sent, redis_now - (sent + back) / 2, redis_now - (wall_sent + wall_back) / 2)
        assert best is not None
        round_trip_s, base, wall_offset_s = best
        slow = round_trip_s > max(MAX_ROUND_TRIP_S, 2 * self._round_trip_s)
        if self.measured and slow and self._rejected < REJECTED_MOST:
            self._rejected += 1
            return False
        self._round_trip_s, self._base, self.measured, self._rejected = round_trip_s, base, True, 0
        self._agrees = abs(wall_offset_s) <= round_trip_s / 2 + AGREES_WITHIN_S
        return True

    async def try_sync(self) -> bool:
        """`sync`; False when Redis cannot be reached or answers no `TIME` within SAMPLE_TIMEOUT_S (logged)."""
        try:
            return await self.sync()
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("Redis's clock not measured: %r", exc)
        except Exception:  # a loop that measures between other work must go on
            log.exception("Redis's clock not measured")
        return False

    async def upkeep(self) -> None:
        """Measure when due, for a loop that calls this often (every second or faster): every SYNC_EVERY_S, or every
        UNMEASURED_EVERY_S until measured; warn once when nothing is measured after UNMEASURED_WARN_S. Never raises."""
        now = time.monotonic()
        if self._upkeep_started is None:
            self._upkeep_started = now
        if now < self._next_sync:
            return
        await self.try_sync()
        self._next_sync = time.monotonic() + (SYNC_EVERY_S if self.measured else UNMEASURED_EVERY_S)
        if not self.measured and not self._warned and now - self._upkeep_started >= UNMEASURED_WARN_S:
            self._warned = True
            log.warning("%s's clock is not measured after a minute: this host's clock dates for it", self._name)

    def now(self) -> float:
        """Now by Redis's clock (Unix seconds): this host's wall clock where it agrees (or until measured), else
        this host's monotonic clock plus the measured offset (a later step of its wall clock changes nothing)."""
        return time.time() if self._agrees else time.monotonic() + self._base

    @property
    def offset_s(self) -> float:
        """Redis's clock minus this host's wall clock, now."""
        return self.now() - time.time()
