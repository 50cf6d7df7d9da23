"""The completion requests' HTTP/1.1 client (gateway.engine.http1) against a stand-in engine that writes exactly the
bytes each test gives it: what a request holds, which connections are kept, and how each way an answer can fail is
told apart (the forwarder sends a request again, or not, by it)."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from gateway.engine import http1
from gateway.engine.http1 import AnswerCut, ConnectFailed, EngineClient
from gateway.engine.sessions import stale
from gateway.errors import UpstreamTimeout
from gateway.streaming import refused_at_start

Answer = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[None]]
"""What the engine does with the n-th request (from 0) it read, given its bytes."""


def whole(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("Content-Type: application/json", *headers))
    return f"HTTP/1.1 200 OK\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def answers_ok(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(whole(b'{"ok":true}'))


@dataclass
class Engine:
    answer: Answer
    url: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the gateway closes a connection."""
    reader: asyncio.StreamReader | None = None
    """The last connection's."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.reader = reader
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.answer(len(self.requests) - 1, request, writer)
                await writer.drain()
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended.set()
        finally:
            writer.close()


@pytest.fixture
async def engine_with() -> AsyncIterator[Callable[[Answer], Awaitable[Engine]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> Engine:
        engine = Engine(answer)
        server = await asyncio.start_server(engine.serve, "127.0.0.1", 0)
        servers.append(server)
        engine.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
        return engine

    yield start
    for server in servers:
        server.close()


async def post(client: EngineClient, engine: Engine, fresh: bool = False, timeout_s: float = 5) -> bytes:
    response = await client.post(engine.url, b'{"model":"m"}', "rid1", timeout_s, fresh)
    body = await response.read()
    response.release()
    return body


async def test_a_request_says_what_the_engine_needs_and_its_connection_is_kept(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = await engine_with(answers_ok)
    client = EngineClient(keepalive_s=30)
    try:
        assert await post(client, engine) == b'{"ok":true}'
        assert await post(client, engine) == b'{"ok":true}'
        assert engine.connections == 1, "the second request went on the first one's connection"
        head, body = engine.requests[0].split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/chat/completions HTTP/1.1" and body == b'{"model":"m"}'
        for line in (b"Content-Type: application/json", b"Accept-Encoding: identity", b"X-Request-Id: rid1"):
            assert line in lines
        assert b"Content-Length: 13" in lines and any(line.startswith(b"Host: 127.0.0.1:") for line in lines)
    finally:
        await client.close()


async def test_a_connection_idle_past_the_keep_alive_is_not_used_again(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = await engine_with(answers_ok)
    client = EngineClient(keepalive_s=0.2)
    try:
        await post(client, engine)
        await asyncio.sleep(0.3)
        await post(client, engine)
        assert engine.connections == 2
        await asyncio.wait_for(engine.ended.wait(), 5)  # the idle one was closed, not left open
    finally:
        await client.close()


async def test_a_fresh_request_goes_on_a_connection_of_its_own_closed_after_it(engine_with) -> None:  # type: ignore[no-untyped-def]
    async def closes_when_asked(_: int, request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(whole(b"{}", "Connection: close") if b"Connection: close" in request else whole(b"{}"))
        if b"Connection: close" in request:
            writer.close()

    engine = await engine_with(closes_when_asked)
    client = EngineClient(keepalive_s=30)
    try:
        await post(client, engine)
        await post(client, engine, fresh=True)
        await post(client, engine)
        assert engine.connections == 2, "the fresh one was new; the third request took the pooled one"
        assert [b"Connection: close" in r for r in engine.requests] == [False, True, False]
    finally:
        await client.close()


async def test_a_stream_comes_as_it_is_written_and_its_connection_is_kept(engine_with) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def streams(n: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        if n:
            writer.write(whole(b"{}"))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        writer.write(b'8\r\ndata: {"\r\n')  # the first event in two pieces
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'7\r\na":1}\n\n\r\n')
        await writer.drain()
        await release.wait()
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")

    engine = await engine_with(streams)
    client = EngineClient(keepalive_s=30)
    try:
        response = await client.post(engine.url, b"{}", "r", 5)
        assert response.status == 200 and response.content_type == "text/event-stream"
        assert await refused_at_start(response, 5) is None, "its first event read whole, and put back"
        events = response.content.iter_any()
        assert await anext(events) == b'data: {"a":1}\n\n', "the first event, before the rest is written"
        release.set()
        assert [chunk async for chunk in events] == [b"data: [DONE]\n\n"]
        response.release()
        await post(client, engine)
        assert engine.connections == 1
    finally:
        await client.close()


async def test_an_answer_that_ends_with_its_connection_is_read_whole(engine_with) -> None:  # type: ignore[no-untyped-def]
    async def unframed(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":')
        await writer.drain()
        writer.write(b"1}")
        writer.close()

    engine = await engine_with(unframed)
    client = EngineClient(keepalive_s=30)
    try:
        assert await post(client, engine) == b'{"a":1}'
    finally:
        await client.close()


async def test_read_n_gives_the_body_in_pieces(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = await engine_with(lambda n, r, w: answers_ok(n, r, w))
    client = EngineClient(keepalive_s=30)
    try:
        response = await client.post(engine.url, b"{}", "r", 5)
        assert await response.content.read(4) == b'{"ok'
        assert await response.content.read(100) == b'":true}'
        assert await response.content.read(100) == b""
        response.close()
    finally:
        await client.close()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_connection_closed_before_any_answer_is_stale(engine_with, reset: bool) -> None:  # type: ignore[no-untyped-def]
    """As an idle pooled connection the engine closed as the request was sent: `stale`, so the forwarder sends the
    request again on a new connection (when its replica is healthy)."""

    async def hangs_up(n: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        if n == 0:
            writer.write(whole(b"{}"))
            return
        if reset:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        writer.close()

    engine = await engine_with(hangs_up)
    client = EngineClient(keepalive_s=30)
    try:
        await post(client, engine)
        with pytest.raises(aiohttp.ClientConnectionError) as caught:
            await post(client, engine)
        assert stale(caught.value), caught.value
    finally:
        await client.close()


@pytest.mark.parametrize(
    "written",
    [b"HTTP/1.1 200 OK\r\nContent-Le", b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"partial', b"NOT HTTP\r\n\r\n"],
    ids=["cut in the head", "cut in the body", "not HTTP"],
)
async def test_an_answer_cut_or_unreadable_is_not_stale(engine_with, written: bytes) -> None:  # type: ignore[no-untyped-def]
    """The engine had the request (it may have run it): never sent again, and an error the forwarder answers 502."""

    async def cuts(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(written)
        await writer.drain()
        writer.close()

    engine = await engine_with(cuts)
    client = EngineClient(keepalive_s=30)
    try:
        with pytest.raises(aiohttp.ClientError) as caught:
            await post(client, engine)
        assert not stale(caught.value), caught.value
        assert isinstance(caught.value, AnswerCut | aiohttp.ClientPayloadError)
    finally:
        await client.close()


async def test_an_engine_silent_past_the_read_timeout_times_out_and_the_connection_closes(engine_with) -> None:  # type: ignore[no-untyped-def]
    async def silent(_: int, __: bytes, ___: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    engine = await engine_with(silent)
    client = EngineClient(keepalive_s=30)
    try:
        with pytest.raises(aiohttp.SocketTimeoutError):
            await asyncio.wait_for(post(client, engine, timeout_s=0.2), 5)
    finally:
        await client.close()


async def test_a_request_cancelled_while_it_waits_closes_its_connection(engine_with) -> None:  # type: ignore[no-untyped-def]
    """As the forwarder's request when its client leaves: the engine sees its connection closed (vLLM then aborts
    the generation)."""

    async def slow(_: int, __: bytes, ___: asyncio.StreamWriter) -> None:
        assert engine.reader is not None
        if not await engine.reader.read(1):  # nothing more comes: the gateway closed the connection
            engine.ended.set()

    engine = await engine_with(slow)
    client = EngineClient(keepalive_s=30)
    try:
        task = asyncio.create_task(post(client, engine))
        while not engine.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(engine.ended.wait(), 5)
    finally:
        await client.close()


async def test_an_engine_that_cannot_be_reached_fails_to_connect() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refused
        client = EngineClient(keepalive_s=30)
        with pytest.raises(ConnectFailed) as caught:
            await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", "r", 5)
        assert not stale(caught.value)
        await client.close()


async def test_an_answer_left_unread_or_refused_for_keep_alive_closes_its_connection(engine_with) -> None:  # type: ignore[no-untyped-def]
    async def big_then_closing(n: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(whole(b"x" * 3_000_000) if n == 0 else whole(b"{}", "Connection: close"))

    engine = await engine_with(big_then_closing)
    client = EngineClient(keepalive_s=30)
    try:
        response = await client.post(engine.url, b"{}", "r", 5)
        response.release()  # before its body was read: the connection cannot carry another request
        await post(client, engine)
        await post(client, engine)
        assert engine.connections == 3, "neither the unread answer's connection nor the engine's closing one was kept"
    finally:
        await client.close()


async def test_a_large_answer_read_slowly_comes_whole(engine_with, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Reading stops while PAUSE_AT bytes wait unread (a stream's slow client) and goes on as they are read."""
    monkeypatch.setattr(http1, "PAUSE_AT", 1000)
    body = bytes(range(256)) * 4000

    async def big(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(whole(body))  # both answers: the second one read whole (reading is not paused then)

    engine = await engine_with(big)
    client = EngineClient(keepalive_s=30)
    try:
        response = await client.post(engine.url, b"{}", "r", 5)
        got = b""
        async for chunk in response.content.iter_any():
            got += chunk
            await asyncio.sleep(0)
        assert got == body
        response.release()
        await post(client, engine)
        assert await post(client, engine) == body
        assert engine.connections == 1, "read to its end: kept"
    finally:
        await client.close()


async def test_data_that_comes_in_time_is_not_a_timeout_when_the_loop_lags_past_the_deadline() -> None:
    """The engine's next chunk comes within the read timeout, but the gateway's loop is busy across the deadline:
    the data and the expired timer are handled in the same turn of the loop. The stream goes on."""
    ready = threading.Event()

    def engine(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n")
            connection.sendall(b"\r\n5\r\nfirst\r\n")
            ready.wait(5)
            time.sleep(0.1)
            connection.sendall(b"6\r\nsecond\r\n")
            time.sleep(0.6)  # past the loop's lag: the stream is still open if the client did not give up
            connection.sendall(b"0\r\n\r\n")
            time.sleep(1)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=engine, args=(listener,), daemon=True).start()
        client = EngineClient(keepalive_s=30)
        response = await client.post(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/x", b"{}", "r", 0.3)
        chunks = response.content.iter_any()
        assert await anext(chunks) == b"first"
        ready.set()
        asyncio.get_running_loop().call_later(0.05, time.sleep, 0.5)  # busy from before the data to past the deadline
        assert [chunk async for chunk in chunks] == [b"second"]
        response.close()
        await client.close()


STALLS_AFTER = {
    "unframed": b'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\r\n{"error":{"mess',
    "stream": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
}


@pytest.mark.parametrize("head", STALLS_AFTER)
async def test_an_answer_that_stalls_after_its_head_times_out_on_every_read(engine_with, head: str) -> None:  # type: ignore[no-untyped-def]
    """An answer that ends with its connection (no length, not chunked) stalls: the read times out and the client
    closes the connection. A second read (the forwarder reads a refusal again to pass it on) fails the same way, not
    with the part that came as if it were all. A stream silent after its head is a 504 before any event is relayed
    (`refused_at_start`), and its reads time out after."""

    async def stalls(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(STALLS_AFTER[head])
        await writer.drain()
        await asyncio.sleep(2)

    engine = await engine_with(stalls)
    client = EngineClient(keepalive_s=30)
    try:
        response = await client.post(engine.url, b"{}", "r", 0.3)
        if head == "stream":
            refused = await asyncio.wait_for(refused_at_start(response, 0.3), 5)
            assert isinstance(refused, UpstreamTimeout) and refused.status == 504
        for _ in range(2):
            with pytest.raises(aiohttp.SocketTimeoutError):
                await response.read()
            await asyncio.sleep(0.05)  # the connection's end is seen meanwhile
        response.close()
    finally:
        await client.close()


async def test_a_closed_connection_is_freed_at_once_not_at_a_full_collection(engine_with) -> None:  # type: ignore[no-untyped-def]
    """A connection and its parser refer to each other: left to the collector, every closed connection would wait for
    a full collection, which a gateway process makes rarely (a soak's memory grew twice as fast as with aiohttp)."""
    engine = await engine_with(answers_ok)
    client = EngineClient(keepalive_s=30)
    gc.disable()
    try:
        response = await client.post(engine.url, b"{}", "r", 5, fresh=True)
        await response.read()
        connection = weakref.ref(response._connection)  # type: ignore[arg-type]
        response.release()  # the engine closes it (Connection: close)
        del response
        for _ in range(50):
            if connection() is None:
                break
            await asyncio.sleep(0.01)
        assert connection() is None, "still alive, waiting for the collector"
    finally:
        gc.enable()
        await client.close()
