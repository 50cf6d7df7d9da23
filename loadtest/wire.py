"""A closed-loop HTTP/1.1 load client on a raw `asyncio.Protocol` and httptools' response parser.

`closed_loop` keeps C keep-alive connections to one server busy: each sends its next request as soon as
the last response has been read to its end (content-length, chunked, a streamed SSE response alike),
until a deadline or a number of requests per connection. Requests are prebuilt bytes (`build`), taken in
turn from one rotation shared by all connections (several bodies: a new end user on every request).

Why not aiohttp: the closed-loop phases saturate one 2-core machine shared by this client, the mock
upstream, the gateway under test and Redis, so the client's own CPU per request is taken from the target.
On 2 cores aiohttp's `ClientSession` cost 80-100 µs of CPU per request straight to the mock upstream and
145-165 through a gateway; this 15-25 and 40-50.

Each response gives a latency (from the request's write to its last byte) and a status; one other than
200 is an error, the first error's text kept. A connection the server closes or resets mid-response is
an error too and the client reconnects (a connection it cannot open ends that client, an error); a
response that takes longer than `timeout_s` is an error and its connection is dropped, so a run never
hangs. Responses must say where they end (a content-length or chunked): one that ends when the server
closes the connection counts as an error.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

Address = tuple[str, int]


def build(method: str, url: str, headers: Mapping[str, str], bodies: Sequence[bytes]) -> tuple[Address, list[bytes]]:
    """The server's (host, port) and one complete request per body; `host` and, when there is a body or
    the method is POST, `content-length` are added unless `headers` has them."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    named = {name.lower() for name in headers}
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    if "host" not in named:
        lines.insert(0, f"host: {parts.netloc}\r\n")
    requests = []
    for body in bodies:
        length = (
            f"content-length: {len(body)}\r\n" if (body or method == "POST") and "content-length" not in named else ""
        )
        requests.append(f"{method} {target} HTTP/1.1\r\n{''.join(lines)}{length}\r\n".encode() + body)
    return (host, port), requests


@dataclass
class WireResult:
    latencies_s: list[float] = field(default_factory=list)
    """One per response that answered 200, in seconds."""
    statuses: dict[int, int] = field(default_factory=dict)
    """Responses by status code."""
    errors: int = 0
    first_error: str | None = None
    elapsed_s: float = 0.0
    """From the first request sent (the connections open) to the last response read."""

    def failed(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text[:300]


@dataclass
class _Run:
    address: Address
    requests: Iterator[bytes]
    timeout_s: float
    count: int | None
    deadline: float = float("inf")
    going: bool = False
    result: WireResult = field(default_factory=WireResult)

    def wants(self, sent: int, now: float) -> bool:
        return now < self.deadline and (self.count is None or sent < self.count)


class _Client(asyncio.Protocol):
    """One client: one connection at a time (a new one when the server drops it), one request in flight."""

    transport: asyncio.Transport
    closed: asyncio.Future[None]

    def __init__(self, run: _Run) -> None:
        self.run, self.sent, self.started, self.status, self.error_body = run, 0, 0.0, 0, b""

    async def connect(self) -> bool:
        """Open a connection (sending at once when the run has begun); False, an error counted, if it fails."""
        loop = asyncio.get_running_loop()
        self.parser, self.closed = httptools.HttpResponseParser(self), loop.create_future()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, *self.run.address), self.run.timeout_s)
        except (OSError, TimeoutError) as exc:
            self.run.result.failed(f"cannot connect to {self.run.address}: {exc!r}")
            return False
        return True

    async def drive(self) -> None:
        """Until the run is over: wait for the connection to end, open another."""
        while True:
            await self.closed
            if not self.run.wants(self.sent, time.perf_counter()) or not await self.connect():
                return

    def send(self, now: float) -> None:
        if self.transport.is_closing():
            return
        if not self.run.wants(self.sent, now):
            self.transport.close()
            return
        self.sent, self.status, self.error_body = self.sent + 1, 0, b""
        self.started = time.perf_counter()
        self.transport.write(next(self.run.requests))

    def lost(self, why: str) -> None:
        """The request in flight (if any) failed; drop the connection."""
        if self.started:
            self.started = 0.0
            self.run.result.failed(why)
        self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.run.going:
            self.send(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.started:
            self.started = 0.0
            self.run.result.failed(
                f"connection lost mid-response: {exc!r}" if exc else "connection closed mid-response"
            )
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.lost(f"bad response: {exc!r}")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200 and len(self.error_body) < 200:
            self.error_body += body

    def on_message_complete(self) -> None:
        now, result, status = time.perf_counter(), self.run.result, self.status
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 200:
            result.latencies_s.append(now - self.started)
        else:
            result.failed(f"HTTP {status} {self.error_body[:200]!r}")
        self.started = 0.0
        if self.parser.should_keep_alive():
            self.send(now)
        else:
            self.transport.close()


async def _watchdog(clients: list[_Client], timeout_s: float) -> None:
    """Fail (and drop the connection of) every request in flight for longer than `timeout_s`."""
    while True:
        await asyncio.sleep(min(1.0, timeout_s / 4))
        now = time.perf_counter()
        for client in clients:
            if client.started and now - client.started > timeout_s:
                client.lost(f"no response in {timeout_s:g} s")


async def closed_loop(
    address: Address,
    requests: Sequence[bytes],
    concurrency: int,
    duration_s: float | None,
    count: int | None = None,
    timeout_s: float = 30.0,
) -> WireResult:
    """`concurrency` connections to `address` in a closed loop for `duration_s` seconds (None: no limit) or
    `count` requests each, whichever ends first; the connections are opened before the clock starts."""
    run = _Run(address, itertools.cycle(requests), timeout_s, count)
    clients = [_Client(run) for _ in range(concurrency)]
    opened = await asyncio.gather(*(client.connect() for client in clients))
    connected = [client for client, ok in zip(clients, opened, strict=True) if ok]
    started = time.perf_counter()
    run.deadline = started + duration_s if duration_s is not None else float("inf")
    run.going = True
    for client in connected:
        client.send(started)
    watchdog = asyncio.create_task(_watchdog(connected, timeout_s))
    try:
        await asyncio.gather(*(client.drive() for client in connected))
    finally:
        watchdog.cancel()
        for client in connected:  # idle unless the run was cancelled
            client.transport.close()
    run.result.elapsed_s = time.perf_counter() - started
    return run.result
