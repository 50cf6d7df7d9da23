"""The hot routes' own lane through the app: a completion request skips the layers that would hand it on
untouched.

A request goes through every layer of the app's stack: the error middleware, each of the app's middlewares,
the exception middleware, FastAPI's exit-stack middleware (for form files, which no hot route reads), the
router (which tries each route in turn) and the route. Each layer costs a few µs warm, and many times that in
the request path, where every call finds cold caches. `HotPaths` sends a request for a hot route (its method
and path exactly) through a lane of its own: the same error and exception handling, every middleware that
does not say it passes such a request on untouched (`passes(method, path)`), then the route itself, with the
scope the router would have given it. Every other request takes the whole stack.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.openapi import DescribedAPI

Lanes = dict[tuple[str, str], ASGIApp]


class HotPaths:
    """Pure ASGI, outermost: a request whose method and path are a lane's (and that is not served under a root
    path) goes through that lane; any other through `stack`."""

    def __init__(self, stack: ASGIApp, lanes: Lanes) -> None:
        self._stack = stack
        self._lanes = lanes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            lane = self._lanes.get((scope["method"], scope["path"]))
            if lane is not None:
                await lane(scope, receive, send)
                return
        await self._stack(scope, receive, send)


class _Routed:
    """What the router does for a request its route matches: the route's scope, then the route."""

    def __init__(self, app: FastAPI, route: APIRoute) -> None:
        self._router = app.router
        self._route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match, child = self._route.matches(scope)
        assert match is Match.FULL  # the lane is only taken for the route's method and path
        scope.update(child)
        scope.setdefault("router", self._router)
        await self._route.handle(scope, receive, send)


def hot_routes(app: FastAPI) -> dict[tuple[str, str], APIRoute]:
    """The routes whose class says `hot = True`, by method and path, where no earlier route names the same method
    and path (the router takes the first). Only literal paths are compared: an earlier parametrised route or a
    mount that would take the same requests must not be put before a hot route."""
    first: dict[tuple[str, str], Any] = {}
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            first.setdefault((method, getattr(route, "path", "")), route)
    return {key: route for key, route in first.items() if isinstance(route, APIRoute) and getattr(route, "hot", False)}


def lanes(app: FastAPI, routes: dict[tuple[str, str], APIRoute]) -> Lanes:
    """A lane for each method and path of `routes` (paths without parameters), through the app's own handlers and
    middlewares (those that do not pass that method and path on untouched)."""
    error_handler: Any = None
    handlers: dict[Any, Any] = {}
    for key, value in app.exception_handlers.items():  # split as FastAPI's build_middleware_stack splits them
        if key in (500, Exception):
            error_handler = value
        else:
            handlers[key] = value
    built: Lanes = {}
    for (method, path), route in routes.items():
        if route.param_convertors:
            raise ValueError(f"a hot route's path takes no parameters: {path}")
        lane: ASGIApp = ExceptionMiddleware(_Routed(app, route), handlers=handlers, debug=app.debug)
        for middleware in reversed(app.user_middleware):
            passes = getattr(middleware.cls, "passes", None)
            if passes is None or not passes(method, path):
                lane = middleware.cls(lane, *middleware.args, **middleware.kwargs)
        built[(method, path)] = ServerErrorMiddleware(lane, handler=error_handler, debug=app.debug)
    return built


class HotPathsAPI(DescribedAPI):
    """The app: routes whose class says `hot = True` get lanes of their own (`HotPaths`). Such a route's handler
    must not need FastAPI's exit stack (`fastapi_middleware_astack`, for form files): `TenantRoute`'s does not."""

    def build_middleware_stack(self) -> ASGIApp:
        return HotPaths(super().build_middleware_stack(), lanes(self, hot_routes(self)))
