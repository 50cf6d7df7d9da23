"""The application factory: builds the services, wires routes and error handlers. Wiring only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from fastapi import FastAPI

from gateway import __version__
from gateway.auth import KeyStore
from gateway.engine.pool import ReplicaPool
from gateway.errors import install_handlers
from gateway.metrics import Metrics
from gateway.placement import Placement
from gateway.routes import health, openai
from gateway.routing import Router
from gateway.serving import Forwarder
from gateway.settings import Settings

log = logging.getLogger("loragate")


@dataclass
class Services:
    settings: Settings
    redis: aioredis.Redis
    keys: KeyStore
    pool: ReplicaPool
    placement: Placement
    router: Router
    forwarder: Forwarder
    metrics: Metrics


def create_app(settings: Settings, engine_urls: list[str] | None = None) -> FastAPI:
    urls = engine_urls if engine_urls is not None else settings.engine_urls
    if not urls:
        raise ValueError("create_app needs vLLM URLs: set LORAGATE_ENGINE_URLS or let `loragate serve` start vLLM")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
            auto_decompress=False,
        )
        redis = aioredis.from_url(settings.redis_url, decode_responses=True, socket_timeout=2)
        metrics = Metrics()
        pool = ReplicaPool(urls, session, settings.health_interval_s)
        placement = Placement(pool, session, metrics, capacity=settings.max_cpu_loras)
        app.state.services = Services(
            settings=settings,
            redis=redis,
            keys=KeyStore(redis, settings.auth_cache_s),
            pool=pool,
            placement=placement,
            router=Router(settings.served_model_name),
            forwarder=Forwarder(session, placement, metrics, settings.upstream_timeout_s),
            metrics=metrics,
        )
        await pool.start()
        try:
            yield
        finally:
            await pool.stop()
            await session.close()
            await redis.aclose()

    app = FastAPI(title="loragate", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.include_router(openai.router)
    app.include_router(health.router)
    return app
