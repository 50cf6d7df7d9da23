"""Probes and operator endpoints.

`/healthz` and `/readyz` are open, for orchestrators' probes, and say only whether the gateway is
up and ready. What operators see — `/metrics` (Prometheus) and `/readyz?verbose=1` (which of Redis
and the vLLM replicas is unreachable, what waits in the local spools) — names adapters and internal
addresses, so it needs the metrics key (LORAGATE_METRICS_KEY) or the admin key as a Bearer token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, PlainTextResponse, Response

from gateway.admin_protocol import Health, Readiness
from gateway.auth import bearer_matches
from gateway.errors import AuthenticationFailed
from gateway.openapi import BEARER, answer, errors
from gateway.routes import services

router = APIRouter()


def is_operator(request: Request) -> bool:
    settings = services(request).settings
    authorization = request.headers.get("authorization")
    return any(
        bearer_matches(authorization, key.get_secret_value())
        for key in (settings.metrics_key, settings.admin_key)
        if key is not None
    )


def require_operator(request: Request) -> None:
    if not is_operator(request):
        raise AuthenticationFailed(
            "This endpoint is for operators: send the metrics key (LORAGATE_METRICS_KEY) or the admin key "
            "as a Bearer token."
        )


Operator = Annotated[None, Depends(require_operator)]


@router.get("/healthz", response_model=None, responses=answer(Health, "The gateway is up."))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


READY_WAIT_S = 2.0
"""The longest `/readyz` waits on Redis or on an engine; past it, Redis is unreachable and an engine is what its
last health check (every LORAGATE_HEALTH_INTERVAL_S, 3 s at most) said. A Redis that hung (not down: stopped) held
every answer 5 s, its client's timeout, past the 3 s of the Helm chart's readiness probe, which then took every
gateway out of service while serving went on."""


async def _within(check: Awaitable[bool], otherwise: bool = False) -> bool:
    """`check`'s answer, or `otherwise` when it takes longer than READY_WAIT_S."""
    try:
        async with asyncio.timeout(READY_WAIT_S):
            return await check
    except TimeoutError:
        return otherwise


async def _redis_ok(redis: Redis) -> bool:
    try:
        return bool(await redis.ping())
    except (RedisError, OSError):
        return False


@router.get(
    "/readyz",
    response_model=None,
    responses=answer(Readiness, "Ready, or degraded (Redis down, records spooled): serving goes on.")
    | answer(Readiness, "Not ready: no vLLM replica answers yet.", 503)
    | errors(400, 401),
    openapi_extra={"security": [{}, BEARER]},
)
async def readyz(request: Request, verbose: bool = False) -> JSONResponse:
    """503 "not ready" until a vLLM replica answers. Then 200: "ready", or "degraded" while Redis is down
    or records wait in the local spool (serving goes on; quotas follow each tenant's choice).
    `verbose=1` (operators) says which part is which."""
    if verbose:
        require_operator(request)
    svc = services(request)
    separate = svc.records_redis is not svc.redis  # one Redis for both (the default) is asked once
    redis_ok, records_ok, *engines = await asyncio.gather(
        _within(_redis_ok(svc.redis)),
        _within(_redis_ok(svc.records_redis)) if separate else asyncio.sleep(0, True),
        *(_within(svc.pool.check(r), r.healthy) for r in svc.pool.replicas),  # slow: as its last check said
    )
    # a check left unanswered (a busy engine) keeps the replica in service until the third in a row: so here
    engines = [ok or replica.healthy for ok, replica in zip(engines, svc.pool.replicas, strict=True)]
    records_ok = records_ok and (redis_ok or separate)
    spooled = sum(spool.pending() for spool in svc.spools)
    status = "not ready" if not any(engines) else "ready"
    if status == "ready" and not (redis_ok and records_ok and not svc.recorder.degraded and not spooled):
        status = "degraded"
    body: dict[str, object] = {"status": status}
    if verbose:
        body["redis"] = "ok" if redis_ok else "unreachable"
        body["records_redis"] = "ok" if records_ok else "unreachable"
        body["engines"] = {
            replica.url: "ok" if ok else "unreachable" for replica, ok in zip(svc.pool.replicas, engines, strict=True)
        }
        body["records"] = {"spooled": spooled, "feedback_durability": svc.feedback.durability}
    return JSONResponse(body, status_code=503 if status == "not ready" else 200)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    response_description="The gateway's metrics, in Prometheus' text format.",
    responses=errors(401),
    openapi_extra={"security": [BEARER]},
)
async def metrics(request: Request, _: Operator) -> Response:
    svc = services(request)
    svc.refresh_metrics()
    return Response(await asyncio.to_thread(svc.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
