"""Placement against a stand-in for vLLM's LoRA endpoints: single flight, LRU, pinning, affinity."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from adapters.manifest import Manifest
from adapters.registry import Registry
from adapters.store import AdapterStore
from gateway.engine.pool import ReplicaPool
from gateway.metrics import Metrics
from gateway.placement import SPREAD_MARGIN, Placement
from gateway.routing import Route


class FakeVLLM:
    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.loaded: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        return app

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
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
    return Route(requested=name, upstream_model=manifest.ref, adapter=manifest, adapter_path="/nowhere")


@pytest.fixture
async def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
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
    session = aiohttp.ClientSession()
    pool = ReplicaPool(urls, session, interval_s=60)
    await pool.check_all()
    registry = Registry(AdapterStore(tmp_path))
    registry.verify_once = lambda manifest: None  # type: ignore[method-assign]
    placement = Placement(pool, session, registry, Metrics(), capacity=3)
    yield placement, pool, fakes
    await session.close()
    for runner in runners:
        await runner.cleanup()


async def test_concurrent_cold_requests_share_one_load(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    replicas = await asyncio.gather(*(placement.acquire(route("a")) for _ in range(100)))
    assert len(set(replicas)) == 1
    assert sum(f.loads["a@1"] for f in fakes) == 1


async def test_lru_eviction_respects_capacity_and_pins(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    placement.pinned = {"hot@1"}
    for name in ("hot", "a", "b", "c", "d"):
        replica = await placement.acquire(route(name))
    assert replica is pool.replicas[0]
    assert list(pool.replicas[0].resident) == ["hot@1", "c@1", "d@1"]
    assert fakes[0].loaded == {"hot@1", "c@1", "d@1"}
    await placement.acquire(route("c"))
    await placement.acquire(route("e"))
    assert list(pool.replicas[0].resident) == ["hot@1", "c@1", "e@1"], "d was least recently used"


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
    first = await placement.acquire(route("a"))
    first.mark_down()
    other = await placement.acquire(route("a"))
    assert other is not first
    first.mark_up()
    assert first.resident == {}, "a replica that comes back holds nothing"


async def test_unload_everywhere(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    replica = await placement.acquire(route("a"))
    replica.inflight = SPREAD_MARGIN + 1
    await placement.acquire(route("a"))
    assert all("a@1" in f.loaded for f in fakes)
    await placement.unload_everywhere("a@1")
    assert not any("a@1" in f.loaded for f in fakes)
    assert all("a@1" not in r.resident for r in pool.replicas)


async def test_concurrent_loads_of_different_adapters_never_overshoot(setup) -> None:  # type: ignore[no-untyped-def]
    placement, pool, fakes = setup
    pool.replicas[1].mark_down()
    await asyncio.gather(*(placement.acquire(route(f"a{i}")) for i in range(8)))
    assert len(pool.replicas[0].resident) == placement.capacity
    assert len(fakes[0].loaded) == placement.capacity
