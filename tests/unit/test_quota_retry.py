"""When a refused request may come back: the scope that refused is the one reported, and Retry-After is when
the room it needs is back, not sooner (real Redis; the logs and counters written as earlier requests left them)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.quota_leases import LeaseBook
from gateway.quotas import WINDOW_S, QuotaGate
from gateway.tenants import Limits, Tenant

ANY_KEY = Principal(tenant="acme", key_id="k-a", role="inference")
TIGHT_KEY = Principal(tenant="acme", key_id="k-b", role="inference", rpm=1)


async def redis_now(redis: aioredis.Redis) -> float:
    seconds, micros = await redis.time()
    return seconds + micros / 1e6


async def refusal(gate: QuotaGate, caller: Principal, tenant: Tenant, cost: int = 1) -> RateLimited:
    with pytest.raises(RateLimited) as refused:
        await gate.admit(caller, tenant, "late", cost)
    return refused.value


async def test_a_keys_own_limit_is_reported_when_it_refuses(redis: aioredis.Redis) -> None:
    """Tenant rpm 3 (2 used, the older 58 s ago), the key's own rpm 1 (used 1 s ago): the key refuses; its
    slot frees in 59 s, the tenant's in 2 s."""
    now = await redis_now(redis)
    await redis.zadd(keys.quota_requests("tenant:acme"), {"a": now - 58, "b": now - 1})
    await redis.zadd(keys.quota_requests("key:k-b"), {"b": now - 1})
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
    refused = await refusal(gate, TIGHT_KEY, Tenant(name="acme", limits=Limits(rpm=3)))
    assert refused.headers["x-ratelimit-limit-requests"] == "1" and "limit 1" in refused.message
    assert 58 <= int(refused.headers["retry-after"]) <= 60


async def test_a_limit_lowered_below_what_was_used_waits_for_enough_room(redis: aioredis.Redis) -> None:
    now = await redis_now(redis)
    await redis.zadd(keys.quota_requests("tenant:acme"), {f"r{i}": now - 50 + 10 * i for i in range(5)})
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
    refused = await refusal(gate, ANY_KEY, Tenant(name="acme", limits=Limits(rpm=2)))  # 5 in the window
    assert 38 <= int(refused.headers["retry-after"]) <= 41, "the 4th oldest must go: in 40 s, not 10"


async def test_tokens_come_back_when_the_last_minutes_weight_has_fallen_enough(redis: aioredis.Redis) -> None:
    """tpm 1000, 950 used this minute, 100 asked: at the next minute this minute's 950 still weigh nearly all;
    they weigh 900 or less 1 - 900/950 of the way into it, 3.2 s."""
    while WINDOW_S - (await redis_now(redis)) % WINDOW_S < 3:  # not at a minute's very end
        await asyncio.sleep(0.5)
    now = await redis_now(redis)
    await redis.set(keys.quota_tokens("tenant:acme", int(now // WINDOW_S)), 950)
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
    await gate.clock.sync()
    refused = await refusal(gate, ANY_KEY, Tenant(name="acme", limits=Limits(tpm=1000)), cost=100)
    after = await redis_now(redis)  # the refusal came between `now` and `after`: its wait between theirs

    def expected(at: float) -> float:
        return WINDOW_S - at % WINDOW_S + (1 - 900 / 950) * WINDOW_S

    retry = int(refused.headers["retry-after"])
    assert expected(after) - 1.5 <= retry <= expected(now) + 1.5, (refused.headers, expected(now), expected(after))
