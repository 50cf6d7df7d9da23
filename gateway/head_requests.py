"""HEAD answers as GET does, without the body, on every route that takes GET (`/healthz`, `/v1/models`, ...),
as HTTP asks of servers and as load balancers' probes expect. FastAPI routes declare GET only, so the
request is passed on as a GET; uvicorn knows the request was a HEAD and sends the headers alone. A route whose
body is costly to make (the feedback export) reads `request.state.head` and makes none."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGetMiddleware:
    """Pure ASGI: a HEAD request goes on as a GET; anything else passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def passes(method: str, path: str) -> bool:
        """Whether a request is handed on untouched (gateway.hot_paths)."""
        return method != "HEAD"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET", "state": {**scope.get("state", {}), "head": True}}
        await self.app(scope, receive, send)
