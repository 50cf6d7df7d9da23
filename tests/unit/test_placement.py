"""Placement against a stand-in for vLLM's LoRA endpoints and a real Redis: single flight, LRU, pinning,
affinity, and residency shared by two gateway processes."""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.manifest import Manifest
from adapters.registry import Registry
from gateway import app as app_module
from gateway import clock, keys, residency
from gateway import placement as placement_module
from gateway.app import UPSTREAM_KEEPALIVE_S
from gateway.engine import pool as pool_module
from gateway.engine.pool import Replica, ReplicaPool
from gateway.engine.sessions import EngineSessions
from gateway.errors import UpstreamError
from gateway.metrics import Metrics
from gateway.placement import SPREAD_MARGIN, Placement
from gateway.residency import Residency
from gateway.routing import Route
from tests.conftest import RedisServer, redis_client
from tests.unit.test_quotas import SkewedTime


class FakeVLLM:
    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.loaded: set[str] = set()
        self.broken = False
        self.refuse: set[str] = set()
        """Names it answers 400 for, as vLLM does for an adapter it cannot load."""
        self.listing_broken = False
        self.drop_reused = False
        """Close a connection at a load sent on it after an earlier request, as vLLM one idle past its keep-alive."""
        self.dropped = 0
        self.health_checks = 0
        self.connections: list[object] = []
        """The connections it has answered on (held, so that a new one never takes a closed one's id)."""
        self.health_s = 0.05
        """How long /health takes to answer."""
        self.posted: Counter[str] = Counter()
        """Loads asked for, whatever their answer."""
        self.hold: asyncio.Event | None = None
        """Set: each load waits for it (a replica hung in a load)."""
        self.holding = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        return app

    async def health(self, request: web.Request) -> web.Response:
        self.connections.append(request.transport)
        self.health_checks += 1
        await asyncio.sleep(self.health_s)
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        self.connections.append(request.transport)
        if self.listing_broken:
            return web.Response(status=500, text="Internal Server Error")
        data = [{"id": "base", "parent": None}] + [{"id": n, "parent": "base"} for n in sorted(self.loaded)]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posted[body["lora_name"]] += 1
        if self.drop_reused and any(request.transport is known for known in self.connections):
            self.dropped += 1
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
        self.connections.append(request.transport)
        if self.hold is not None:
            self.holding += 1
            await self.hold.wait()
        if self.broken:
            return web.Response(status=500, text="Internal Server Error")
        if body["lora_name"] in self.refuse:
            self.loads[body["lora_name"]] += 1
            return web.Response(status=400, text="Loading lora failed: bad adapter")
        await asyncio.sleep(0.05)
        self.loads[body["lora_name"]] += 1
        self.loaded.add(body["lora_name"])
        return web.Response(text="Success")

    async def unload(self, request: web.Request) -> web.Response:
        self.loaded.discard((await request.json())["lora_name"])
        return web.Response(text="Success")


def route(name: str) -> Route:
    manifest = Manifest(
        name=name,
        version=1,
        base_model="b",
        base_architecture="x",
        rank=8,
        alpha=16,
        target_modules=["q_proj"],
        dtype="F32",
        size_bytes=1,
        files={},
    )
    return Route(
        requested=name,
        upstream_model=manifest.ref,
        served_model=manifest.ref,
        adapter=manifest,
        adapter_path="/nowhere",
    )


async def gateway_process(
    urls: list[str], redis_url: str, tmp_path: Path, protect_s: float = 0.0, keepalive_s: float = UPSTREAM_KEEPALIVE_S
) -> tuple[Placement, ReplicaPool, EngineSessions]:
    """What one gateway process holds: its own pool and view of the replicas, its sessions to them (closed by the
    caller; `keepalive_s`: how long a pooled connection is kept), a shared Redis."""
    import redis.asyncio as aioredis

    sessions = EngineSessions(keepalive_s)
    pool = ReplicaPool(urls, sessions.fresh, interval_s=60)
    await pool.check_all()
    registry = Registry(tmp_path)
    registry.verify_once = lambda manifest: None  # type: ignore[method-assign]
    registry.deleted = lambda name: False  # type: ignore[method-assign]
    redis = aioredis.from_url(redis_url, decode_responses=True)
    residency = Residency(redis, sessions.pooled, capacity=3, protect_s=protect_s)
    return Placement(pool, sessions, registry, Metrics(), residency), pool, sessions


@pytest.fixture
async def fakes():  # type: ignore[no-untyped-def]
    """Two stand-in vLLM replicas; yields (fakes, urls)."""
    fakes = [FakeVLLM(), FakeVLLM()]
    runners = []
    urls = []
    for fake in fakes:
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    yield fakes, urls
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def setup(fakes, redis_server: RedisServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    placement, pool, sessions = await gateway_process(fakes[1], redis_server.url, tmp_path)
    yield placement, pool, fakes[0]
    await sessions.close()


async def use(placement: Placement, r: Route) -> Replica:
    """One request's placement, from choosing a replica to its reaching vLLM."""
    replica = await placement.acquire(r)
    placement.release(replica, r)
    return replica


async def test_concurrent_cold_requests_share_one_load(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    replicas = await asyncio.gather(*(placement.acquire(route("a")) for _ in range(100)))
    assert len(set(replicas)) == 1
    assert sum(f.loads["a@1"] for f in fakes) == 1


async def test_a_load_that_meets_a_closed_pooled_connection_is_sent_again_on_a_new_one(
    fakes: tuple[list[FakeVLLM], list[str]], redis_server: RedisServer, tmp_path: Path
) -> None:
    """vLLM closes a connection idle past its keep-alive: a load (the first request for a new version, after a lull)
    sent on one the gateway had kept is sent again on a new connection, not on the other one it kept (closed too),
    and the replica stays in. (Pooled connections kept a minute here: a loaded machine may take seconds.)"""
    fake, url = fakes[0][0], fakes[1][0]
    placement, pool, sessions = await gateway_process([url], redis_server.url, tmp_path, keepalive_s=60)
    fake.drop_reused = True
    await asyncio.gather(*(placement._residency.loaded(url) for _ in range(2)))  # noqa: SLF001  # two kept
    try:
        replica = await use(placement, route("a"))
    finally:
        await sessions.close()
    assert fake.dropped == 1 and fake.loads["a@1"] == 1
    assert replica.healthy and "a@1" in replica.resident
    resent = placement._metrics.registry.get_sample_value("loragate_upstream_resent_total", {"replica": url})  # noqa: SLF001
    assert resent == 1


async def test_checks_of_a_replica_asked_together_share_one_request(fakes: tuple[list[FakeVLLM], list[str]]) -> None:
    """A burst of requests that met closed connections (or of readiness probes) asks the engine once, and every
    caller gets its answer; one asked afterwards asks again."""
    fake, url = fakes[0][0], fakes[1][0]
    sessions = EngineSessions(UPSTREAM_KEEPALIVE_S)
    try:
        pool = ReplicaPool([url], sessions.fresh, interval_s=60)
        assert await asyncio.gather(*(pool.check(pool.replicas[0]) for _ in range(20))) == [True] * 20
        assert fake.health_checks == 1 and pool.replicas[0].healthy
        assert await pool.check(pool.replicas[0]) and fake.health_checks == 2
    finally:
        await sessions.close()


async def test_lru_eviction_respects_capacity_and_pins(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    placement.pinned = {"hot@1"}
    for name in ("hot", "a", "b", "c", "d"):
        replica = await use(placement, route(name))
    assert replica is pool.replicas[0]
    assert list(pool.replicas[0].resident) == ["hot@1", "c@1", "d@1"]
    assert fakes[0].loaded == {"hot@1", "c@1", "d@1"}
    await use(placement, route("c"))
    await use(placement, route("e"))
    assert list(pool.replicas[0].resident) == ["hot@1", "c@1", "e@1"], "d was least recently used"


async def test_an_adapter_vllm_refuses_is_not_tried_again_at_every_request(setup) -> None:  # type: ignore[no-untyped-def]
    """Each try would take the replica's lock and make room first: another tenant's adapter would be evicted."""
    placement, pool, fakes = setup
    for fake in fakes:
        fake.refuse = {"bad@1"}
    for name in ("a", "b", "c"):
        await use(placement, route(name))
    for _ in range(5):
        with pytest.raises(UpstreamError):
            await use(placement, route("bad"))
    assert sum(fake.loads["bad@1"] for fake in fakes) == 1, "refused once: not asked again for a while"
    assert {"b@1", "c@1"} <= set().union(*(fake.loaded for fake in fakes)), "one eviction for it (a), no more"


async def test_a_load_that_failed_on_a_replica_is_not_tried_there_again_for_a_while(setup) -> None:  # type: ignore[no-untyped-def]
    """A 500 to a load (an exception in vLLM's adapter parsing) evicted an adapter at every request, on every
    replica: each replica is now asked once in FAILED_S, and the other replicas still are."""
    placement, pool, fakes = setup
    fakes[0].broken = fakes[1].broken = True
    for _ in range(4):
        with pytest.raises(UpstreamError):
            await use(placement, route("bad"))
    assert [fake.posted["bad@1"] for fake in fakes] == [1, 1], "each replica asked once"
    fakes[1].broken = False
    assert await use(placement, route("good")) is pool.replicas[1], "a failure of one adapter blocks no other"


async def test_refusals_past_their_time_leave_the_map(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Adapters refused once and never asked for again are not kept for the process's life."""
    placement, pool, fakes = setup
    for fake in fakes:
        fake.refuse = {"bad@1", "worse@1"}
    monkeypatch.setattr(placement_module, "REFUSED_S", 0.0)
    for name in ("bad", "worse"):
        with pytest.raises(UpstreamError):
            await use(placement, route(name))
    assert list(placement._refused) == ["worse@1"], "bad's refusal, past its time, left when worse's came"  # noqa: SLF001


async def test_uses_of_adapters_gone_from_the_replica_are_forgotten(setup) -> None:  # type: ignore[no-untyped-def]
    """Another process evicted it: this process's record of its uses goes at the next look at vLLM's list."""
    placement, pool, fakes = setup
    replica = await use(placement, route("a"))
    holder = fakes[pool.replicas.index(replica)]
    assert "a@1" in placement._residency._used[replica.url]  # noqa: SLF001
    holder.loaded.discard("a@1")
    await placement.maintain([])
    assert "a@1" not in placement._residency._used[replica.url]  # noqa: SLF001
    assert "a@1" not in replica.resident


async def test_busy_holder_spreads_to_idle_replica(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    first = await placement.acquire(route("a"))
    first.inflight = SPREAD_MARGIN
    assert await placement.acquire(route("a")) is first
    first.inflight = SPREAD_MARGIN + 1
    second = await placement.acquire(route("a"))
    assert second is not first and "a@1" in second.resident


async def test_down_replica_is_avoided_and_forgets_its_adapters(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    first = await use(placement, route("a"))
    first.mark_down()
    other = await use(placement, route("a"))
    assert other is not first
    fakes[pool.replicas.index(first)].loaded.clear()  # it restarted
    await pool.check(first)
    assert first.healthy and first.resident == {}, "a replica that restarted holds nothing"


async def test_a_replica_is_down_after_three_health_checks_in_a_row_it_left_unanswered(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One late answer (an engine busy on 2 cores) took it down, and every request with it, until the next check."""
    placement, pool, fakes = setup
    monkeypatch.setattr(pool_module, "HEALTH_TIMEOUT_S", 0.2)
    replica, fake = pool.replicas[0], fakes[0]
    fake.health_s = 1.0
    assert [await pool.check(replica) for _ in range(2)] == [False, False], "no answer for the request that asked"
    assert replica.healthy, "but still among the choices"
    fake.health_s = 0.05
    assert await pool.check(replica) and replica.silent == 0, "answered in time: the count starts again"
    fake.health_s = 1.0
    assert [await pool.check(replica) for _ in range(2)] == [False, False] and replica.healthy
    assert not await pool.check(replica) and not replica.healthy, "the third in a row"
    assert not await pool.check(replica), "silent and down: stays down"
    fake.health_s = 0.05
    assert await pool.check(replica) and replica.healthy


async def test_a_replica_back_from_a_blip_keeps_what_vllm_still_holds(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    first = await use(placement, route("a"))
    generation = first.generation
    first.mark_down()
    await pool.check(first)
    assert first.healthy and list(first.resident) == ["a@1"], "rebuilt from vLLM's /v1/models"
    assert first.generation == generation + 1


async def test_an_adapter_on_its_way_to_vllm_is_not_evicted(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    pool.replicas[1].mark_down()
    busy = route("busy")
    replica = await placement.acquire(busy)  # chosen, not yet sent
    for name in ("b", "c", "d", "e"):
        await use(placement, route(name))
    assert "busy@1" in replica.resident and "busy@1" in fakes[0].loaded
    placement.release(replica, busy)
    await use(placement, route("f"))
    assert "busy@1" not in replica.resident, "once sent, it is evictable again"


async def test_a_replica_that_fails_the_load_is_skipped(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    fakes[0].broken = True
    pool.replicas[1].inflight = 1  # replica 0 is chosen first
    replica = await use(placement, route("a"))
    assert replica is pool.replicas[1] and "a@1" in fakes[1].loaded
    fakes[1].broken = True
    with pytest.raises(UpstreamError):
        await placement.acquire(route("b"))


async def test_loads_waiting_their_turn_on_a_replica_that_went_down_go_to_another(setup) -> None:  # type: ignore[no-untyped-def]
    """A load waits for the one before it on its replica: if the replica is marked down meanwhile (a load hung on a
    frozen vLLM, up to two minutes), the next one is not sent there after it but to another replica."""
    placement, pool, fakes = setup
    pool.replicas[1].inflight = 5  # replica 0 is chosen first
    fakes[0].hold = asyncio.Event()
    first = asyncio.create_task(use(placement, route("a")))
    while not fakes[0].holding:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(use(placement, route("b")))
    await asyncio.sleep(0.2)  # chosen replica 0, and waits for its turn there
    pool.replicas[0].mark_down()
    fakes[0].hold.set()
    assert await second is pool.replicas[1] and "b@1" in fakes[1].loaded
    assert fakes[0].loads["b@1"] == 0 and fakes[0].holding == 1, "nothing more sent to the replica marked down"
    await first


async def test_unload_everywhere(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    replica = await use(placement, route("a"))
    replica.inflight = SPREAD_MARGIN + 1
    await use(placement, route("a"))
    assert all("a@1" in f.loaded for f in fakes)
    await placement.unload_everywhere("a@1")
    assert not any("a@1" in f.loaded for f in fakes)
    assert all("a@1" not in r.resident for r in pool.replicas)


async def test_unload_everywhere_when_a_replica_cannot_list_its_adapters(setup) -> None:  # type: ignore[no-untyped-def]
    """A version deleted while a replica's /v1/models fails, loaded there by another gateway process (so not in
    this process's view): it is unloaded all the same, not left serving until a later maintenance round."""
    placement, pool, fakes = setup
    for fake in fakes:
        fake.loaded.add("other@1")
        fake.listing_broken = True
    assert all("other@1" not in r.resident for r in pool.replicas)
    await placement.unload_everywhere("other@1")
    assert not any("other@1" in f.loaded for f in fakes)


async def test_concurrent_loads_of_different_adapters_never_overshoot(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    pool.replicas[1].mark_down()
    await asyncio.gather(*(use(placement, route(f"a{i}")) for i in range(8)))
    assert len(pool.replicas[0].resident) == placement.capacity
    assert len(fakes[0].loaded) == placement.capacity


async def test_two_gateway_processes_share_one_capacity(fakes, redis_server: RedisServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Process B sees what process A loaded (vLLM is the truth) and evicts A's least recently used
    adapter, under the replica's lock: the replica never holds more than its capacity."""
    (fake, _), urls = fakes[0], fakes[1][:1]
    a, _, session_a = await gateway_process(urls, redis_server.url, tmp_path)
    b, _, session_b = await gateway_process(urls, redis_server.url, tmp_path)
    try:
        for name in ("x", "y", "z"):
            await use(a, route(name))
        await use(a, route("x"))  # y is now A's least recently used
        await a.maintain([])  # A shares its uses
        await asyncio.gather(*(use(b, route(name)) for name in ("p", "q")))
        assert len(fake.loaded) <= 3, fake.loaded
        assert "x@1" in fake.loaded, "x was used most recently, by the other process"
        assert "y@1" not in fake.loaded
    finally:
        await session_a.close()
        await session_b.close()


async def test_an_adapter_another_process_uses_is_never_evicted(
    fakes, redis_server: RedisServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    (fake, _), urls = fakes[0], fakes[1][:1]
    a, _, session_a = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    b, _, session_b = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    try:
        for name in ("x", "y", "z"):
            await use(a, route(name))
        await a.maintain([])
        await use(b, route("w"))
        assert {"x@1", "y@1", "z@1", "w@1"} <= fake.loaded, "all in use within protect_s: nothing evicted"
    finally:
        await session_a.close()
        await session_b.close()


async def test_uses_are_shared_every_second_without_a_maintenance_round(
    fakes, redis_server: RedisServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A's maintenance round can wait long (a replica's lock, a hot adapter's load): its uses are shared by a loop
    of their own, so B, making room, still leaves what A uses alone."""
    (fake, _), urls = fakes[0], fakes[1][:1]
    a, _, session_a = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    b, _, session_b = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    sharing = asyncio.create_task(app_module._share_uses(types.SimpleNamespace(placement=a), 0.01))  # noqa: SLF001
    shared = redis_client(redis_server.url, decode_responses=True)
    try:
        for name in ("x", "y", "z"):
            await use(a, route(name))
        # a load shares its use at once: forgotten here, the uses that follow (no load) are shared by the loop only
        await shared.delete(keys.replica_usage(urls[0]), keys.replica_recent_uses(urls[0]))
        for name in ("x", "y", "z"):
            await use(a, route(name))
        deadline = time.monotonic() + 10  # A never runs `maintain`
        while not {"x@1", "y@1", "z@1"} <= set(await shared.zrange(keys.replica_usage(urls[0]), 0, -1)):
            assert time.monotonic() < deadline, "A's uses were never shared"
            await asyncio.sleep(0.05)
        await use(b, route("w"))
        assert {"x@1", "y@1", "z@1", "w@1"} <= fake.loaded, "all in use by A within protect_s: nothing evicted"
    finally:
        await shared.aclose()
        sharing.cancel()
        await session_a.close()
        await session_b.close()


async def test_a_renewal_redis_did_not_answer_is_tried_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One renewal lost (Redis slow for a moment): the lock is renewed at the next, not left to expire under a load
    that goes on (another process would then make room on the replica at the same time)."""
    import redis.asyncio as aioredis

    # renewed every 2 s: the first renewal fails, the second (at 4 s) must come before the lock's end (6 s),
    # which leaves a busy machine 2 s of lag (with 0.1 s of 0.3, a make test run lost the lock; 0.5 of 1.5 is tight)
    monkeypatch.setattr(Residency, "LOCK_TTL_MS", 6000)
    redis = aioredis.from_url(redis_server.url, decode_responses=True)
    async with aiohttp.ClientSession() as session:
        held = Residency(redis, session, capacity=3)
        real, failures = held._release, [RedisTimeoutError("Timeout reading from socket")]  # noqa: SLF001
        renewed = asyncio.Event()

        async def once_unanswered(**kwargs: object) -> object:
            renewal = bool(kwargs["args"][1])  # type: ignore[index]
            if renewal and failures:
                raise failures.pop()
            answer = await real(**kwargs)
            if renewal:
                renewed.set()
            return answer

        held._release = once_unanswered  # type: ignore[method-assign] # noqa: SLF001
        async with held.exclusive("http://replica"):
            await asyncio.wait_for(renewed.wait(), 10)
            # four seconds of life or more: renewed (the first lease has two left by then, at most)
            assert await redis.pttl(keys.replica_lock("http://replica")) > 4000
        assert await redis.exists(keys.replica_lock("http://replica")) == 0, "given back"
    await redis.aclose()


async def test_an_adapter_another_process_used_lately_is_not_evicted_after_this_ones_own_use(
    fakes, redis_server: RedisServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A uses x (its request may still be on its way); B uses x after it, then y and z, and needs room for w: x is
    B's least recently used, but A's use protects it. y goes instead."""
    (fake, _), urls = fakes[0], fakes[1][:1]
    a, _, session_a = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    b, _, session_b = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    try:
        await use(a, route("x"))
        await a.maintain([])  # A's use shared
        for name in ("x", "y", "z"):
            await use(b, route(name))
        await use(b, route("w"))
        assert fake.loaded == {"x@1", "z@1", "w@1"}, "x: used by A lately; y: the least recently used of the rest"
    finally:
        await session_a.close()
        await session_b.close()


async def test_uses_are_dated_by_redis_clock_whatever_the_hosts(
    fakes, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A's host clock runs 60 s behind: its use of x, just now, still protects x from B (uses are dated by Redis's
    clock, which each process measures)."""
    (fake, _), urls = fakes[0], fakes[1][:1]
    a, _, session_a = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    b, _, session_b = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    try:
        with monkeypatch.context() as host_a:
            for module in (clock, residency):
                host_a.setattr(module, "time", SkewedTime(-60.0))
            await a._residency._clock.sync()  # noqa: SLF001
            await use(a, route("x"))
            await a.maintain([])
        for name in ("y", "z", "w"):
            await use(b, route(name))
        assert "x@1" in fake.loaded and len(fake.loaded) == 3, fake.loaded
    finally:
        await session_a.close()
        await session_b.close()


async def test_a_use_forgotten_before_the_flush_costs_no_other_replicas_uses(redis_server: RedisServer) -> None:
    """x used on one replica and forgotten (evicted) before the flush, y used on another: y's use is still shared
    (an emptied replica once made the whole flush fail), and a flush Redis refuses is tried again at the next one."""
    import redis.asyncio as aioredis

    redis = redis_client(redis_server.url, decode_responses=True)
    try:
        await redis.flushdb(asynchronous=True)
        uses = Residency(redis, None, capacity=3)  # type: ignore[arg-type]
        uses.note_use("r1", "x@1")
        uses.note_use("r2", "y@1")
        uses.forget("r1", "x@1")
        await uses.flush_uses()
        assert await redis.zrange(keys.replica_usage("r2"), 0, -1) == ["y@1"]
        uses.note_use("r2", "z@1")
        uses._redis = aioredis.from_url("redis://127.0.0.1:1", decode_responses=True)  # noqa: SLF001
        await uses.flush_uses()
        uses._redis = redis  # noqa: SLF001
        await uses.flush_uses()
        assert await redis.zrange(keys.replica_usage("r2"), 0, -1) == ["y@1", "z@1"], "shared once Redis is back"
    finally:
        await redis.aclose()


async def test_a_deleted_version_leaves_no_use_behind(setup, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """Uploading and deleting versions all day costs no memory: here or in Redis."""
    import redis.asyncio as aioredis

    placement, pool, fakes = setup
    for version in range(5):
        r = route(f"churn{version}")
        replica = await use(placement, r)
        await placement.maintain([])  # shares the uses through Redis
        await placement.unload_everywhere(r.upstream_model)
        assert r.upstream_model not in replica.resident
    residency = placement._residency  # noqa: SLF001
    assert not any(residency._used.values()) and not any(residency._unshared.values())  # noqa: SLF001
    redis = aioredis.from_url(redis_server.url, decode_responses=True)
    for replica in pool.replicas:
        assert await redis.zcard(keys.replica_usage(replica.url)) == 0
    await redis.aclose()


async def test_a_fresh_load_of_another_process_is_not_the_first_to_go(fakes, redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Process A loads x for a request on its way to vLLM; B, whose uses are shared, then needs room there. A's
    load is shared at once: x is the most recently used, not an adapter no process ever used."""
    (fake, _), urls = fakes[0], fakes[1][:1]
    a, _, session_a = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    b, _, session_b = await gateway_process(urls, redis_server.url, tmp_path, protect_s=30)
    try:
        await use(b, route("p"))
        await use(b, route("q"))
        await b.maintain([])  # B's uses shared; A has had no maintenance round yet
        await a.acquire(route("x"))
        await use(b, route("r"))  # capacity 3: {p, q, x} -> one goes
        assert fake.loaded == {"q@1", "r@1", "x@1"}, "p, the least recently used, went"
    finally:
        await session_a.close()
        await session_b.close()


def test_the_gateway_lets_go_of_an_idle_engine_connection_before_the_engine_does() -> None:
    """Else a request can go out on a connection vLLM is closing ("Server disconnected"), and the engine is taken
    for down: after a few idle seconds, a burst of requests got 503s from every replica at once."""
    import vllm.envs

    from gateway.app import UPSTREAM_KEEPALIVE_S

    assert 0 < UPSTREAM_KEEPALIVE_S < vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE


def _said(caplog: pytest.LogCaptureFixture) -> set[str]:
    """What the loops said was unreachable, by the loop's name."""
    return {r.getMessage().split(":")[0] for r in caplog.records if "Redis unreachable" in r.getMessage()}


async def test_an_outage_is_one_warning_a_round_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Maintenance and the sharing of uses go on through a Redis outage: each round says so in one line (`/readyz`
    reports the outage), without the traceback it logged every round."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def down(*_: object) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    async def nothing(*_: object) -> list[object]:
        return []

    placement = types.SimpleNamespace(maintain=down, share_uses=down)
    svc = types.SimpleNamespace(
        placement=placement,
        quotas=types.SimpleNamespace(clock=types.SimpleNamespace(try_sync=nothing)),
        hot_routes=nothing,
        keys=types.SimpleNamespace(flush_uses=nothing),
        settings=types.SimpleNamespace(health_interval_s=0.01),
    )
    with caplog.at_level(logging.WARNING, logger="loragate"):
        loops = [
            asyncio.create_task(app_module._maintain(svc)),  # noqa: SLF001
            asyncio.create_task(app_module._share_uses(svc, 0.01)),  # noqa: SLF001
        ]
        wanted = {"adapter maintenance", "sharing adapter uses"}
        for _ in range(500):  # a busy machine may run one loop's round well after the other's: wait up to 5 s
            await asyncio.sleep(0.01)
            if wanted <= _said(caplog):
                break
        for loop in loops:
            loop.cancel()
    assert wanted <= _said(caplog), caplog.records
    assert all(record.exc_info is None and record.levelno == logging.WARNING for record in caplog.records)
