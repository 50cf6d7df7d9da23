"""The benchmarks' raw-protocol pieces: the mock upstream (loadtest/mock_upstream.py, run as the benchmarks
run it) and the closed-loop client (loadtest/wire.py) driving it and servers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httptools
import pytest

from loadtest import wire
from loadtest.load import Target as LoadTarget
from loadtest.load import closed_loop
from loadtest.overhead_client import Target as OverheadTarget
from loadtest.overhead_client import load_segment, request_body
from loadtest.services import MOCK_SCRIPT, free_port

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def mock() -> Iterator[str]:
    """The mock upstream as a subprocess; its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(MOCK_SCRIPT), "--port", str(port)])
    try:
        deadline = time.monotonic() + 60  # an interpreter's start, beside vLLM and training in CI
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the mock upstream did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


def bodies(n: int, **extra: object) -> list[bytes]:
    return [
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "user": f"u{i}", **extra}).encode()
        for i in range(n)
    ]


async def test_non_stream_requests_in_a_closed_loop(mock: str) -> None:
    address, requests = wire.build("POST", f"{mock}/v1/chat/completions", JSON, bodies(3))
    result = await wire.closed_loop(address, requests, 4, 0.3)
    assert result.errors == 0 and result.first_error is None
    assert len(result.latencies_s) > 0 and result.statuses == {200: len(result.latencies_s)}
    assert 0.3 <= result.elapsed_s < 10  # stopped once its time is up (the last answers awaited)
    counted = await wire.closed_loop(address, requests, 3, None, count=7)
    assert counted.statuses == {200: 21}


async def test_streams_are_read_to_their_end(mock: str) -> None:
    """Ten streamed responses on each keep-alive connection: each read to its last chunk ([DONE]), or the
    next response on that connection would not parse."""
    address, requests = wire.build("POST", f"{mock}/v1/chat/completions", JSON, [request_body(True)])
    result = await wire.closed_loop(address, requests, 2, None, count=10)
    assert result.statuses == {200: 20} and result.errors == 0


async def test_a_get_target_without_a_body(mock: str) -> None:
    address, requests = wire.build("GET", f"{mock}/v1/models", {}, [b""])
    assert b"content-length" not in requests[0]
    result = await wire.closed_loop(address, requests, 2, None, count=5)
    assert result.statuses == {200: 10} and result.errors == 0


async def test_other_statuses_are_errors_with_the_first_text_kept(mock: str) -> None:
    address, requests = wire.build("GET", f"{mock}/no/such/path", {}, [b""])
    result = await wire.closed_loop(address, requests, 2, None, count=3)
    assert result.errors == 6 and result.statuses == {404: 6} and result.latencies_s == []
    assert result.first_error is not None and "HTTP 404" in result.first_error and "Not Found" in result.first_error


async def test_the_benchmark_loops_run_on_wire(mock: str) -> None:
    """loadtest.load.closed_loop and overhead_client.load_segment keep their results; the session is unused."""
    target = LoadTarget("direct", f"{mock}/v1/chat/completions", JSON, bodies(5))
    result = await closed_loop(None, target, 3, 0.2)  # type: ignore[arg-type]
    assert result.errors == 0 and len(result.latencies_s) > 0 and result.elapsed_s > 0.2
    assert target.sent == len(result.latencies_s)
    bad = await closed_loop(None, LoadTarget("bad", f"{mock}/nope", {}, [b""], method="GET"), 1, 0.1)  # type: ignore[arg-type]
    assert bad.errors > 0 and bad.first_error is not None and bad.first_error.startswith("bad: HTTP 404")
    over = OverheadTarget("direct", f"{mock}/v1/chat/completions", JSON)
    latencies, errors, elapsed = await load_segment(None, over, request_body(False), 2, None, count=5)  # type: ignore[arg-type]
    assert len(latencies) == 10 and errors == 0 and elapsed > 0


async def _server(reply: bytes) -> tuple[asyncio.Server, int]:
    """A server that answers each connection's first request with `reply` and closes it (b"": does not answer)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if not reply:
                await reader.read()  # until the client gives up
            writer.write(reply)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_server_that_closes_mid_response_counts_errors_and_does_not_hang() -> None:
    server, port = await _server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a part")
    try:
        _, requests = wire.build("GET", f"http://127.0.0.1:{port}/", {}, [b""])
        result = await asyncio.wait_for(wire.closed_loop(("127.0.0.1", port), requests, 2, 1.0), 15)
    finally:
        server.close()
    assert result.errors > 2 and result.latencies_s == []  # each client reconnected after its first loss
    assert result.first_error is not None and "closed mid-response" in result.first_error


async def test_a_server_that_never_answers_times_out() -> None:
    server, port = await _server(b"")
    try:
        _, requests = wire.build("GET", f"http://127.0.0.1:{port}/", {}, [b""])
        started = time.perf_counter()
        result = await asyncio.wait_for(wire.closed_loop(("127.0.0.1", port), requests, 2, 0.1, timeout_s=0.4), 15)
    finally:
        server.close()
    assert result.errors == 2 and "no response in 0.4 s" in (result.first_error or "")
    assert time.perf_counter() - started < 10  # given up after 0.4 s, not hung


async def test_a_server_that_closes_after_each_complete_response_is_reconnected_to() -> None:
    server, port = await _server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
    try:
        _, requests = wire.build("GET", f"http://127.0.0.1:{port}/", {}, [b""])
        result = await asyncio.wait_for(wire.closed_loop(("127.0.0.1", port), requests, 2, None, count=5), 5)
    finally:
        server.close()
    assert result.statuses == {200: 10} and result.errors == 0


def test_connection_refused_is_an_error_not_a_hang() -> None:
    result = asyncio.run(wire.closed_loop(("127.0.0.1", free_port()), [b"GET / HTTP/1.1\r\n\r\n"], 3, 1))
    assert result.errors == 3 and result.latencies_s == [] and "cannot connect" in (result.first_error or "")


# -- the mock upstream itself, over a raw socket


class _Responses:
    """Every response read from a socket until the server closes it: (status, headers, body)."""

    def __init__(self, sock: socket.socket) -> None:
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.parser = httptools.HttpResponseParser(self)
        while data := sock.recv(65536):
            self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))


def _exchange(port: int, *parts: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(0.02)  # separate segments
        return _Responses(sock).done


def _post(body: bytes, *headers: str) -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{lines}content-length: {len(body)}\r\n\r\n".encode() + body
    )


def test_the_mock_answers_pipelined_requests_in_order(mock: str) -> None:
    port = int(mock.rsplit(":", 1)[1])
    body = bodies(1)[0]
    pipelined = (
        _post(body, "X-Request-Id: first")
        + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        + _post(request_body(True), "X-Request-Id: second")
        + b"GET /v1/models?x=1 HTTP/1.1\r\nhost: x\r\n\r\n"
        + _post(b"{not json")
        + _post(body, "X-Request-Id: last", "Connection: close")
        + _post(body, "X-Request-Id: never")
    )
    done = _exchange(port, pipelined)
    assert [status for status, _, _ in done] == [200, 200, 200, 200, 400, 200]
    assert json.loads(done[0][2])["id"] == "chatcmpl-first"
    assert done[1][2] == b""
    assert done[2][1][b"transfer-encoding"] == b"chunked" and done[2][2].endswith(b"data: [DONE]\n\n")
    events = [json.loads(line[6:]) for line in done[2][2].split(b"\n\n") if line.startswith(b"data: {")]
    assert {e["id"] for e in events} == {"chatcmpl-second"} and "usage" in events[-1] and len(events) == 9
    assert json.loads(done[3][2])["data"][0]["id"] == "mock-model"
    assert json.loads(done[4][2])["error"]["message"] == "invalid JSON"
    assert json.loads(done[5][2])["id"] == "chatcmpl-last" and done[5][1][b"connection"] == b"close"


def test_the_mock_reads_bodies_in_pieces_and_makes_up_ids(mock: str) -> None:
    port = int(mock.rsplit(":", 1)[1])
    request = _post(bodies(1)[0], "Connection: close")
    done = _exchange(port, request[:20], request[20:-10], request[-10:])
    answer = json.loads(done[0][2])
    assert done[0][0] == 200 and answer["id"].startswith("chatcmpl-") and len(answer["id"]) > len("chatcmpl-")
    assert answer["usage"]["completion_tokens"] == 9


def test_the_mock_answers_400_and_closes_on_what_does_not_parse(mock: str) -> None:
    port = int(mock.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw = b""
        while data := sock.recv(65536):
            raw += data
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert _exchange(port, b"GET /v1/chat/completions HTTP/1.1\r\nconnection: close\r\n\r\n")[0][0] == 404
