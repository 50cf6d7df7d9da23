"""A Redis that answers but refuses writes for now (full, demoted by a failover, loading) is waited for as an
unreachable one is: records spool, a replay stops and keeps the spool, and nothing is dropped as a bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.conftest import RedisServer
from tests.unit.test_recording import context, entry


async def refuse_writes(redis: aioredis.Redis, how: str, refuse: bool) -> None:
    if how == "oom":
        await redis.config_set("maxmemory", 1 if refuse else 0)
    else:  # a replica of a primary that is not there: READONLY
        await redis.execute_command("REPLICAOF", *(("127.0.0.1", "1") if refuse else ("NO", "ONE")))


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("how", ["oom", "readonly"])
async def test_records_wait_while_redis_refuses_writes(
    own_redis: RedisServer, tmp_path: Path, how: str, workers: int
) -> None:
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    metrics = Metrics()
    recorder = Recorder(redis, spool, metrics, workers=workers, redis_url=own_redis.url)
    tenant = Tenant(name="t")
    try:
        await spool.append([entry(context(tenant, n)) for n in range(5)])  # from an earlier outage
        recorder.degraded = True
        await refuse_writes(redis, how, refuse=True)
        recorder.record(context(tenant, 5))
        await recorder._cycle()  # the replay is refused, so the new record spools behind the others
        assert (recorder.degraded, spool.pending()) == (True, 6)
        assert metrics.registry.get_sample_value("loragate_records_dropped_total", {"reason": "refused"}) is None
        await refuse_writes(redis, how, refuse=False)
        recorder._retry_at = 0
        recorder.record(context(tenant, 6))
        await recorder._cycle()
        logged = [json.loads(fields["r"])["id"] for _, fields in await redis.xrange(keys.completion_log("t"))]
        assert logged == [f"chatcmpl-{n}" for n in range(7)] and spool.pending() == 0
    finally:
        await recorder.close()
        await redis.aclose()
        spool.close()
