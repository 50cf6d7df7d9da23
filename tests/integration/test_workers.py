"""`LORAGATE_WORKERS=N`: N gateway processes serve one port together, in front of the session's vLLM.
Connections opened at once are spread over the workers; a worker that dies is replaced while the others serve
on; stopping the gateway stops every worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai
import psutil
import pytest

from gateway import keys
from loadtest.services import alive
from tests.conftest import MODEL, Gateway, RedisServer, create_key, start_side_gateway, stop_gateway, sync_redis_client
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

WORKERS = 2


@pytest.fixture(scope="module")
def served(gateway: Gateway, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    side = start_side_gateway(
        tmp_path_factory.mktemp("workers"), redis_server.url, gateway.engine_ports[:1], LORAGATE_WORKERS=str(WORKERS)
    )
    yield side
    stop_gateway(side)


def workers(gateway: Gateway) -> list[psutil.Process]:
    """The gateway's worker processes (uvicorn's spawned children), not its other helpers."""
    found = []
    for child in psutil.Process(gateway.process.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # it ended (or became a zombie) while being looked at
            continue
    return found


def until_workers(gateway: Gateway, without: set[int], timeout_s: float = 60) -> list[psutil.Process]:
    """Wait until the gateway has WORKERS workers again, none of them in `without`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [w for w in workers(gateway) if w.pid not in without and w.is_running()]
        if len(found) == WORKERS:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {WORKERS} fresh workers after {timeout_s} s:\n{gateway.log_tail()}")


async def answered(gateway: Gateway, key: str, count: int) -> list[str]:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120) as client:
        replies = await asyncio.gather(
            *(client.completions.create(model=MODEL, prompt="Hi", max_tokens=1) for _ in range(count))
        )
    return [reply.id for reply in replies]


async def held_connections(url: str, count: int, paused: psutil.Process) -> list[asyncio.StreamWriter]:
    """`count` keep-alive connections opened at once (as a client's pool under load opens them) while the worker
    `paused` is stopped (busy, say), then each answered once (so accepted by a worker) and held open."""
    parts = urlsplit(url)
    paused.suspend()
    try:
        opened = await asyncio.gather(*(asyncio.open_connection(parts.hostname, parts.port) for _ in range(count)))
        await asyncio.sleep(0.3)  # the other worker's turn to accept all it can
    finally:
        paused.resume()
    for _, writer in opened:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    for reader, _ in opened:
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    return [writer for _, writer in opened]


def test_connections_opened_at_once_are_spread_over_the_workers(served: Gateway) -> None:
    """Each worker accepts on a socket of its own (SO_REUSEPORT), so a burst of connections that arrives while
    one worker is busy is not all taken by another (as with one shared socket, whose first worker awake takes
    every connection waiting), leaving the busy one idle for as long as the connections live."""
    port = urlsplit(served.url).port
    count = 32

    async def spread() -> list[int]:
        found = until_workers(served, set())
        writers = await held_connections(served.url, count, paused=found[0])
        try:
            return [
                sum(1 for c in worker.net_connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")
                for worker in found
            ]
        finally:
            for writer in writers:
                writer.close()

    held = asyncio.run(spread())
    assert sum(held) == count and min(held) >= count // 8, f"connections per worker: {held}"


def test_n_workers_serve_and_a_dead_one_is_replaced(served: Gateway) -> None:
    key = create_key(served.env, "workers")
    first = until_workers(served, set())
    assert len(set(asyncio.run(answered(served, key, 12)))) == 12
    killed: set[int] = set()
    for worker in first:  # each original worker in turn: whichever is left (or its replacement) serves
        os.kill(worker.pid, signal.SIGKILL)
        killed.add(worker.pid)
        # until its sockets are closed (gone, or a zombie): a connection it had queued would be reset
        assert eventually(lambda pid=worker.pid: not alive(pid), timeout=30), f"worker {worker.pid} still running"
        assert len(asyncio.run(answered(served, key, 4))) == 4
        until_workers(served, killed)
    assert "Child process" in served.log_tail(20_000), "the supervisor noted the dead workers"
    for sig in (signal.SIGTTOU, signal.SIGTTIN):  # uvicorn's: one worker less (its socket left unanswered), one more
        os.kill(served.process.pid, sig)
    assert eventually(lambda: "Received SIGTTIN: the number of workers is fixed" in served.log_tail(20_000), timeout=10)
    assert "Received SIGTTOU: the number of workers is fixed" in served.log_tail(20_000)
    assert len(until_workers(served, killed)) == WORKERS and len(asyncio.run(answered(served, key, 8))) == 8


def test_stopping_the_gateway_stops_every_worker(
    gateway: Gateway, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    side = start_side_gateway(
        tmp_path_factory.mktemp("stop"),
        redis_server.url,
        gateway.engine_ports[:1],
        LORAGATE_WORKERS=str(WORKERS),
        LORAGATE_SHUTDOWN_TIMEOUT_S="2",
    )
    processes = [psutil.Process(side.process.pid), *psutil.Process(side.process.pid).children(recursive=True)]
    assert len(workers(side)) == WORKERS and len(processes) > WORKERS + 1, "workers and their record builders"
    key = create_key(side.env, "stopping")
    client = openai.OpenAI(base_url=side.base_url, api_key=key, max_retries=0, timeout=120)
    long = client.completions.create(
        model=MODEL, prompt="Count:", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(long))  # under way, for minutes on these cores: a stopping gateway waits LORAGATE_SHUTDOWN_TIMEOUT_S

    def unstreamed() -> None:  # one not streamed, waiting for its answer
        with contextlib.suppress(openai.APIError):
            client.completions.create(
                model=MODEL, prompt="Count:", max_tokens=4000, user="unstreamed", extra_body={"ignore_eos": True}
            )

    whole = threading.Thread(target=unstreamed)
    whole.start()
    time.sleep(2)
    stopping = time.monotonic()
    stop_gateway(side)
    _, running = psutil.wait_procs(processes, timeout=30)
    assert not running, f"left running after the gateway stopped: {[p.pid for p in running]}"
    assert side.process.returncode == 0 and time.monotonic() - stopping < 20, side.log_tail()
    long.close()
    whole.join(30)
    log = sync_redis_client(redis_server.url, decode_responses=True)
    records = [json.loads(fields["r"]) for _, fields in log.xrange(keys.completion_log("stopping"))]
    cancelled = [(False, "cancelled", 499), (True, "cancelled", 499)]
    assert sorted((r["stream"], r["outcome"], r["status"]) for r in records) == cancelled, "both recorded"
