"""Records past their tenant's age limit have lost their completion index and their end user's set (both expire
at that age) before the trim, once a minute, reaches them: erasure finds them all the same, and the trim drops
them exactly, not only once a whole stream node is old.

The limit is two seconds: a record is dropped as it is written once it is past its limit, and the trim drops those
past it, so each step has that long to run on a busy machine (with one second, a second's stall between `record`
and the write lost bo's last record). The record within the limit is made under a longer one (the limit raised
since): its write cannot come too late; the trim, with the two-second limit, drops it only past a stall of two
seconds between them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.erasure import forget_user, id_and_user
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.records import LogPolicy
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.unit.test_recording import context

TENANT = Tenant(name="t", logging=LogPolicy(max_age_days=2 / 86400))  # records kept for two seconds
RAISED = Tenant(name="t", logging=LogPolicy(max_age_days=3600 / 86400))  # the same tenant, its limit raised since


@pytest.fixture
async def aged(redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Recorder]:
    """Three records of ann and one of bo past the age limit (their indexes expired), then one of bo's within it."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics())
    for n, user in enumerate(["ann", "bo", "ann", "ann"]):
        recorder.record(context(TENANT, n, user=user))
    await recorder._cycle()
    await asyncio.sleep(2.3)
    assert await redis.exists(keys.completion("chatcmpl-0"), keys.end_user("t", "ann")) == 0, "expired"
    recorder.record(context(RAISED, 9, user="bo"))
    await recorder._cycle()
    yield recorder
    await recorder.close()
    spool.close()


async def users_in_log(redis: aioredis.Redis) -> list[str]:
    return [json.loads(fields["r"])["user"] for _, fields in await redis.xrange(keys.completion_log("t"))]


async def test_erasure_finds_records_whose_index_has_expired(redis: aioredis.Redis, aged: Recorder) -> None:
    removed = await forget_user(redis, "t", "ann", TENANT.logging)
    assert removed == {"completions": 3, "feedback": 0}
    assert await users_in_log(redis) == ["bo", "bo"]


async def test_the_trim_drops_every_record_past_the_age_limit(redis: aioredis.Redis, aged: Recorder) -> None:
    await aged.trim({"t": TENANT.logging})
    assert await users_in_log(redis) == ["bo"], "only the record within the age limit, though it shares a node"


async def test_erasure_finds_entries_as_older_versions_wrote_them(redis: aioredis.Redis, aged: Recorder) -> None:
    """Entries written before they named their completion and end user (`c`, `u`) hold only the record: erasure
    reads those two from it (newer entries are not parsed: a record is up to 256 K characters)."""
    for n, user in ((20, "ann"), (21, "bo")):
        record = {"id": f"chatcmpl-{n}", "tenant": "t", "user": user}
        await redis.xadd(keys.completion_log("t"), {"r": json.dumps(record)})  # no index: as if past its age
    assert id_and_user({"r": "{}"}) == (None, None) and id_and_user({"r": "{}", "c": "x", "u": ""}) == ("x", None)
    removed = await forget_user(redis, "t", "ann", TENANT.logging)
    assert removed == {"completions": 4, "feedback": 0}
    assert await users_in_log(redis) == ["bo", "bo", "bo"]
