"""gateway.clock: a Redis's clock measured from this host, robust to a slow round trip and to the host's clock."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from gateway import clock
from gateway.clock import MAX_ROUND_TRIP_S, REJECTED_MOST, SAMPLE_TIMEOUT_S, RedisClock
from tests.conftest import RedisServer
from tests.unit.test_quotas import SkewedTime

pytestmark = pytest.mark.asyncio


async def test_waiting_for_a_pooled_connection_does_not_skew_the_measurement(redis_server: RedisServer) -> None:
    """The pool's one connection is busy for 0.5 s when the measurement starts: the Redis server runs on this host,
    so the offset is about 0, not half the wait."""
    pool = aioredis.BlockingConnectionPool.from_url(redis_server.url, max_connections=1, timeout=5)
    client = aioredis.Redis(connection_pool=pool)
    try:
        busy = asyncio.create_task(client.blpop(["nothing-comes"], timeout=0.5))
        await asyncio.sleep(0.05)
        found = RedisClock(client)
        assert await found.sync() and found.measured
        await busy
        assert abs(found.offset_s) < 0.05, found.offset_s
    finally:
        await client.aclose()


class _FakeTime:
    """A Redis whose `TIME` is `ahead_s` ahead of this host, answering after `delay_s`."""

    def __init__(self, delay_s: float, ahead_s: float) -> None:
        self.delay_s, self.ahead_s = delay_s, ahead_s

    async def time(self) -> tuple[int, int]:
        await asyncio.sleep(self.delay_s)
        now = time.time() + self.ahead_s
        return int(now), int(now % 1 * 1e6)


async def test_a_slow_measurement_is_kept_only_until_a_better_one() -> None:
    """A far Redis (round trips of 0.15 s) is measured, to within half of that; once a quick measurement is kept,
    a slow one (a wait for a pooled connection, say) does not replace it, unless every one is slow since."""
    fake = _FakeTime(MAX_ROUND_TRIP_S + 0.05, 1000)
    found = RedisClock(fake)  # type: ignore[arg-type]
    assert await found.sync() and found.measured
    assert abs(found.offset_s - 1000) < 0.1
    fake.delay_s = 0
    assert await found.sync()
    assert abs(found.offset_s - 1000) < 0.01
    fake.delay_s, fake.ahead_s = MAX_ROUND_TRIP_S + 0.05, 2000
    for _ in range(REJECTED_MOST):
        assert not await found.sync()
        assert abs(found.offset_s - 1000) < 0.01
    assert await found.sync(), "slow every time since: a failover to a farther Redis"
    assert abs(found.offset_s - 2000) < 0.1
    fake.delay_s = SAMPLE_TIMEOUT_S + 0.2
    assert not await found.try_sync(), "no answer in time: nothing measured, and the caller goes on"
    assert abs(found.offset_s - 2000) < 0.1


async def test_a_host_that_agrees_dates_by_its_own_clock_one_that_does_not_by_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host and the Redis server share a clock: measured, the wall clock is used as it is (every process on the
    host then dates alike). Where the host's clock runs 30 s ahead, Redis's is used, on the monotonic clock: NTP
    stepping the host's clock back meanwhile changes nothing."""
    client = aioredis.from_url(redis_server.url)
    try:
        found = RedisClock(client)
        monkeypatch.setattr(clock, "time", SkewedTime(30.0))  # this host's clock runs 30 s ahead
        assert abs(found.now() - (time.time() + 30)) < 0.05, "not measured yet: this host's clock"
        await found.sync()
        before = found.now()
        assert abs(before - time.time()) < 0.05, "Redis's clock"
        monkeypatch.undo()  # NTP stepped this host's clock 30 s back
        assert abs(found.now() - before) < 0.05
        await found.sync()
        for _ in range(100):
            assert found.now() <= time.time() <= found.now() + 0.01, "agrees: this host's wall clock itself"
    finally:
        await client.aclose()


class _Unreachable:
    """A Redis that never answers `TIME`; counts the tries."""

    def __init__(self) -> None:
        self.tries = 0

    async def time(self) -> tuple[int, int]:
        self.tries += 1
        raise ConnectionError("unreachable")


async def test_upkeep_measures_when_due_and_warns_once_when_never_measured(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Called every round of a loop: tries every second while unmeasured and warns once after a minute; measured,
    only every SYNC_EVERY_S. Time is the host's monotonic clock, moved by hand."""
    moments = [1000.0]
    monkeypatch.setattr(clock.time, "monotonic", lambda: moments[0])
    fake = _Unreachable()
    found = RedisClock(fake, "the records Redis")  # type: ignore[arg-type]
    for _ in range(8 * 70):  # 70 s of a loop that runs every 0.125 s (exact in binary)
        await found.upkeep()
        moments[0] += 0.125
    assert fake.tries == 70, "once a second while unmeasured"
    warned = [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()]
    assert warned == ["the records Redis's clock is not measured after a minute: this host's clock dates for it"]
    reachable = _FakeTime(0, 5.0)
    found._redis = reachable  # type: ignore[assignment]
    moments[0] += 1
    await found.upkeep()
    assert found.measured
    measured_at = moments[0]
    fake.tries = 0
    found._redis = fake  # type: ignore[assignment]  # counts the tries from here on
    while fake.tries == 0:
        moments[0] += 0.125
        await found.upkeep()
    assert moments[0] - measured_at == clock.SYNC_EVERY_S, "measured: again only after SYNC_EVERY_S"
    assert found.measured, "a failed try keeps the last measurement"
