"""gateway.http_protocol: a response's head goes out with its body in one write, on a real uvicorn server, and
never waits for a body that comes later (a stream's chunks), nor is lost to a close."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.server import ServerState

from gateway.http_protocol import HeadFirst, HttpProtocol


class Transport:
    """What reaches the socket: one entry per write (writelines: one, all its parts joined)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_the_head_waits_for_the_body_of_the_same_step() -> None:
    transport = Transport()
    head_first = HeadFirst(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    head_first.write(b"HEAD")
    assert transport.writes == []
    head_first.write(b"BODY")
    head_first.write(b"MORE")
    await asyncio.sleep(0)  # the flush at the step's end finds nothing held
    assert transport.writes == [b"HEADBODY", b"MORE"]


async def test_a_head_alone_goes_at_the_end_of_the_step_or_at_close() -> None:
    transport = Transport()
    alone = HeadFirst(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    alone.write(b"HEAD")
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]
    closing = HeadFirst(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    closing.write(b"HEAD2")
    closing.close()
    assert transport.writes == [b"HEAD", b"HEAD2"] and transport.closed and closing.is_closing()
    assert closing.get_extra_info("peername", "none") == "none"  # the rest is the transport's


async def test_a_head_held_when_the_client_resets_the_connection_is_dropped_quietly() -> None:
    transport = Transport()
    head_first = HeadFirst(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    head_first.write(b"HEAD")
    transport.closed = True  # reset by the client before the step's end: writing now would raise (uvloop)
    await asyncio.sleep(0)
    assert transport.writes == []


class Counted(HttpProtocol):
    """The protocol, its writes to the socket counted (per connection, in order)."""

    seen: list[Transport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        real = transport

        class Spy(Transport):
            def write(self, data: bytes) -> None:
                super().write(data)
                real.write(data)  # type: ignore[attr-defined]

            def writelines(self, parts: Any) -> None:
                super().writelines(parts)
                real.writelines(parts)  # type: ignore[attr-defined]

            def close(self) -> None:
                super().close()
                real.close()

            def is_closing(self) -> bool:
                return real.is_closing()  # type: ignore[attr-defined]

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        spy = Spy()
        Counted.seen.append(spy)
        super().connection_made(spy)  # type: ignore[arg-type]


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, asyncio.Event]]:
    go_on = asyncio.Event()

    async def answer(request: Request) -> Response:
        return Response(b'{"ok":true}', media_type="application/json")

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            await go_on.wait()  # the client has the head (and the first chunk) before this
            yield b"data: 2\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/answer", answer, methods=["GET", "HEAD"]),
            Route("/stream", stream),
            Route("/echo", echo, methods=["POST"]),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=Counted, log_level="warning", lifespan="off", access_log=False)
    uv_server = uvicorn.Server(config)
    Counted.seen.clear()
    task = asyncio.create_task(uv_server.serve(sockets=[sock]))
    while not uv_server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", go_on
    uv_server.should_exit = True
    await task


async def test_a_whole_answer_is_one_write_and_a_stream_is_not_held(server: tuple[str, asyncio.Event]) -> None:
    url, go_on = server
    async with httpx.AsyncClient(base_url=url) as client:
        answered = await client.get("/answer")
        head = await client.head("/answer")
        async with client.stream("GET", "/stream") as streamed:
            assert streamed.status_code == 200  # the head came while the stream waits for its second chunk
            go_on.set()
            body = await streamed.aread()
    assert answered.status_code == 200 and answered.json() == {"ok": True}
    assert head.status_code == 200 and head.headers["content-length"] == "11" and head.content == b""
    assert body == b"data: 1\n\ndata: 2\n\n"
    writes = [w for spy in Counted.seen for w in spy.writes]
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b'\r\n\r\n{"ok":true}')
    assert writes[1].startswith(b"HTTP/1.1 200 OK\r\n") and writes[1].endswith(b"\r\n\r\n")  # HEAD: its head alone
    assert writes[2].startswith(b"HTTP/1.1 200 OK\r\n")  # the stream's head, at once (with its first chunk or not)
    assert b"".join(writes[2:]).endswith(b"data: 2\n\n\r\n0\r\n\r\n")


async def test_a_100_continue_goes_before_the_body_is_sent(server: tuple[str, asyncio.Event]) -> None:
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # held until the body came: a timeout
    writer.write(b"{}")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.readexactly(2), 5)
    writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"{}"


async def _answer_then_shutdown(method: bytes) -> bytes:
    """What a client gets when the server starts to stop right behind the step that answered it (its shutdown
    queued before the end of that step): with the head held past the step, a HEAD answer was lost."""
    servers: list[uvicorn.Server] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: [c.shutdown() for c in list(servers[0].server_state.connections)])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=HttpProtocol, lifespan="off", log_level="critical", access_log=False)
    servers.append(server := uvicorn.Server(config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    writer.write(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    server.should_exit = True
    await task
    return got


async def test_an_answer_is_sent_whole_when_the_server_stops_right_after_it() -> None:
    head = await _answer_then_shutdown(b"HEAD")
    whole = await _answer_then_shutdown(b"GET")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"content-length: 5\r\n\r\n")
    assert whole.startswith(b"HTTP/1.1 200 OK\r\n") and whole.endswith(b"\r\n\r\nhello")


async def test_the_protocol_sends_a_held_head_before_it_closes_or_answers_400_itself() -> None:
    config = uvicorn.Config(lambda *_: None, http=HttpProtocol, lifespan="off")
    config.load()
    for act in ("shutdown", "send_400_response"):
        transport = Transport()
        protocol = HttpProtocol(config, ServerState(), app_state={})
        protocol.connection_made(transport)  # type: ignore[arg-type]
        held = HeadFirst(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(b"HEAD")
        protocol.cycle = SimpleNamespace(transport=held, response_complete=True)  # type: ignore[assignment]
        protocol.shutdown() if act == "shutdown" else protocol.send_400_response("Invalid HTTP request received.")
        assert transport.writes[0] == b"HEAD" and transport.closed, act
        assert act == "shutdown" or transport.writes[1].startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_a_request_the_parser_refuses_gets_openais_error_envelope(server: tuple[str, asyncio.Event]) -> None:
    """A NUL in a header (in an API key, say) was answered `Invalid HTTP request received.` in plain text."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /answer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-\x00x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)  # then the connection is closed
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"content-type: application/json" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
    assert error["message"].startswith("Invalid HTTP request received")
