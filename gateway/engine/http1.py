"""The completion requests' HTTP/1.1 client to the engines: keep-alive connections on a raw `asyncio.Protocol`
with httptools' response parser (the one uvicorn parses requests with).

Why not aiohttp's `ClientSession` here: every completion request crosses it, and on these 2-core machines it cost
a gateway process about a quarter of its CPU per request (its request and response objects, header merging, URL
parsing, cookie handling, timers, the connector's bookkeeping), which the client under load, the engine and Redis
need too. This client does what a completion request needs and no more: one POST written in one call, an answer
read to its end (content-length, chunked, or until the engine closes) or relayed as it comes, connections kept a
while for the next request. Adapter loads, listings and health checks keep aiohttp (`EngineSessions`).

Failures are aiohttp's exception types, so that one classification (`gateway.engine.sessions.stale`, the forwarder's
handlers) serves both clients: a connection closed or reset before any answer is `ServerDisconnectedError` (sent
again once on a new connection: see `stale`), one cut in the middle of an answer `AnswerCut` or
`ClientPayloadError`, silence past the read timeout `SocketTimeoutError`, and a connection that cannot be opened
`ConnectFailed` (the request never reached the engine).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import httptools

PAUSE_AT = 1 << 18
"""Answer bytes buffered unread before the connection stops reading (a slow client of a stream): resumed as read."""


class ConnectFailed(aiohttp.ClientConnectionError):
    """The connection could not be opened (refused, unreachable, timed out): the request never reached the engine."""


class AnswerCut(aiohttp.ClientConnectionError):
    """The connection closed, or sent what is not HTTP, after part of an answer's head: the engine had the request."""


_Target = tuple[str, int, bool, bytes]
"""host, port, TLS, and the request line and fixed headers up to the request id."""


class EngineResponse:
    """An answer: its status and content type once its head is in; its body read whole (`read`) or as it comes
    (`content.iter_any`, `content.read`). `release` gives its connection back for the next request when the body
    has been read to its end (else closes it); `close` closes it (the engine aborts a generation it is writing)."""

    __slots__ = ("status", "content_type", "_connection", "_chunks", "_buffered", "_complete", "_error", "_body")

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        self.content_type = ""
        self._connection: _Connection | None = connection
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._body: bytes | None = None

    @property
    def content(self) -> EngineResponse:
        return self

    async def read(self, n: int = -1) -> bytes:
        """`read()`: the whole body (again on a second call); `read(n)`: at most n bytes of what comes next, b"" at
        its end."""
        if n < 0:
            if self._body is None:
                if self._error is not None:
                    raise self._error
                parts = [self._take()]  # taken as they come: reading is not paused under a whole read
                while not self._complete:
                    await self._more()
                    parts.append(self._take())
                self._body = b"".join(parts)
            return self._body
        while not self._chunks and not self._complete:
            await self._more()
        data = self._take()
        if len(data) > n:
            self._chunks, self._buffered, data = [data[n:]], len(data) - n, data[:n]
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """What has come of the body each time something has, to its end."""
        while True:
            while not self._chunks and not self._complete:
                await self._more()
            if not self._chunks:
                return
            yield self._take()

    def unread(self, data: bytes) -> None:
        """Put `data`, read last, back in front of what comes next (a stream's first event, looked at before it
        is relayed)."""
        if data:
            self._chunks.insert(0, data)
            self._buffered += len(data)

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.done(reuse=True)  # if its answer came whole: `_Connection.reusable`

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.done(reuse=False)

    def _take(self) -> bytes:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        if self._connection is not None:
            self._connection.resume()
        return data

    async def _more(self) -> None:
        if self._error is not None:
            raise self._error
        if self._connection is None:
            raise aiohttp.ClientConnectionError("Connection closed")
        await self._connection.wait()
        if self._error is not None and not self._chunks:
            raise self._error


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one request at a time."""

    def __init__(self, client: EngineClient, key: tuple[str, int, bool]) -> None:
        self._client = client
        self._key = key
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._last = False
        """The request under way said `Connection: close`."""
        self.reusable = False
        """The last answer came whole, and neither side said the connection closes after it."""
        self.idle_since = 0.0
        self.read_timeout_s: float | None = None
        """The request under way's (`EngineClient.post`)."""
        self._response: EngineResponse | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_in = False
        self._until_close = False
        self._bytes_in = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._bytes_in = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(AnswerCut(f"The engine's answer could not be read: {exc}"))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        ours, self.closed = self.closed, True  # closed here (a timeout, an unreadable answer) or by the engine
        del self._parser  # it refers back to this protocol: the two go now, not at the next full collection
        response = self._response
        if response is None or response._complete:
            return
        if not self._head_in:
            if self._bytes_in:
                self._fail(AnswerCut("The engine closed the connection in the middle of an answer's head."))
            else:  # closed or reset before any answer (an idle connection the engine closed): see `stale`
                self._fail(aiohttp.ServerDisconnectedError())
        elif self._until_close and exc is None and not ours:  # the engine closed it: the answer's end
            response._complete = True
            self._wake()
        else:
            self._fail(aiohttp.ClientPayloadError("Response payload is not completed"))

    # -- httptools callbacks ----------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None:
            return
        response.status = self._parser.get_status_code()
        framed = False
        for name, value in self._headers:
            if name == b"content-type":
                response.content_type = value.split(b";", 1)[0].strip().lower().decode("latin-1")
            elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                framed = True
        self._until_close = not framed
        self._head_in = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None:
            return
        response._chunks.append(body)
        response._buffered += len(body)
        if response._buffered > PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None:
            response._complete = True
            self.reusable = self._parser.should_keep_alive() and not self._last
        self._wake()

    # -- the request's side -----------------------------------------------------------------------------------

    def send(self, data: bytes, last: bool = False) -> EngineResponse:
        """Write a request (`last`: it says `Connection: close`, and the connection is not kept after it)."""
        assert self.transport is not None
        self._response = response = EngineResponse(self)
        self._headers, self._head_in, self._until_close, self._bytes_in = [], False, False, False
        self.reusable = False
        self._last = last
        if self.closed or self.transport.is_closing():
            self.closed = True
            raise aiohttp.ServerDisconnectedError()
        self.transport.write(data)
        return response

    async def head(self) -> None:
        """Wait for the answer's head (its status and headers)."""
        while not self._head_in:
            await self.wait()
            response = self._response
            if response is not None and response._error is not None:
                raise response._error

    async def wait(self) -> None:
        """Until something comes or the connection ends; past the read timeout, the answer fails with
        SocketTimeoutError (raised by the caller, as every failure of the answer)."""
        response = self._response
        if response is None or response._complete or response._error is not None:
            return
        waiter = self._waiter = self._loop.create_future()
        timer = None
        if self.read_timeout_s is not None:
            timer = self._loop.call_later(self.read_timeout_s, self._timed_out, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def done(self, reuse: bool) -> None:
        """The request's answer is done with: its connection kept for the next request, or closed."""
        self._response = None
        if reuse and self.reusable and not self.closed and not self._paused:
            self.idle_since = time.monotonic()
            self._client.keep(self._key, self)
        else:
            self._close()

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter and not waiter.done():  # not if data came in the same turn of the loop
            self._fail(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
            self._close()

    def _fail(self, exc: BaseException) -> None:
        if self._response is not None and self._response._error is None:
            self._response._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class EngineClient:
    """Completion requests to the engines, on connections kept `keepalive_s` between requests (per host)."""

    def __init__(self, keepalive_s: float, connect_timeout_s: float = 5.0) -> None:
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._idle: dict[tuple[str, int, bool], deque[_Connection]] = {}
        """Per engine, its idle connections, the most recently used last."""
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None

    async def post(
        self, url: str, body: bytes, request_id: str, read_timeout_s: float | None, fresh: bool = False
    ) -> EngineResponse:
        """POST `body` (JSON) to `url`; the answer once its head is in. `fresh`: on a new connection, closed after."""
        host, port, tls, head = self._target(url)
        key = (host, port, tls)
        connection = None if fresh else self._pooled(key)
        if connection is None:
            connection = await self._connect(key)
        connection.read_timeout_s = read_timeout_s
        try:
            ending = b"\r\nConnection: close\r\n\r\n" if fresh else b"\r\n\r\n"
            lines = head + request_id.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + ending
            response = connection.send(lines + body, last=fresh)
            await connection.head()
        except BaseException:
            connection.done(reuse=False)
            raise
        return response

    def keep(self, key: tuple[str, int, bool], connection: _Connection) -> None:
        """`connection` is idle: kept for the next request, and the longest idle one closed if it has idled too long
        (or the engine closed it), so that connections a burst opened do not wait until one is taken."""
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        idle.append(connection)
        oldest = idle[0]
        if oldest.closed or connection.idle_since - oldest.idle_since >= self._keepalive_s:
            idle.popleft().done(reuse=False)

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.done(reuse=False)

    def _pooled(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest to be open still
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.done(reuse=False)
        return None

    async def _connect(self, key: tuple[str, int, bool]) -> _Connection:
        host, port, tls = key
        loop = asyncio.get_running_loop()
        context = None
        if tls:
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(lambda: _Connection(self, key), host, port, ssl=context)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"Cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
        return protocol

    def _target(self, url: str) -> _Target:
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            host, port = parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            authority = parts.netloc.rpartition("@")[2]
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n"
                "Accept-Encoding: identity\r\nX-Request-Id: "
            ).encode()
            found = self._targets[url] = (host, port, tls, head)
        return found
