"""Quota leases against a real Redis: a busy tenant's requests are admitted in-process, what a lease holds
counts as used at once (other processes never get more), what is left goes back, and near a limit every
request is checked in Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from gateway import keys, quota_leases
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.quota_leases import LeaseBook
from gateway.quotas import WINDOW_S, Admission, QuotaGate
from gateway.tenants import Limits, Tenant

KEY = Principal(tenant="acme", key_id="k1", role="inference")
BUSY = Tenant(name="acme", limits=Limits(rpm=10_000, tpm=10_000_000))


async def admit_many(gate: QuotaGate, tenant: Tenant, count: int, prefix: str, cost: int = 10) -> list[Admission]:
    return [await gate.admit(KEY, tenant, f"{prefix}-{i}", cost) for i in range(count)]


async def tokens_used(redis: aioredis.Redis, scope: str) -> int:
    """The scope's tokens in this minute's counter and the last one's: a test may cross a minute boundary,
    and what a lease gives back goes to the counter it was taken from."""
    minute = int(time.time() // WINDOW_S)
    counts = await redis.mget([keys.quota_tokens(scope, minute - 1), keys.quota_tokens(scope, minute)])
    return sum(int(count or 0) for count in counts)


async def script_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


async def test_a_busy_tenant_is_admitted_from_leases_and_the_rest_goes_back(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=2, max_requests=16))  # outlives a loaded machine's lag
    requests_log = keys.quota_requests("tenant:acme")
    first = await gate.admit(KEY, BUSY, "first", 10)
    assert await redis.zcard(requests_log) == 17, "one admitted and room for 16 more taken at once"
    assert await tokens_used(redis, "tenant:acme") == 170, "and their tokens"
    rest = await admit_many(gate, BUSY, 5, "next")
    assert await redis.zcard(requests_log) == 17, "five more came out of the lease, with no Redis call"
    remaining = [int(a.headers["x-ratelimit-remaining-requests"]) for a in [first, *rest]]
    assert remaining == list(range(9_999, 9_993, -1)), "the headers count down as Redis would have"
    assert [int(a.headers["x-ratelimit-remaining-tokens"]) for a in rest][-1] == 10_000_000 - 60
    await asyncio.sleep(2.1)
    await gate.flush()
    assert await redis.zcard(requests_log) == 6, "the 11 unused went back"
    assert await tokens_used(redis, "tenant:acme") == 60


async def test_requests_from_a_lease_are_timed_when_admitted(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=5))
    await gate.admit(KEY, BUSY, "first", 10)
    (granted_at,) = [
        score for _, score in await redis.zrange(keys.quota_requests("tenant:acme"), 0, 0, withscores=True)
    ]
    await asyncio.sleep(0.3)
    await gate.admit(KEY, BUSY, "later", 10)
    await gate.flush()
    scores = dict(await redis.zrange(keys.quota_requests("tenant:acme"), 0, -1, withscores=True))
    assert scores["first:1"] >= granted_at + 0.3, "the member taken is re-timed to its admission"
    assert scores["first:16"] == granted_at, "the ones not taken yet keep the grant's time"


async def test_another_process_sees_a_lease_as_used(redis: aioredis.Redis) -> None:
    """A lease never lets N processes admit more than the limit: what one holds is gone for the others,
    even if it dies holding it (the window then moves past it)."""
    tenant = Tenant(name="acme", limits=Limits(rpm=200))
    holder = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=60, max_requests=16))
    other = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
    await holder.admit(KEY, tenant, "holder", 10)  # leases floor(199 / 8) = 16 more
    outcomes = []
    for i in range(200):
        try:
            outcomes.append(await other.admit(KEY, tenant, f"other-{i}", 10))
        except RateLimited as refused:
            outcomes.append(refused)
    assert sum(isinstance(o, Admission) for o in outcomes) == 200 - 17
    assert len(await admit_many(holder, tenant, 16, "holder-more")) == 16, "the holder still has its 16"


async def test_a_lease_used_up_within_its_lifetime_doubles_the_next_and_one_left_unused_halves_it(
    redis: aioredis.Redis,
) -> None:
    """Busy: 16, then 32, then 64 (the most, here); quiet: a lease that runs out of time mostly unused makes the
    next ask half as large."""
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=1.0, max_requests=64))
    requests_log = keys.quota_requests("tenant:acme")
    await gate.admit(KEY, BUSY, "first", 10)
    counted, lease = 1 + 16, 16
    for step, grant in enumerate((32, 64, 64)):
        await admit_many(gate, BUSY, lease, f"from-{step}")  # all from the lease: nothing more counted
        assert await redis.zcard(requests_log) == counted
        await gate.admit(KEY, BUSY, f"ask-{step}", 10)  # the lease is used up: this one asks for the next
        counted, lease = counted + 1 + grant, grant
        assert await redis.zcard(requests_log) == counted, f"a lease of {grant} taken at once"
    await asyncio.sleep(1.05)
    await gate.flush()  # the last lease ran out with all 64 unused: they go back, and the next ask is for 32
    assert await redis.zcard(requests_log) == counted - 64
    await gate.admit(KEY, BUSY, "quiet", 10)
    assert await redis.zcard(requests_log) == counted - 64 + 1 + 32


async def test_a_request_too_large_for_a_lease_with_room_does_not_grow_the_next(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=60, max_requests=64))
    await gate.admit(KEY, BUSY, "first", 10)  # a lease of 16 requests, 160 tokens
    await gate.admit(KEY, BUSY, "large", 500)  # checked in Redis: the lease had room, just not for this one
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 17 + 1 + 16, "the next lease is 16, not 32"


async def test_a_lease_the_next_ask_finds_run_out_mostly_unused_halves_it(redis: aioredis.Redis) -> None:
    """No flush came between the lease running out and the next ask: the ask shrinks it all the same."""
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=2, max_requests=64))
    requests_log = keys.quota_requests("tenant:acme")
    await admit_many(gate, BUSY, 1 + 16 + 1, "busy")  # the first lease used up at once: the next is 32
    assert await redis.zcard(requests_log) == 1 + 16 + 1 + 32
    await asyncio.sleep(2.1)  # and it runs out unused
    await gate.admit(KEY, BUSY, "after", 10)
    assert await redis.zcard(requests_log) == 1 + 16 + 1 + 32 + 1 + 16


async def test_an_outage_leaves_one_lost_ask_to_undo_not_one_per_request(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=60, max_requests=64))
    await gate.admit(KEY, Tenant(name="other", limits=BUSY.limits), "script-loaded", 10)
    real = gate._admit  # noqa: SLF001

    async def down(keys: list[str], args: list[object]) -> object:
        raise ConnectionError("Redis is away")

    gate._admit = down  # type: ignore[assignment,method-assign] # noqa: SLF001
    for i in range(5):
        assert (await gate.admit(KEY, BUSY, f"during-{i}", 10)).headers == {}, "fail-open"
    gate._admit = real  # type: ignore[method-assign] # noqa: SLF001
    await redis.config_resetstat()
    await gate.flush()
    undone = int((await redis.info("commandstats")).get("cmdstat_zrem", {}).get("calls", 0))
    assert undone == 16, f"{undone} members removed: one lost ask of 16, not five"
    await admit_many(gate, BUSY, 2, "back")
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 1 + 1 + 16, "answered again: then a lease"


async def test_after_a_quiet_while_leases_start_small_again(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota_leases, "QUIET_S", 2.5)
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=2, max_requests=64))
    requests_log = keys.quota_requests("tenant:acme")
    await admit_many(gate, BUSY, 1 + 16 + 1, "busy")  # the first lease used up at once: the next is 32
    await admit_many(gate, BUSY, 32, "all-of-it")  # and all of it taken: nothing to shrink it
    assert await redis.zcard(requests_log) == 1 + 16 + 1 + 32
    await asyncio.sleep(2.6)
    await gate.admit(KEY, BUSY, "after", 10)
    assert await redis.zcard(requests_log) == 1 + 16 + 1 + 32 + 1 + 16, "quiet for a while: 16 again, not 32"


async def test_near_a_limit_every_request_is_checked_in_redis(redis: aioredis.Redis) -> None:
    tenant = Tenant(name="acme", limits=Limits(rpm=8, tpm=100_000))
    gate = QuotaGate(redis, Metrics(), 256)
    await admit_many(gate, tenant, 3, "small")
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 3, "floor(7 / 8) = 0: nothing leased"
    roomy = Tenant(name="roomy", limits=Limits(tpm=1000))
    await gate.admit(KEY, roomy, "big", 400)
    assert await tokens_used(redis, "tenant:roomy") == 400, "an eighth of the 600 left does not cover another 400"


async def test_a_refused_request_waits_for_the_lease_in_flight(redis: aioredis.Redis) -> None:
    """Within one process, the last requests under a limit are admitted from a lease that was granted while
    they were on their way, not refused while its room sits unused."""
    tenant = Tenant(name="acme", limits=Limits(rpm=40))
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=60))
    outcomes = await asyncio.gather(*(gate.admit(KEY, tenant, f"r-{i}", 10) for i in range(60)), return_exceptions=True)
    assert sum(isinstance(o, Admission) for o in outcomes) == 40
    assert all(isinstance(o, RateLimited) for o in outcomes if not isinstance(o, Admission))


async def test_requests_that_come_while_a_lease_is_asked_for_wait_for_it(redis: aioredis.Redis) -> None:
    """16 requests at once, none leased yet: the first asks Redis for a lease, the other 15 wait for its answer
    and are admitted from it, so the burst costs one round trip, not 16."""
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=60, max_requests=16))
    await gate.admit(KEY, Tenant(name="other", limits=BUSY.limits), "script-loaded", 10)
    before = await script_calls(redis)
    admitted = await asyncio.gather(*(gate.admit(KEY, BUSY, f"burst-{i}", 10) for i in range(16)))
    calls = await script_calls(redis) - before
    assert len(admitted) == 16 and calls == 1, f"{calls} quota checks in Redis for the burst"
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 17, "one admitted, 16 leased (15 taken)"
    remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted)
    assert remaining == list(range(9_984, 10_000)), "each request's headers count one more taken"


async def test_room_asked_for_in_a_call_whose_answer_was_lost_goes_back(redis: aioredis.Redis) -> None:
    """Redis ran the check but its answer never came (a timeout, a dropped connection): whatever it granted is
    removed at the next flush, not left counted for the rest of the minute."""
    gate = QuotaGate(redis, Metrics(), 256)
    real = gate._admit  # noqa: SLF001

    async def answer_lost(keys: list[str], args: list[object]) -> object:
        await real(keys, args)
        raise ConnectionError("the connection dropped before the answer came")

    gate._admit = answer_lost  # type: ignore[assignment,method-assign] # noqa: SLF001
    assert (await gate.admit(KEY, BUSY, "lost", 10)).headers == {}, "fail-open, as for any Redis error"
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 17
    await gate.flush()
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 1, "only the request itself stays counted"
    assert await tokens_used(redis, "tenant:acme") == 10


async def test_what_a_failed_flush_could_not_send_goes_with_the_next(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=0.05))
    await admit_many(gate, BUSY, 3, "r")
    await asyncio.sleep(0.1)
    real = gate._retime  # noqa: SLF001

    class Down:
        async def many(self, calls: object) -> None:
            raise ConnectionError("Redis is away")

    gate._retime = Down()  # type: ignore[assignment] # noqa: SLF001
    await gate.flush()
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 17, "nothing given back yet"
    gate._retime = real  # noqa: SLF001
    await gate.flush()
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 3
    assert await tokens_used(redis, "tenant:acme") == 30


async def test_a_key_with_limits_of_its_own_takes_no_lease(redis: aioredis.Redis) -> None:
    """Such a lease would hold its tenant's room away from the tenant's other keys."""
    gate = QuotaGate(redis, Metrics(), 256)
    limited = Principal(tenant="acme", key_id="k2", role="inference", rpm=1000)
    await gate.admit(limited, BUSY, "keyed", 10)
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 1
    assert await redis.zcard(keys.quota_requests("key:k2")) == 1


async def test_token_headers_count_what_each_request_reserved(redis: aioredis.Redis) -> None:
    gate = QuotaGate(redis, Metrics(), 256)
    first = await gate.admit(KEY, BUSY, "first", 1000)
    small = await gate.admit(KEY, BUSY, "small", 10)
    big = await gate.admit(KEY, BUSY, "big", 500)
    remaining = [int(a.headers["x-ratelimit-remaining-tokens"]) for a in (first, small, big)]
    assert remaining == [10_000_000 - 1000, 10_000_000 - 1010, 10_000_000 - 1510]


async def full_but_for_a_run_out_lease(redis: aioredis.Redis) -> tuple[QuotaGate, Tenant]:
    """20 requests a minute, all taken: 1 by a gate and 2 in its lease, which has run out (its room still
    counted: no flush yet), and 17 by another process."""
    tenant = Tenant(name="acme", limits=Limits(rpm=20))
    gate = QuotaGate(redis, Metrics(), 256, LeaseBook(lifetime_s=0.05))
    other = QuotaGate(redis, Metrics(), 256, LeaseBook(max_requests=0))
    await gate.admit(KEY, tenant, "holder", 10)  # leases floor(19 / 8) = 2 more
    for i in range(17):
        await other.admit(KEY, tenant, f"other-{i}", 10)
    await asyncio.sleep(0.1)
    return gate, tenant


async def test_a_refused_request_uses_a_lease_past_its_lifetime_not_yet_given_back(redis: aioredis.Redis) -> None:
    """Its room is still counted in Redis until the next flush, so it is this process's to use."""
    gate, tenant = await full_but_for_a_run_out_lease(redis)
    assert isinstance(await gate.admit(KEY, tenant, "late", 10), Admission)


async def test_a_request_refused_as_its_process_gives_room_back_is_checked_again(redis: aioredis.Redis) -> None:
    """Redis refused it while a run-out lease's room was still counted, and the flush gave that room back before
    the answer was read: the request is checked once more rather than refused with room free."""
    gate, tenant = await full_but_for_a_run_out_lease(redis)
    real = gate._admit  # noqa: SLF001

    async def flush_lands_meanwhile(keys: list[str], args: list[object]) -> object:
        reply = await real(keys, args)
        await gate.flush()
        return reply

    gate._admit = flush_lands_meanwhile  # type: ignore[assignment,method-assign] # noqa: SLF001
    assert isinstance(await gate.admit(KEY, tenant, "late", 10), Admission)
    assert await redis.zcard(keys.quota_requests("tenant:acme")) == 19, "holder, 17 others and late"


async def test_scopes_whose_ask_was_lost_leave_the_book_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A revoked key's scopes, failing when last seen, are not kept for the process's life."""
    book = LeaseBook(max_requests=64)
    gone, kept = (("key:gone", None, None),), (("key:kept", None, None),)
    for scopes in (gone, kept):
        assert book.ask(scopes) == 16
        book.answer(scopes, 16, None, f"{scopes[0][0]}-1", 10, ([], []))
        assert book.ask(scopes) == 0, "failing: no lease asked for until a check is answered"
    book.due()
    assert book.ask(gone) == 0, "still failing a moment later"
    monkeypatch.setattr(quota_leases, "FAILING_KEEP_S", 0.0)
    book.due()
    assert not book._failing, "both left the map"  # noqa: SLF001
    assert book.ask(kept) == 16, "asked for again after FAILING_KEEP_S"
