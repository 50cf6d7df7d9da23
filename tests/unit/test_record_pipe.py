"""The sockets between the gateway and its record process: every answer arrives whole, and one that does not
unpickle costs a restart, never a batch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from gateway.answer import Answer
from gateway.context import RequestContext
from gateway.record_builder import RawRow, raw_row
from gateway.record_worker import BUFFER_BYTES, HEADER, RecordWorker
from gateway.routing import Route
from gateway.tenants import Tenant

BATCH = 400


def raws(batch: int) -> list[RawRow]:
    """A batch of chat records whose built entries (about 7 kB each) make an answer larger than the socket's
    buffers (BUFFER_BYTES each way)."""
    out = []
    for n in range(BATCH):
        text = f"Order {batch}-{n} has not arrived; the tracking page shows nothing at all. " * 48
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "user": f"u{n % 7}"}
        ctx = RequestContext(f"r{batch}-{n}", "chat", Tenant(name="t"), "k1", payload=body, validated=True)
        ctx.sent = json.dumps(body).encode()
        ctx.route = Route(requested="m", upstream_model="m", served_model="m")
        answer = {"id": f"chatcmpl-{batch}-{n}", "choices": [{"index": 0, "message": {"content": text}}]}
        ctx.answer = Answer(body=json.dumps(answer).encode())
        ctx.finish(200)
        out.append(raw_row(ctx))
    return out


async def test_answers_arrive_whole_when_the_record_process_is_stopped_mid_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under PYTHONUNBUFFERED (the gateway's image sets it) `sys.stdout.buffer` is a raw file: a write into a
    full pipe that a stop signal interrupts (SIGSTOP, a debugger, a profiler) takes only part of a message, and
    the rest was lost, which cost that batch and every answer after it."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    worker = RecordWorker()  # build only: every answer carries its built entries
    await worker.start()
    assert worker._process is not None
    process = worker._process.process
    for batch in range(3):
        await worker.send(raws(batch), batch)
    for _ in range(60):  # nobody reads yet: the process blocks writing its first answer into a full pipe
        await asyncio.sleep(0.05)
        os.kill(process.pid, signal.SIGSTOP)
        os.kill(process.pid, signal.SIGCONT)
    got = [await worker.receive() for _ in range(3)]
    assert [(tag, len(built.entries)) for tag, built in got] == [(batch, BATCH) for batch in range(3)]
    assert [built.entries[-1]["id"] for _, built in got] == [f"chatcmpl-{batch}-{BATCH - 1}" for batch in range(3)]
    assert worker._process is not None and worker._process.process is process, "the same process answered all"
    await worker.stop()


async def test_ctrl_c_leaves_the_record_process_to_the_gateway() -> None:
    """Ctrl-C on `make run` sends SIGINT to the terminal's whole process group, the record processes too: they
    went on to build what their gateway hands over while it stops (and printed no traceback), and end when it
    closes their batches' socket."""
    worker = RecordWorker()
    await worker.start()
    assert worker._process is not None
    process = worker._process.process
    await worker.send(raws(0), "before")  # answered: the process runs (and SIGINT meets its own handling)
    assert (await worker.receive())[0] == "before"
    os.kill(process.pid, signal.SIGINT)
    await asyncio.sleep(0.3)
    assert process.returncode is None, "ended by SIGINT"
    await worker.send(raws(0), "after ctrl-c")
    tag, built = await worker.receive()
    assert tag == "after ctrl-c" and len(built.entries) == BATCH
    assert worker._process is not None and worker._process.process is process, "built by the same process"
    await worker.stop()
    assert process.returncode == 0


async def test_an_answer_that_does_not_unpickle_costs_a_restart_not_its_batch() -> None:
    worker = RecordWorker()
    await worker.start()
    garbled = worker._process
    assert garbled is not None
    await worker.send(raws(0)[:5], "first")
    out_of_step = asyncio.StreamReader()  # what the socket holds when a message lost its tail: the next one's bytes
    garbage = b"\x80\x05\x8c\x02\xff\xfe\x94."  # a string of 2 bytes that are not UTF-8: UnicodeDecodeError
    out_of_step.feed_data(len(garbage).to_bytes(HEADER, "big") + garbage)
    garbled.answers = out_of_step
    tag, built = await worker.receive()
    assert (tag, [e["id"] for e in built.entries]) == ("first", [f"chatcmpl-0-{n}" for n in range(5)])
    await worker.send(raws(1)[:1], "next")
    assert (await worker.receive())[1].entries[0]["id"] == "chatcmpl-1-0"
    assert worker._process is not None and worker._process is not garbled, "a new process builds what comes after"
    assert garbled.process.returncode is not None, "the one out of step was stopped"
    await worker.stop()


async def test_batches_and_answers_cross_in_large_buffers() -> None:
    """A batch crossed 64 KiB pipes (Linux's default) in ten writes, each waking the other side: the process
    waited on the gateway rather than building (16,000 records/s with redaction on; 21,000 through these sockets)."""
    worker = RecordWorker()
    await worker.start()
    await worker.send(raws(0), 0)
    tag, built = await worker.receive()
    assert (tag, len(built.entries)) == (0, BATCH)
    assert worker._process is not None
    ends = [worker._process.batches, worker._process.answers_writer]
    allowed = min(BUFFER_BYTES, int(Path("/proc/sys/net/core/wmem_max").read_text()))
    for end in ends:
        sock = end.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= allowed
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= allowed
    await worker.stop()


async def test_a_record_process_that_died_idle_has_its_sockets_closed_when_another_starts() -> None:
    worker = RecordWorker()
    await worker.start()
    dead = worker._process
    assert dead is not None
    dead.process.kill()
    await dead.process.wait()
    await worker.send(raws(0)[:2], "next")  # another process starts for it
    assert (await worker.receive())[1].entries[-1]["id"] == "chatcmpl-0-1"
    assert worker._process is not None and worker._process is not dead
    assert dead.batches.is_closing() and dead.answers_writer.is_closing(), "the dead one's sockets are closed"
    await worker.stop()


async def test_a_record_process_that_ends_as_the_stop_stops_waiting_is_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a loaded machine the process may end just as the wait for it runs out: killing it then finds no process
    (ProcessLookupError), which stopping the gateway must not raise (a CI run's teardown failed on it)."""

    class EndedLate:
        """A process whose end is seen only after the wait ran out, and that is gone when it is killed."""

        returncode, waits = 0, 0

        async def wait(self) -> int:
            self.waits += 1
            if self.waits == 1:  # the first wait outlasts its limit, however long
                await asyncio.Event().wait()
            return 0

        def kill(self) -> None:
            raise ProcessLookupError

    worker = RecordWorker()
    await worker.start()
    process = worker._process
    assert process is not None
    real, process.process = process.process, EndedLate()  # type: ignore[assignment]
    monkeypatch.setattr("gateway.record_worker.STOP_WAIT_S", 0.05)
    await process.stop()  # no ProcessLookupError
    assert process.answers_writer.is_closing()
    real.kill()
    await real.wait()
