"""The application factory: builds the services, wires routes and error handlers. Wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from fastapi import FastAPI

from adapters.base_model import prepared_dir
from adapters.registry import Registry
from adapters.store import AdapterStore
from adapters.validate import BaseModelSpec
from gateway import __version__
from gateway.auth import KeyStore, Principal
from gateway.engine.pool import ReplicaPool
from gateway.error_handlers import install_handlers
from gateway.errors import APIError, ModelNotFound, StateUnavailable
from gateway.metrics import Metrics
from gateway.placement import Placement
from gateway.request_id import RequestIdMiddleware
from gateway.routes import admin, health, openai
from gateway.routing import Router
from gateway.serving import Forwarder
from gateway.settings import Settings

log = logging.getLogger("loragate")
SYSTEM = Principal(tenant="__system__", key_name="hot-adapters")


@dataclass
class Services:
    settings: Settings
    redis: aioredis.Redis
    keys: KeyStore
    pool: ReplicaPool
    registry: Registry
    placement: Placement
    router: Router
    forwarder: Forwarder
    metrics: Metrics
    model_dir: Path | None
    _base_spec: BaseModelSpec | None = None

    def _find_base_spec(self) -> BaseModelSpec:
        folder = self.model_dir or prepared_dir(self.settings.models_root)
        if not (folder / "config.json").is_file():
            log.error("no copy of the base model at %s: adapters cannot be validated", folder)
            raise StateUnavailable(
                "Adapters cannot be validated: this gateway has no copy of the base model (set LORAGATE_MODEL_DIR)."
            )
        return BaseModelSpec.from_folder(folder, self.settings.served_model_name)

    async def base_spec(self) -> BaseModelSpec:
        """The base adapters are validated against: the unquantised model folder on this machine, found
        on first use (so a gateway may start before its engines have prepared the model), off the loop."""
        if self._base_spec is None:
            self._base_spec = await asyncio.to_thread(self._find_base_spec)
        return self._base_spec


async def _maintain(svc: Services) -> None:
    while True:
        await asyncio.sleep(svc.settings.health_interval_s)
        hot = []
        for ref in svc.settings.hot_adapters:
            try:
                hot.append(await svc.router.resolve(ref, SYSTEM))
            except ModelNotFound:
                log.debug("hot adapter %s is not in the store yet", ref)
        try:
            await svc.placement.maintain(hot)
        except APIError as exc:
            log.warning("adapter maintenance: %s", exc.message)
        except Exception:
            log.exception("adapter maintenance failed; trying again next round")


def create_app(settings: Settings, engine_urls: list[str] | None = None, model_dir: Path | None = None) -> FastAPI:
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
        registry = Registry(AdapterStore(settings.adapter_root))
        placement = Placement(pool, session, registry, metrics, capacity=settings.max_cpu_loras)
        svc = app.state.services = Services(
            settings=settings,
            redis=redis,
            keys=KeyStore(redis, settings.auth_cache_s),
            pool=pool,
            registry=registry,
            placement=placement,
            router=Router(settings.served_model_name, registry),
            forwarder=Forwarder(session, pool, placement, metrics, settings.upstream_timeout_s),
            metrics=metrics,
            model_dir=model_dir or settings.model_dir,
        )
        await pool.start()
        maintenance = asyncio.create_task(_maintain(svc))
        try:
            yield
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            await pool.stop()
            await session.close()
            await redis.aclose()

    app = FastAPI(title="loragate", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    return app
