"""Every response, errors included, carries an `x-request-id` (the same id names the completion), and
the headers a handler left in `request.state.response_headers` (the rate-limit headers), whatever
produced the response: the handler, an exception handler, or a stream."""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it must not buffer or delay streamed responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = os.urandom(16).hex()  # 128 random bits, as uuid4 has, at a quarter of its cost
        state = scope.setdefault("state", {})
        state["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra: dict[str, str] = state.get("response_headers") or {}
                names = {HEADER, *(name.encode() for name in extra)}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                headers.append((HEADER, request_id.encode()))
                headers += [(name.encode(), value.encode()) for name, value in extra.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
