"""gateway.hot_paths: a hot route's request skips only the layers that would hand it on untouched, and is
answered exactly as through the whole stack: errors, unexpected failures and every other request included."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import request_response
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.error_handlers import install_handlers
from gateway.errors import InvalidRequest
from gateway.hot_paths import HotPathsAPI
from gateway.request_id import RequestIdMiddleware


class _Counting:
    """A middleware that counts what passes through it; `passes` as the class says."""

    seen: list[str]

    def __init__(self, app: ASGIApp, name: str, seen: list[str]) -> None:
        self.app, self.name, self.seen = app, name, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(self.name)
        await self.app(scope, receive, send)


class _PassesPosts(_Counting):
    @staticmethod
    def passes(method: str, path: str) -> bool:
        return method == "POST"


class _Hot(APIRoute):
    hot = True

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = request_response(endpoint)


async def _answer(request: Request) -> Response:
    kind = request.query_params.get("fail")
    if kind == "refused":
        raise InvalidRequest("refused here", param="x")
    if kind == "bug":
        raise RuntimeError("a bug")
    route = request.scope["route"]
    return JSONResponse({"route": route.path, "router": request.scope["router"] is request.app.router})


def _app(seen: list[str]) -> HotPathsAPI:
    app = HotPathsAPI(redirect_slashes=False)
    install_handlers(app)
    app.add_middleware(_PassesPosts, name="passes-posts", seen=seen)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(_Counting, name="always", seen=seen)
    hot = APIRouter(route_class=_Hot)
    hot.add_api_route("/v1/hot", _answer, methods=["POST"])
    app.include_router(hot)
    app.add_api_route("/v1/cold", lambda: {"cold": True}, methods=["GET"])
    return app


def test_a_hot_request_skips_what_passes_it_and_is_answered_as_through_the_stack() -> None:
    seen: list[str] = []
    with TestClient(_app(seen), raise_server_exceptions=False) as client:
        answered = client.post("/v1/hot")
        assert answered.json() == {"route": "/v1/hot", "router": True}, "the scope the router would have given"
        assert answered.headers["x-request-id"] and seen == ["always"]
        seen.clear()
        refused = client.post("/v1/hot?fail=refused")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "x"
        assert refused.headers["x-request-id"]
        failed = client.post("/v1/hot?fail=bug")
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert "a bug" not in failed.text
        seen.clear()
        assert client.get("/v1/cold").json() == {"cold": True}
        assert seen == ["always", "passes-posts"], "any other request: the whole stack"
        seen.clear()
        for method, path in (("GET", "/v1/hot"), ("POST", "/v1/hot/")):  # not the lane's: the stack's refusals
            other = client.request(method, path)
            assert other.status_code in (404, 405) and "error" in other.json() and other.headers["x-request-id"]
        assert seen == ["always", "passes-posts"] * 2
