"""A cap on the bodies FastAPI reads whole: the admin API's JSON and `/v1/feedback`. Past the cap the request
is answered 413 in OpenAI's envelope before any route sees it, so no key can make a process hold an endless
body. The completion routes read theirs under the same cap themselves (gateway.body), on the hot path without
this copy; an adapter upload streams to disk under its own (gateway.routes.admin_adapters)."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import PayloadTooLarge

_UPLOAD = re.compile(r"/admin/tenants/[^/]+/adapters/?")


def _capped(scope: Scope) -> bool:
    path: str = scope["path"]
    if path == "/v1/feedback":
        return True
    return path.startswith("/admin/") and not (scope["method"] == "POST" and _UPLOAD.fullmatch(path))


class BodyLimitMiddleware:
    """Pure ASGI: a capped route's body is read (up to `max_bytes`) before the route runs, then handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    @staticmethod
    def passes(method: str, path: str) -> bool:
        """Whether a request is handed on untouched (gateway.hot_paths)."""
        return not _capped({"method": method, "path": path})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _capped(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"Request body is {int(declared)} bytes; the limit is {self.max_bytes} bytes.")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the route finds out as it reads
                await self.app(scope, _replaying(message, receive), send)
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, f"Request body exceeds the limit of {self.max_bytes} bytes.")
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replaying(whole, receive), send)

    @staticmethod
    async def _refuse(send: Send, message: str) -> None:
        body = json.dumps(PayloadTooLarge(message).body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replaying(first: Message, receive: Receive) -> Receive:
    """`first`, then whatever the client sends next (a disconnect)."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
