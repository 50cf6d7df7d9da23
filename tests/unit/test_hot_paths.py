"""gateway.hot_paths: a hot route's request skips only the layers that would hand it on untouched, and is
answered exactly as through the whole stack: errors, unexpected failures and every other request included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import request_response
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.body_limit import BodyLimitMiddleware
from gateway.error_handlers import install_handlers
from gateway.errors import InvalidRequest
from gateway.head_requests import HeadAsGetMiddleware
from gateway.hot_paths import HotPathsAPI, hot_routes, lanes
from gateway.request_id import RequestIdMiddleware
from gateway.settings import Settings


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


def test_an_earlier_route_for_the_same_method_and_path_keeps_it() -> None:
    """The router takes the first route that matches: a lane must not take a request from an earlier route."""
    app = HotPathsAPI()
    app.add_api_route("/v1/hot", lambda: {"cold": True}, methods=["POST"])
    hot = APIRouter(route_class=_Hot)
    hot.add_api_route("/v1/hot", _answer, methods=["POST"])
    hot.add_api_route("/v1/other", _answer, methods=["POST"])
    app.include_router(hot)
    assert set(hot_routes(app)) == {("POST", "/v1/other")}
    with TestClient(app) as client:
        assert client.post("/v1/hot").json() == {"cold": True}


def _layers(app: object) -> list[type]:
    layers = []
    while app is not None:
        layers.append(type(app))
        app = getattr(app, "app", None)
    return layers


def test_the_gateways_completion_lanes_keep_its_handlers_and_request_id(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, served_model_name="base-model")
    app = create_app(settings, engine_urls=["http://127.0.0.1:9"])
    routes = hot_routes(app)
    assert set(routes) == {("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}
    for lane in lanes(app, routes).values():
        layers = _layers(lane)
        assert layers[0] is ServerErrorMiddleware and ExceptionMiddleware in layers and RequestIdMiddleware in layers
        assert BodyLimitMiddleware not in layers and HeadAsGetMiddleware not in layers, "they pass a POST untouched"
