"""Quotas against a real Redis: exact across processes, tokens reserved then settled, OpenAI's headers,
and what happens when Redis is down."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import clock, keys, quotas
from gateway.errors import InvalidRequest, RateLimited, StateUnavailable
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.quota_leases import LeaseBook
from gateway.quota_scripts import UNLEASE
from gateway.quotas import MAX_USED_TOKENS, Admission, QuotaGate, _scopes, duration
from gateway.records import FeedbackIn
from gateway.tenants import Limits, Tenant
from tests.conftest import RedisServer, free_port, redis_client

KEY = Principal(tenant="acme", key_id="k1", role="inference")


async def attempt(
    gate: QuotaGate, tenant: Tenant, i: int, principal: Principal = KEY, cost: int = 10
) -> Admission | RateLimited:
    try:
        return await gate.admit(principal, tenant, f"req-{i}", cost)
    except RateLimited as refused:
        return refused


async def test_n_processes_admit_exactly_the_limit_between_them(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Four gate instances (as four gateway processes would hold, each with its own connection) and 200
    concurrent requests against 50 requests per minute: exactly 50 get through. Their leases outlive the burst:
    no flush runs here to give back what a lease past its lifetime still holds, as a gateway's does every 0.1 s,
    and on a loaded machine (CI's, the AVX2 kind's) the burst outlived the default 1 s: 44 got through (37-45
    with lifetimes of 0.5-10 ms, 50 with 1 s and more, on a quiet one)."""
    clients = [redis_client(redis_server.url, decode_responses=True) for _ in range(4)]
    gates = [QuotaGate(client, Metrics(), 256, leases=LeaseBook(lifetime_s=60)) for client in clients]
    tenant = Tenant(name="acme", limits=Limits(rpm=50))
    try:
        outcomes = await asyncio.gather(*(attempt(gates[i % 4], tenant, i) for i in range(200)))
    finally:
        for client in clients:
            await client.aclose()
    admitted = [o for o in outcomes if isinstance(o, Admission)]
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert (len(admitted), len(refused)) == (50, 150)
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted) == list(range(50))
    for refusal in refused:
        assert refusal.status == 429 and refusal.code == "rate_limit_exceeded" and refusal.type == "requests"
        assert refusal.headers["x-ratelimit-limit-requests"] == "50"
        assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(refusal.headers["retry-after"]) <= 60


async def test_tokens_are_reserved_then_settled_by_real_usage(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="acme", limits=Limits(tpm=1000))
    first = await gate.admit(KEY, tenant, "a", 400)
    await gate.admit(KEY, tenant, "b", 400)
    refused = await attempt(gate, tenant, 3, cost=400)
    assert isinstance(refused, RateLimited) and refused.type == "tokens"
    assert "needs 400" in refused.message
    gate.settle(first, used_tokens=50)  # it reserved 400 and used 50
    await gate.flush()
    admitted = await gate.admit(KEY, tenant, "c", 400)
    assert int(admitted.headers["x-ratelimit-remaining-tokens"]) == 1000 - 50 - 400 - 400
    assert admitted.headers["x-ratelimit-limit-tokens"] == "1000"


async def test_a_correction_whose_reply_was_lost_is_applied_once(redis: aioredis.Redis) -> None:
    """Redis applied the batch, then the connection dropped before its reply: sent again, it is not applied twice
    (twice, a negative correction would leave the window with room it does not have, for every process)."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="acme", limits=Limits(tpm=1000))
    first = await gate.admit(KEY, tenant, "a", 400)
    (counter,) = first.token_keys
    real = gate._settle  # noqa: SLF001

    async def reply_lost(keys: list[str], args: list[object]) -> object:
        await real(keys, args)
        raise ConnectionError("the connection dropped before the reply came")

    gate._settle = reply_lost  # type: ignore[assignment,method-assign] # noqa: SLF001
    gate.settle(first, used_tokens=50)
    await gate.flush()
    assert await redis.get(counter) == "50"
    gate._settle = real  # noqa: SLF001
    await gate.flush()
    assert await redis.get(counter) == "50", "not 400 - 350 - 350"
    second = await gate.admit(KEY, tenant, "b", 100)
    admitted = int(await redis.get(counter))  # 50, its 100 and the room of any lease it took
    gate.settle(second, used_tokens=10)
    await gate.flush()
    assert int(await redis.get(counter)) == admitted - 90, "the batches after it go on"


async def test_a_correction_neither_recreates_a_lost_window_nor_goes_below_zero(redis: aioredis.Redis) -> None:
    """Redis lost the window (a restart without it, an eviction) while requests were under way: their corrections,
    negative, do not re-create it below zero, which would give the tenant room it never had."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="acme", limits=Limits(tpm=1000))
    first, second = await gate.admit(KEY, tenant, "a", 400), await gate.admit(KEY, tenant, "b", 400)
    (counter,) = first.token_keys
    await redis.delete(counter)
    gate.settle(first, used_tokens=50)
    await gate.flush()
    assert await redis.exists(counter) == 0
    await redis.set(counter, 100, ex=120)  # what was admitted since, in the new window
    gate.settle(second, used_tokens=50)
    await gate.flush()
    assert await redis.get(counter) == "0" and 0 < await redis.ttl(counter) <= 120


async def test_an_absurd_usage_does_not_cost_the_corrections_batched_with_it(redis: aioredis.Redis) -> None:
    """An engine reporting 10**30 tokens: out of INCRBY's range, its correction would fail the batch's script half-way
    (the other corrections of the batch lost with it). It is taken as MAX_USED_TOKENS."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant, other = Tenant(name="acme", limits=Limits(tpm=1000)), Tenant(name="beta", limits=Limits(tpm=1000))
    absurd, fine = await gate.admit(KEY, tenant, "a", 400), await gate.admit(KEY, other, "b", 400)
    gate.settle(absurd, used_tokens=10**30)
    gate.settle(fine, used_tokens=50)
    await gate.flush()
    assert await redis.get(absurd.token_keys[0]) == str(MAX_USED_TOKENS)
    assert await redis.get(fine.token_keys[0]) == "50"


async def test_over_both_limits_retry_after_waits_for_the_later(redis: aioredis.Redis) -> None:
    """Over requests and tokens at once: Retry-After is when both have room, not when the requests' log does (a
    client that follows it would be refused again)."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="acme", limits=Limits(rpm=1, tpm=100))
    await gate.admit(KEY, tenant, "a", 100)
    refused = await attempt(gate, tenant, 2, cost=100)
    assert isinstance(refused, RateLimited) and refused.type == "requests"
    assert int(refused.headers["retry-after"]) > 60, "the tokens' window: this minute's rest and the next"


async def test_retry_after_ignores_a_limit_that_did_not_refuse(redis: aioredis.Redis) -> None:
    """Refused for tokens while this request would have taken the requests' last slot (0 remaining, not refused):
    Retry-After is the tokens' wait, not the requests' window (up to a minute of needless back-off)."""
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
    tenant = Tenant(name="acme", limits=Limits(rpm=10, tpm=100))
    for i in range(9):
        await gate.admit(KEY, tenant, f"r{i}", 10)
    checked = await gate._check(_scopes(KEY, tenant), tenant, "r9", 20)  # noqa: SLF001
    assert not isinstance(checked, Admission)
    found, _ = checked
    assert found[:2] == [0, 2] and found[3] == 0 and found[9] == 2, "tokens refused; the requests' slot was free"
    tokens_only = QuotaGate._refusal([0, 2, 10, 0, 40_000, 100, 0, 3_000, 0, 2], {}, 20)  # noqa: SLF001
    assert tokens_only.headers["retry-after"] == "3"
    both = QuotaGate._refusal([0, 1, 10, 0, 2_000, 100, 0, 40_000, 0, 3], {}, 20)  # noqa: SLF001
    assert both.headers["retry-after"] == "40"


async def test_a_key_limit_applies_on_top_of_its_tenant(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="acme", limits=Limits(rpm=100))
    limited = Principal(tenant="acme", key_id="k2", role="inference", rpm=2)
    outcomes = [await attempt(gate, tenant, i, limited) for i in range(3)]
    assert [type(o).__name__ for o in outcomes] == ["Admission", "Admission", "RateLimited"]
    assert outcomes[1].headers["x-ratelimit-limit-requests"] == "2", "the tighter scope is reported"  # type: ignore[union-attr]
    assert isinstance(await attempt(gate, tenant, 9), Admission), "other keys of the tenant go on"


async def test_a_rating_counts_toward_requests_per_minute_and_costs_no_tokens(redis: aioredis.Redis) -> None:
    """`POST /v1/feedback` takes one request of the minute's rpm (a tenant could flood the shared Redis with
    ratings otherwise), none of its tokens: a tenant whose tokens are used up can still rate its answers."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="rater", limits=Limits(rpm=3, tpm=100))
    assert isinstance(await attempt(gate, tenant, 0, cost=100), Admission), "the minute's tokens, all of them"
    rating = await gate.admit_request(KEY, tenant, "fb-1", 5)
    assert rating.reserved == 0 and not rating.token_keys
    assert rating.headers["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-limit-tokens" not in rating.headers
    await gate.admit_request(KEY, tenant, "fb-2", 5)
    with pytest.raises(RateLimited) as refused:
        await gate.admit_request(KEY, tenant, "fb-3", 5)
    assert refused.value.type == "requests" and refused.value.headers["retry-after"]
    refused_answer = await attempt(gate, tenant, 9, cost=1)
    assert isinstance(refused_answer, RateLimited) and refused_answer.type == "requests", "ratings took the rpm"


async def test_where_only_tokens_are_limited_a_rating_counts_its_text_in_tokens(redis: aioredis.Redis) -> None:
    """Without an rpm nothing counted ratings: a tenant limited by tokens alone could store 100 ratings of 110 KB on
    every one-token answer, in the Redis all tenants share. There a rating counts the tokens of its text."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="tokens-only", limits=Limits(tpm=100))
    rating = await gate.admit_request(KEY, tenant, "fb-1", 60)
    assert rating.headers["x-ratelimit-remaining-tokens"] == "40" and not rating.token_keys
    with pytest.raises(RateLimited) as refused:
        await gate.admit_request(KEY, tenant, "fb-2", 60)
    assert refused.value.type == "tokens"
    with pytest.raises(InvalidRequest) as never:
        await gate.admit_request(KEY, tenant, "fb-3", 101)
    assert never.value.param == "correction" and never.value.code == "tokens_over_limit"
    refused_answer = await attempt(gate, tenant, 9, cost=50)
    assert isinstance(refused_answer, RateLimited) and refused_answer.type == "tokens", "the rating took them"
    key_tokens_only = Principal(tenant="both", key_id="k-tok", role="inference", tpm=30)
    both = Tenant(name="both", limits=Limits(rpm=10, tpm=1000))
    admitted = await gate.admit_request(key_tokens_only, both, "fb-4", 20)
    assert admitted.headers["x-ratelimit-remaining-requests"] == "9", "the tenant's rpm: one request"
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "10", "the key's tpm alone: the text's tokens"


async def test_ratings_and_answers_share_the_room_leases_hold(redis: aioredis.Redis) -> None:
    """A rating asked Redis for a lease of its own (its scopes differ from the answers' when the tenant has a tpm):
    the answers could not see its room, and were refused while 12 requests' room sat in it."""
    gate = QuotaGate(redis, Metrics(), 256)
    tenant = Tenant(name="both", limits=Limits(rpm=100, tpm=10**9))
    log = keys.quota_requests("tenant:both")
    assert isinstance(await attempt(gate, tenant, 0), Admission)
    leased = await redis.zcard(log)
    assert leased > 1, "the answer's check took a lease"
    rating = await gate.admit_request(KEY, tenant, "fb-1", 5)
    assert await redis.zcard(log) == leased, "the rating took its room from the lease"
    assert "x-ratelimit-limit-tokens" not in rating.headers
    answers = [await attempt(gate, tenant, i) for i in range(1, 120)]
    admitted = sum(isinstance(a, Admission) for a in answers)
    assert admitted == 98, "100 a minute: one answer and one rating before, 98 answers now"
    other = Tenant(name="rater-first", limits=Limits(rpm=50, tpm=10**9))
    await gate.admit_request(KEY, other, "fb-2", 5)
    assert await redis.zcard(keys.quota_requests("tenant:rater-first")) == 1, "no lease of its own"
    assert sum([isinstance(await attempt(gate, other, i), Admission) for i in range(60)]) == 49


async def test_a_rating_is_admitted_while_redis_is_down_whatever_the_tenant_chose() -> None:
    """Ratings go to the fsynced spool while Redis is down; a fail-closed tenant's answers are refused then."""
    gate = QuotaGate(aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1), Metrics(), 256)
    strict = Tenant(name="strict", limits=Limits(rpm=1), on_redis_down="closed")
    assert (await gate.admit_request(KEY, strict, "fb", 5)).headers == {}
    with pytest.raises(StateUnavailable):
        await gate.admit(KEY, strict, "answer", 10)


async def test_no_limits_costs_no_redis_call(redis: aioredis.Redis) -> None:
    gate = QuotaGate(aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0"), Metrics(), 256)
    assert (await gate.admit(KEY, Tenant(name="free"), "x", 10)).headers == {}


async def test_redis_down_follows_the_tenant_setting_and_is_counted() -> None:
    metrics = Metrics()
    gate = QuotaGate(aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1), metrics, 256)
    opened = await gate.admit(KEY, Tenant(name="acme", limits=Limits(rpm=1), on_redis_down="open"), "x", 10)
    assert opened.headers == {}
    with pytest.raises(StateUnavailable):
        await gate.admit(KEY, Tenant(name="strict", limits=Limits(rpm=1), on_redis_down="closed"), "y", 10)
    assert metrics.quota_redis_failures.labels("acme", "open")._value.get() == 1
    assert metrics.quota_redis_failures.labels("strict", "closed")._value.get() == 1


async def test_quotas_not_checked_are_each_counted_and_logged_once_in_a_while(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line per request flooded the log at the request rate while Redis was down."""
    metrics = Metrics()
    gate = QuotaGate(aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1), metrics, 256)
    tenant = Tenant(name="acme", limits=Limits(rpm=1))
    with caplog.at_level("WARNING", logger="loragate.quotas"):
        for n in range(5):
            await gate.admit(KEY, tenant, f"r{n}", 10)
        monkeypatch.setattr(quotas, "DOWN_WARN_EVERY_S", 0.0)
        await gate.admit(KEY, tenant, "later", 10)
    said = [r.getMessage() for r in caplog.records if "not checked" in r.getMessage()]
    assert len(said) == 2 and "(4 more since the last such line)" in said[1], said
    assert metrics.quota_redis_failures.labels("acme", "open")._value.get() == 6


def test_reset_durations_read_like_openai() -> None:
    assert [duration(ms) for ms in (20, 999, 1000, 6_400, 60_000, 90_500)] == [
        "20ms",
        "999ms",
        "1s",
        "7s",
        "1m0s",
        "1m31s",
    ]


async def test_a_lost_lease_given_back_after_its_token_window_expired_leaves_no_counter(redis: aioredis.Redis) -> None:
    """A lease lost by its process is taken back from the request log and the token windows; a window that
    has expired meanwhile must not be re-created as a negative counter without a TTL (extra room forever)."""
    log_key, live, expired = "q:log", "q:tokens:live", "q:tokens:gone"
    await redis.zadd(log_key, {"req-1:1": 1.0, "req-1:2": 2.0})
    await redis.set(live, 100, ex=60)
    removed = await redis.eval(UNLEASE, 3, log_key, live, expired, 1, "req-1", 2, 10)
    assert removed == 2 and await redis.zcard(log_key) == 0
    assert int(await redis.get(live)) == 80 and await redis.ttl(live) > 0
    assert not await redis.exists(expired), "an expired window is not brought back below zero"


def test_rpm_and_tpm_0_mean_no_limit_on_the_command_line(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env |= {"LORAGATE_REDIS_URL": redis_server.url, "LORAGATE_HOME": str(tmp_path)}

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "gateway", *args], env=env, check=True, capture_output=True, text=True)

    cli("tenants", "create", "zero", "--rpm", "0", "--tpm", "500")
    cli("tenants", "update", "zero", "--rpm", "60", "--tpm", "0")
    stored = json.loads(asyncio.run(_get(redis_server.url, keys.tenant("zero"))))
    assert stored["limits"] == {"rpm": 60, "tpm": None}


async def _get(url: str, key: str) -> str:
    client = redis_client(url, decode_responses=True)
    try:
        return str(await client.get(key))
    finally:
        await client.aclose()


class SkewedTime:
    """The `time` module as a host whose clock is off by `offset_s` sees it."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def monotonic(self) -> float:
        return time.monotonic()


async def test_gateways_whose_clocks_differ_count_tokens_in_the_same_minute(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token windows are named by Redis's minute: a gateway whose clock runs a minute ahead adds to the same
    counter as one whose clock is right, so the two together admit the limit, not twice it."""
    tenant = Tenant(name="skew", limits=Limits(tpm=1000))
    admitted = 0
    for offset_s in (60.0, 0.0):
        monkeypatch.setattr(clock, "time", SkewedTime(offset_s))
        gate = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
        await gate.clock.sync()
        for i in range(int(offset_s), int(offset_s) + 20):
            admitted += isinstance(await attempt(gate, tenant, i, Principal("skew", "k1", "inference"), 100), Admission)
    assert admitted * 100 <= 1000


def test_a_ratings_tokens_are_the_characters_of_its_text_by_four() -> None:
    assert FeedbackIn(completion_id="c", thumbs="up").tokens() == 1, "one at least"
    text = FeedbackIn(completion_id="c", correction="x" * 1000, comment="y" * 99, labels=["ab"], user="u")
    assert text.tokens() == 276  # 1,102 characters
    message = FeedbackIn.model_validate_json(
        '{"completion_id": "c", "correction": {"role": "assistant", "content": "' + "z" * 40 + '"}}'
    )
    assert message.tokens() == 10
