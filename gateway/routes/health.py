"""Liveness, readiness and metrics, for orchestrators and Prometheus."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from gateway.routes import services

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    svc = services(request)

    async def redis_ok() -> bool:
        try:
            return bool(await svc.redis.ping())
        except (RedisError, OSError):
            return False

    checks = await asyncio.gather(redis_ok(), *(svc.pool.check(r) for r in svc.pool.replicas))
    engines = {
        replica.url: "ok" if ok else "unreachable" for replica, ok in zip(svc.pool.replicas, checks[1:], strict=True)
    }
    ready = checks[0] and any(checks[1:])
    body = {
        "status": "ready" if ready else "not ready",
        "redis": "ok" if checks[0] else "unreachable",
        "engines": engines,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(services(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
