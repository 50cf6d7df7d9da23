"""The application factory: builds the services, wires routes and error handlers. Wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.exceptions import RedisError

from adapters.base_model import prepared_dir
from adapters.registry import Registry
from adapters.validate import BaseModelSpec
from gateway import __version__, durability, erasure, guard_rails, native
from gateway.apikeys import KeyStore
from gateway.body_limit import BodyLimitMiddleware
from gateway.clock import RedisClock
from gateway.engine.pool import ReplicaPool
from gateway.engine.sessions import EngineSessions
from gateway.error_handlers import install_handlers
from gateway.errors import APIError, ModelNotFound, StateUnavailable
from gateway.experiments import ExperimentStore
from gateway.feedback import FeedbackStore
from gateway.head_requests import HeadAsGetMiddleware
from gateway.hot_paths import HotPathsAPI
from gateway.metrics import Metrics
from gateway.model_list import ModelLists
from gateway.openapi import ABOUT
from gateway.phones import phone_library
from gateway.placement import Placement
from gateway.pointers import PointerStore
from gateway.quota_leases import LeaseBook
from gateway.quotas import QuotaGate
from gateway.recorder import Recorder
from gateway.request_id import RequestIdMiddleware
from gateway.residency import Residency
from gateway.routes import admin_adapters, admin_tenants, experiments, feedback, health, openai
from gateway.routing import Route, Router
from gateway.serving import Forwarder
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.state import StateWatcher
from gateway.tenants import TenantStore

log = logging.getLogger("loragate")
UPSTREAM_KEEPALIVE_S = 2.0
"""How long an idle connection to an engine is kept: well under vLLM's own keep-alive (5 s), as the gateway's clock
of idling lags the engine's under load (at 4 s, a CI burst after a lull met closed ones: `gateway.engine.sessions`)."""
LEFTOVER_S = 3600.0
"""How long what a process that died mid-change left (an upload's scratch folder, a version uploaded and never
listed) stays before `_sweep` removes it."""
UPLOAD_LEFTOVER_S = 86400.0
"""The same for an upload's body, which a slow client sends for longer."""
SHARE_USES_S = 1.0
"""How often each process shares its adapter uses (well within a use's protection, `Residency.protect_s`)."""


@dataclass
class Services:
    settings: Settings
    redis: aioredis.Redis
    tenants: TenantStore
    keys: KeyStore
    pointers: PointerStore
    experiments: ExperimentStore
    quotas: QuotaGate
    pool: ReplicaPool
    registry: Registry
    placement: Placement
    model_lists: ModelLists
    router: Router
    forwarder: Forwarder
    metrics: Metrics
    records_redis: aioredis.Redis
    recorder: Recorder
    feedback: FeedbackStore
    spools: tuple[Spool, Spool]
    model_dir: Path | None
    sessions: EngineSessions
    """The engines' HTTP sessions (closed at shutdown)."""
    _base_spec: BaseModelSpec | None = None
    uploads: asyncio.Semaphore = field(init=False)
    """Turns for adapter uploads (`upload_concurrency`), taken for the whole upload."""

    def __post_init__(self) -> None:
        self.uploads = asyncio.Semaphore(self.settings.upload_concurrency)

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

    def refresh_metrics(self) -> None:
        """The gauges read off this process's state: every second, and before each scrape."""
        spools = {name: spool.pending() for name, spool in zip(("records", "feedback"), self.spools, strict=True)}
        self.metrics.refresh(self.pool.replicas, spools)

    async def hot_routes(self) -> list[Route]:
        """LORAGATE_HOT_ADAPTERS (`owner/name` or `owner/name@V`), as routes; those not stored yet are skipped."""
        routes = []
        for ref in self.settings.hot_adapters:
            owner, _, name = ref.partition("/")
            try:
                routes.append(await self.router.resolve(name, owner))
            except ModelNotFound:
                log.debug("hot adapter %s is not in the store yet", ref)
        return routes


async def _maintain(svc: Services) -> None:
    """A maintenance round at once (hot adapters are pinned from the start: none is made room for), then one every
    health interval. Uses are dated by Redis's clock: it is measured first."""
    await svc.quotas.clock.try_sync()
    while True:
        try:
            await svc.placement.maintain(await svc.hot_routes())
            await svc.keys.flush_uses()
        except APIError as exc:
            log.warning("adapter maintenance: %s", exc.message)
        except RedisError as exc:  # an outage: readyz says so; a traceback every round would say nothing more
            log.warning("adapter maintenance: Redis unreachable (%r); trying again next round", exc)
        except Exception:
            log.exception("maintenance failed; trying again next round")
        await asyncio.sleep(svc.settings.health_interval_s)


async def _sweep(svc: Services) -> None:
    """What processes that died mid-change left (`Registry.sweep`: scratch folders, uploads never listed; uploads'
    bodies), at start and then every LEFTOVER_S: each is removed once untouched for LEFTOVER_S (a body, a day)."""
    while True:
        try:
            swept = await asyncio.to_thread(svc.registry.sweep, LEFTOVER_S)
            swept += await asyncio.to_thread(admin_adapters.sweep_uploads, UPLOAD_LEFTOVER_S)
            if swept:
                log.warning("removed what stopped processes left: %s", ", ".join(swept[:20]))
        except Exception:
            log.exception("sweeping what stopped processes left failed; trying again later")
        await asyncio.sleep(LEFTOVER_S)


async def _share_uses(svc: Services, interval_s: float = SHARE_USES_S) -> None:
    """This process's adapter uses, shared every second whatever a maintenance round waits for (a replica's lock, a
    hot adapter's load, a slow replica): a process making room on a replica must see them, or it unloads an adapter
    in use here."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await svc.placement.share_uses()
        except RedisError as exc:
            log.warning("sharing adapter uses: Redis unreachable (%r); trying again", exc)
        except Exception:
            log.exception("sharing adapter uses failed; trying again")


async def _keep_records(svc: Services) -> None:
    """The records upkeep, a round every second or so (`_records_round`)."""
    rounds = 0
    while True:
        await asyncio.sleep(1.0)
        await _records_round(svc, rounds)
        rounds += 1


async def _records_round(svc: Services, number: int) -> None:
    """Measure the records Redis's clock, adopt spools, re-check how Redis persists feedback, replay spooled feedback,
    trim old records. Durability is probed before the replay while it is not trusted (not known: Redis was down, or a
    write failed or was not confirmed; or Redis does not fsync) and while the completion log spools (a probe then
    finds Redis down, and feedback spools until Redis is back and has said how it persists), else every 30 rounds.
    Each step on its own: one that fails does not hold up the others."""
    await svc.recorder.clock.upkeep()
    await _upkeep("adopting spools", svc.spools[0].adopt())
    if number % 30 == 0 or not durability.trusted(svc.feedback.durability) or svc.recorder.degraded:
        await _upkeep("checking durability", svc.feedback.check_durability())
    await _upkeep("replaying feedback", svc.feedback.replay())
    if number % 60 == 0:
        await _upkeep("trimming records", _trim(svc))
    await _upkeep("metrics", _refresh_metrics(svc))


async def _refresh_metrics(svc: Services) -> None:
    svc.refresh_metrics()


async def _trim(svc: Services) -> None:
    await svc.recorder.trim({t.name: t.logging for t in await svc.tenants.all()})


async def _upkeep(what: str, step: Awaitable[object]) -> None:
    try:
        await step
    except (RedisError, OSError) as exc:
        log.debug("records upkeep, %s: %r", what, exc)
    except Exception:
        log.exception("records upkeep, %s, failed; trying again next round", what)


def _redis(url: str, max_connections: int) -> aioredis.Redis:
    # A bounded pool: a burst of requests queues for a connection instead of opening hundreds of them.
    return aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
        )
    )


def _services(settings: Settings, urls: list[str], model_dir: Path | None, sessions: EngineSessions) -> Services:
    redis = _redis(settings.redis_url, settings.redis_max_connections)
    records_redis = redis
    if settings.records_redis_url and settings.records_redis_url != settings.redis_url:
        records_redis = _redis(settings.records_redis_url, settings.redis_max_connections)
    metrics = Metrics(settings.metrics_max_tenants, settings.metrics_max_names)
    records_spool = Spool(
        settings.spool_root / "records",
        fsync=False,
        max_items=settings.record_spool_max,
        on_drop=metrics.records_dropped.labels("spool_full").inc,
    )
    feedback_spool = Spool(settings.spool_root / "feedback", fsync=True)
    recorder = Recorder(
        records_redis,
        records_spool,
        metrics,
        enabled=settings.record_completions,
        workers=settings.record_workers,
        redis_url=settings.records_redis_url or settings.redis_url,
    )
    pool = ReplicaPool(urls, sessions.fresh, settings.health_interval_s)
    registry = Registry(settings.adapter_root)
    pointers = PointerStore(redis)
    experiments = ExperimentStore(redis, records_redis)
    # quota windows, key expiries and adapter uses are dated by the state Redis's clock
    clock = RedisClock(redis, "the state Redis")
    residency = Residency(redis, sessions.pooled, settings.max_cpu_loras, clock=clock)
    placement = Placement(pool, sessions, registry, metrics, residency)
    return Services(
        settings=settings,
        redis=redis,
        tenants=TenantStore(redis),
        keys=KeyStore(redis, settings.auth_cache_s, clock=clock),
        pointers=pointers,
        experiments=experiments,
        quotas=QuotaGate(
            redis,
            metrics,
            settings.quota_reserve_tokens or settings.max_tokens_cap,
            LeaseBook(max_requests=settings.quota_lease_requests),
            clock=clock,
        ),
        pool=pool,
        registry=registry,
        placement=placement,
        model_lists=ModelLists(settings.served_model_name, registry, pointers),
        router=Router(settings.served_model_name, registry, pointers, experiments),
        forwarder=Forwarder(sessions, pool, placement, metrics, settings.upstream_timeout_s),
        metrics=metrics,
        records_redis=records_redis,
        recorder=recorder,
        feedback=FeedbackStore(records_redis, feedback_spool, recorder, metrics),
        spools=(records_spool, feedback_spool),
        model_dir=model_dir or settings.model_dir,
        sessions=sessions,
    )


async def _start(app: FastAPI, settings: Settings, urls: list[str], model_dir: Path | None) -> list[asyncio.Task[None]]:
    """Build the services, open the spools, check feedback's durability, start the engines' pool and the
    background work; returns the background tasks (the recorder's own loop last)."""
    phones = phone_library()  # a LORAGATE_PHONE_MATCHER it cannot use stops the start, not each record's redaction
    sessions = EngineSessions(UPSTREAM_KEEPALIVE_S)
    svc = app.state.services = _services(settings, urls, model_dir, sessions)
    watcher = StateWatcher(
        svc.redis,
        settings.state_poll_s,
        [svc.keys.forget_cached, svc.tenants.forget_cached, svc.pointers.forget_cached, svc.experiments.forget_cached],
    )
    for spool in svc.spools:
        await asyncio.to_thread(spool.open)
    await svc.feedback.check_durability()
    await svc.recorder.start()
    built = "compiled (gateway.native)" if native.active() else "as Python"
    log.info("completion records: built %s; phone numbers checked with %s", built, phones.__name__)
    await svc.pool.start()
    return [
        asyncio.create_task(_maintain(svc)),
        asyncio.create_task(_share_uses(svc)),
        asyncio.create_task(_sweep(svc)),
        asyncio.create_task(watcher.run()),
        asyncio.create_task(svc.quotas.run()),
        asyncio.create_task(_keep_records(svc)),
        asyncio.create_task(erasure.digest_named_tombstones_until_done(svc.records_redis)),
        asyncio.create_task(guard_rails.run(svc.redis, svc.records_redis, svc.router, settings.guard_rails_s)),
        asyncio.create_task(svc.recorder.run()),
    ]


async def _stop(svc: Services, tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the background work, let the recorder write what is still queued, close everything."""
    *background, recording = tasks
    for task in background:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*background)
    await svc.recorder.stop()  # not cancelled: it writes what is still queued, then returns
    await recording
    await svc.recorder.close()
    await svc.pool.stop()
    await svc.sessions.close()
    for spool in svc.spools:
        spool.close()
    await svc.redis.aclose()
    if svc.records_redis is not svc.redis:
        await svc.records_redis.aclose()


def create_app(settings: Settings, engine_urls: list[str] | None = None, model_dir: Path | None = None) -> FastAPI:
    urls = engine_urls if engine_urls is not None else settings.engine_urls
    if not urls:
        raise ValueError("create_app needs vLLM URLs: set LORAGATE_ENGINE_URLS or let `loragate serve` start vLLM")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = await _start(app, settings, urls, model_dir)
        gc.freeze()  # what start-up built lives as long as the process: no collection needs to scan it again
        thresholds = gc.get_threshold()
        gc.set_threshold(settings.gc_threshold)  # the youngest generation's; the older ones' stay Python's
        try:
            yield
        finally:
            try:
                await _stop(app.state.services, tasks)
            finally:
                gc.set_threshold(*thresholds)

    app = HotPathsAPI(  # /openapi.json, open to all (it names no tenant); no HTML docs pages
        title="loragate",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description=ABOUT,
        redirect_slashes=False,  # `/v1/chat/completions/` is OpenAI's 404 envelope, not an empty 307
    )
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HeadAsGetMiddleware)
    for router in (openai.completion_router, openai.router, admin_tenants.router, admin_adapters.router):
        app.include_router(router)
    for router in (feedback.router, experiments.router, health.router):
        app.include_router(router)
    return app
