"""uvicorn's HTTP/1.1 protocol (httptools), with each response's head and first body part sent in one write.

uvicorn writes a response's status line and headers as soon as the app sends `http.response.start`, and its body
at `http.response.body`: two writes, so two `send` system calls and two TCP segments for every answer, and a
client that wakes twice to read them. Here the head is held until the next write of the same request (the body,
which the app sends in the same step of its task: joined, one `send`), the end of that step (a stream's first
chunk may come much later: its head goes at once), or the connection's close, whichever comes first; and before
the protocol itself closes the connection (the server stopping) or answers a malformed request with a 400 (in
OpenAI's error envelope, where uvicorn answers in plain text). A HEAD answer, which has no body to join, is written
as uvicorn writes it. Nothing else changes: but for that 400's body, the bytes on the wire are the same, in the same
order (a review compared them with uvicorn's own protocol in 17 cases: pipelining, HTTP/1.0,
`Connection: close`, 500s, 204, 100-continue, malformed requests, WebSocket, chunked uploads).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


class HeadFirst:
    """A request's view of its connection's transport: its first write (the head) is held until its next
    write, the end of the current step of the event loop, or `close`."""

    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = b""
        """The head, while it waits; b"" before the first write; None after it went."""
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._transport.write(data)
        elif held:
            self._held = None
            self._transport.writelines((held, data))  # one writev
        else:
            self._held = data
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send the head if it still waits (and the connection is still open: a client that reset it since is gone)."""
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; each request but HEAD writes through a `HeadFirst` of its own (a HEAD answer
    has no body to join its head to)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # A new request (its task has not run yet): an upgrade returns early, leaving the last request's cycle.
        if cycle is not None and cycle.transport is self.transport and cycle.scope["method"] != "HEAD":
            cycle.transport = HeadFirst(self.transport, self.loop)  # type: ignore[assignment]

    def _flush(self) -> None:
        """A head still held goes before this protocol writes or closes the connection itself."""
        transport = getattr(self.cycle, "transport", None)
        if isinstance(transport, HeadFirst):
            transport.flush()

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refuses (a NUL in a header, a malformed request line) gets OpenAI's error
        envelope, as every other refusal does, where uvicorn answers in plain text; the connection is closed."""
        self._flush()
        error = {"message": f"{msg.rstrip('.')}: the request is not valid HTTP/1.1.", "type": "invalid_request_error"}
        body = json.dumps({"error": error | {"param": None, "code": None}}).encode()
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content += [
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join([*content, body]))
        self.transport.close()

    def shutdown(self) -> None:
        """The server stops: an answered request's connection is closed at once, its head sent first."""
        self._flush()
        super().shutdown()
