"""The record script's call (gateway.record_store): four arguments a record and the keys listed once per tenant and
arm, read back as they were meant, whatever the ids and end users hold; a record whose numbers do not read is refused
alone."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.record_store import TRIMMED, TRIMMED_KEEP_S, RecordStore, Written
from gateway.tenants import Tenant
from tests.unit.test_recording import context, entry

pytestmark = pytest.mark.asyncio
ODD_USERS = ("ann smith", "zoë", "100% [x] ^$", "")
"""Spaces, a non-ASCII letter, Lua pattern characters, anonymous."""


def record(tenant: Tenant, n: int, user: str, **fields: Any) -> dict[str, Any]:
    built = entry(context(tenant, n, user=user or "x"))
    return {**built, "user": user, **fields}


async def test_a_call_of_many_tenants_arms_and_odd_names_lands_as_meant(redis: aioredis.Redis) -> None:
    acme, beta = Tenant(name="acme"), Tenant(name="beta")
    entries = [
        record(acme, 1, ODD_USERS[0], experiment="exp", arm="a", prompt_tokens=3, latency_bucket="25"),
        record(beta, 2, ODD_USERS[1], experiment="exp", arm="b", error=1),
        record(acme, 3, ODD_USERS[2], experiment="exp", arm="a", latency_bucket="250"),
        record(acme, 4, ODD_USERS[3], experiment="other", arm="a"),
        record(beta, 5, ODD_USERS[1], id="chatcmpl 5 with spaces"),
        record(beta, 6, ODD_USERS[3], experiment="exp", arm="a"),  # the same names as acme's arm: another arm
    ]
    assert await RecordStore(redis).write(entries) == Written(written=6)
    logs = {t: await redis.xrange(keys.completion_log(t)) for t in ("acme", "beta")}
    assert [f["c"] for _, f in logs["acme"]] == ["chatcmpl-1", "chatcmpl-3", "chatcmpl-4"]
    assert [f["c"] for _, f in logs["beta"]] == ["chatcmpl-2", "chatcmpl 5 with spaces", "chatcmpl-6"]
    assert [f["u"] for _, f in logs["acme"]] == ["ann smith", "100% [x] ^$", ""]
    assert [f["r"] for _, f in logs["acme"]] == [entries[0]["record"], entries[2]["record"], entries[3]["record"]]
    entry_ids = {f["c"]: entry_id for t in logs for entry_id, f in logs[t]}
    assert await redis.get(keys.completion("chatcmpl-1")) == f"acme {entry_ids['chatcmpl-1']} exp a"
    assert await redis.get(keys.completion("chatcmpl-2")) == f"beta {entry_ids['chatcmpl-2']} exp b"
    assert await redis.get(keys.completion("chatcmpl-4")) == f"acme {entry_ids['chatcmpl-4']} other a"
    assert await redis.get(keys.completion("chatcmpl 5 with spaces")) == f"beta {entry_ids['chatcmpl 5 with spaces']}"
    assert await redis.smembers(keys.end_user("beta", "zoë")) == {"chatcmpl-2", "chatcmpl 5 with spaces"}
    assert await redis.smembers(keys.end_user("acme", "100% [x] ^$")) == {"chatcmpl-3"}
    assert 0 < await redis.ttl(keys.end_user("acme", "ann smith")) <= entries[0]["ttl"]
    counters = await redis.hgetall(keys.arm_counters("acme", "exp", "a"))
    assert counters["requests"] == "2" and counters["prompt_tokens"] == "3" and counters["latency:250"] == "1"
    assert (await redis.hgetall(keys.arm_counters("beta", "exp", "b")))["errors"] == "1"
    assert (await redis.hgetall(keys.arm_counters("acme", "other", "a")))["anonymous"] == "1"
    assert await redis.pfcount(keys.arm_users("acme", "exp", "a")) == 2
    assert (await redis.hgetall(keys.arm_counters("beta", "exp", "a")))["requests"] == "1"
    where = redis.connection_pool.connection_kwargs
    raw = aioredis.Redis(host=where["host"], port=where["port"], db=where.get("db", 0))  # DUMP's bytes as they are
    before = {key: await raw.dump(key) for key in await raw.keys("*")}
    replayed = await RecordStore(redis).write(entries)  # a replay (the answer was lost, say)
    assert replayed == Written(written=0) and replayed.skipped(len(entries)) == 6
    assert {key: await raw.dump(key) for key in await raw.keys("*")} == before, "nothing written twice"
    await raw.aclose()


async def test_an_erased_user_and_a_deleted_tenants_records_are_skipped_in_the_same_call(
    redis: aioredis.Redis,
) -> None:
    """Each record is read against its own tenant's erasures and deletion, wherever it sits in the call."""
    gone, kept = Tenant(name="gone", created=1000.0), Tenant(name="kept")
    await redis.set(keys.forgotten("kept", "zoë"), "9999999999")
    await redis.set(keys.tenant_deleted("gone"), "1000.0 0")
    entries = [record(gone, 1, "ann"), record(kept, 2, "zoë"), record(kept, 3, "ann")]
    assert await RecordStore(redis).write(entries) == Written(written=1), "two skipped, none refused"
    assert await redis.xlen(keys.completion_log("gone")) == 0
    assert [f["c"] for _, f in await redis.xrange(keys.completion_log("kept"))] == ["chatcmpl-3"]
    assert await redis.get(keys.completion("chatcmpl-2")) == TRIMMED, "an erased user's: refuses its ratings"
    assert await redis.ttl(keys.completion("chatcmpl-2")) > TRIMMED_KEEP_S - 5


@pytest.mark.parametrize(
    "bad", [{"prompt_tokens": "many"}, {"ttl": "forever"}, {"created": None}, {"tenant_created": "x y"}]
)
async def test_a_record_whose_numbers_do_not_read_is_refused_alone(redis: aioredis.Redis, bad: dict[str, Any]) -> None:
    tenant = Tenant(name="t")
    entries = [record(tenant, n, "ann") for n in range(1, 4)]
    entries[1] = {**entries[1], **bad}
    assert await RecordStore(redis).write(entries) == Written({"chatcmpl-2"}, written=2)
    assert [f["c"] for _, f in await redis.xrange(keys.completion_log("t"))] == ["chatcmpl-1", "chatcmpl-3"]
