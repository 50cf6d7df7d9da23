"""Probes and operator endpoints.

`/healthz` and `/readyz` are open, for orchestrators' probes, and say only whether the gateway is
up and ready. What operators see — `/metrics` (Prometheus) and `/readyz?verbose=1` (which of Redis
and the vLLM replicas is unreachable) — names adapters and internal addresses, so it needs the
metrics key (LORAGATE_METRICS_KEY) or the admin key as a Bearer token.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from gateway.auth import bearer_matches
from gateway.errors import AuthenticationFailed
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


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, verbose: bool = False) -> JSONResponse:
    """Ready when Redis and at least one vLLM replica answer. `verbose=1` (operators) says which do."""
    if verbose:
        require_operator(request)
    svc = services(request)

    async def redis_ok() -> bool:
        try:
            return bool(await svc.redis.ping())
        except (RedisError, OSError):
            return False

    checks = await asyncio.gather(redis_ok(), *(svc.pool.check(r) for r in svc.pool.replicas))
    ready = checks[0] and any(checks[1:])
    body: dict[str, object] = {"status": "ready" if ready else "not ready"}
    if verbose:
        body["redis"] = "ok" if checks[0] else "unreachable"
        body["engines"] = {
            replica.url: "ok" if ok else "unreachable"
            for replica, ok in zip(svc.pool.replicas, checks[1:], strict=True)
        }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request, _: Operator) -> Response:
    return Response(generate_latest(services(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
