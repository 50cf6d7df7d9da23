"""A route class for the hot /v1 completion routes: their caller is resolved by calling the same auth
functions that `TenantCaller` names, not through FastAPI's per-request dependency solving.

FastAPI still reads the endpoint's signature at start-up, so the OpenAPI schema describes the route as
before (its key, its body, its answers); only the per-request machinery is lighter: no dependency graph
walked, no query parameters parsed, no exit stacks for dependencies with `yield` (there are none). The
exception handlers still apply (Starlette's `request_response` wraps the handler in them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import request_response

from gateway.auth import authenticate, tenant_caller
from gateway.principal import Principal

Endpoint = Callable[[Request, Principal], Awaitable[Response]]


class TenantRoute(APIRoute):
    """For endpoints `async def (request: Request, caller: TenantCaller) -> Response` only."""

    hot = True
    """Served through a lane of its own (gateway.hot_paths)."""

    def __init__(self, path: str, endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)

        async def handle(request: Request) -> Response:
            return await endpoint(request, await tenant_caller(await authenticate(request)))

        self.app = request_response(handle)
