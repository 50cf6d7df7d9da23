"""The process that builds and writes completion records for one gateway process (`python -m
gateway.record_worker`).

Record building is CPU work (parsing answers, redaction, JSON), and so is writing (packing a Redis call of
1,300 arguments per 100 records, reading its replies). In a thread of the gateway it would share the GIL
with the event loop, and every socket call of the loop would then wait for the thread's switch interval
(the GIL convoy): measured here, that cost the gateway more than the work itself. So the gateway sends
each batch of raw records to this process over a Unix socket (its stdin; answers come back on another, its
stdout), as a length-prefixed pickle; the process builds the records and writes them to the records Redis
itself, and answers with what it did (`Built`): the records written (their completion ids, for the gateway's
memory of who answered what) or, when it was told not to write or could not reach Redis, the built records,
for the gateway to spool in order.

The process writes a batch only while the gateway says the log is healthy (each batch carries the
gateway's `epoch`, None while it spools). Once a write finds Redis unreachable, every later batch of
that epoch comes back unwritten too, so the spool keeps the log's order; the gateway replays the spool
and starts a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import redis.asyncio as aioredis

from gateway import heap
from gateway.recent_completions import PackedOwners, owners
from gateway.record_builder import RawRecord, RawRow, build_entries
from gateway.record_store import UNREACHABLE, RecordStore

log = logging.getLogger("loragate.recorder")
HEADER = 8
BUFFER_BYTES = 1 << 20
"""The socket buffers between the gateway and its record process. A batch of 500 raw records is about 630 KB;
through 64 KiB pipes (Linux's default) it crossed in ten writes, each waking the other side, and the process waited
on the gateway rather than building. Measured with `loadtest.records` on 2 cores, redaction on: 16,000 records/s
through pipes, 21,000 through these sockets, whether the gateway runs asyncio's loop or uvloop (1 MiB pipes helped
asyncio's loop only)."""
PAUSE_EVERY = 8
"""The record process gives up the CPU (`sched_yield`) after building this many records (about 0.3 ms with redaction).
Built in one go, a batch held a core for several ms: Linux (EEVDF, 250 Hz tick) let the process run on while the
processes it shares the core with (on 2 cores, the clients' and the upstream's side of the gateway's traffic) waited,
1-5 ms at a time (`perf sched`), and the gateway ran out of requests to serve; neither `nice` 10 nor the idle
scheduling class changed that. Measured with 16 clients on 2 cores, as in loadtest.records' second part: the gateway
94% busy with recording on, 98% with pauses every 5-25 records; its requests/s 7.5-9.2% lower with recording than
without before, 2.6% / 3.3% / 4.7% with pauses every 5 / 10 / 25 records (one run). Each pause that gives the CPU
away costs the record process a little: every 5 records, 3% of its records/s into an fsyncing Redis; every 20, none
measured (four runs each)."""
STOP_WAIT_S = 5.0
"""How long a stopping gateway waits for its record process to write what it holds and end, before killing it."""


@dataclass
class Built:
    """What became of one batch of raw records."""

    entries: list[dict[str, Any]]
    """Built and not written: the gateway writes or spools them."""
    unbuildable: int = 0
    written: PackedOwners = field(default_factory=PackedOwners)
    """Written by the record process (sent to the script: it skips what was already written or erased): completion
    id -> owner, the owners shared (one tuple per tenant: marshalled once)."""
    stored: int = 0
    """Of those, how many the script appended to a log; `skipped`, how many it skipped (record_store.Written)."""
    skipped: int = 0
    refused: int = 0
    """Refused by Redis (a script error), dropped."""
    unreachable: str | None = None
    """Why a write found Redis unreachable (the entries are then all here, unwritten)."""


def build(rows: list[RawRow], pause_every: int | None = None) -> Built:
    """Build a batch; every `pause_every` records, give the CPU to whatever else waits for it (`sched_yield`)."""
    step = pause_every or max(len(rows), 1)
    entries: list[dict[str, Any]] = []
    for start in range(0, len(rows), step):
        entries += build_entries([RawRecord._make(row) for row in rows[start : start + step]])
        if pause_every:
            os.sched_yield()
    return Built(entries, unbuildable=len(rows) - len(entries))


class _Writer:
    """This process's side: writes a built batch to Redis unless told not to, or past a failed write."""

    def __init__(self, url: str | None) -> None:
        self._redis: aioredis.Redis | None = None
        self._store: RecordStore | None = None
        if url:
            self._redis = aioredis.Redis.from_url(
                url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
            )
            self._store = RecordStore(self._redis)
        self._failed_epoch = -1

    async def write(self, built: Built, epoch: int | None) -> Built:
        if self._store is None or epoch is None or epoch <= self._failed_epoch or not built.entries:
            return built
        try:
            done = await self._store.write(built.entries)
        except UNREACHABLE as exc:
            self._failed_epoch = epoch
            built.unreachable = repr(exc)
            return built
        built.written = PackedOwners.pack(owners(e for e in built.entries if e["id"] not in done.refused))
        built.stored, built.skipped, built.refused = done.written, done.skipped(len(built.entries)), len(done.refused)
        built.entries = []
        return built

    async def close(self) -> None:
        if self._store is not None and self._redis is not None:
            await self._store.close()
            await self._redis.aclose()


async def _message(reader: asyncio.StreamReader) -> Any:
    """The next message from the gateway, or None when it closed its socket."""
    try:
        size = int.from_bytes(await reader.readexactly(HEADER), "big")
        return pickle.loads(await reader.readexactly(size))  # noqa: S301 (our own gateway, a socket)
    except asyncio.IncompleteReadError:
        return None


def _answer(sink: BinaryIO, built: Built) -> None:
    data = pickle.dumps(built, protocol=pickle.HIGHEST_PROTOCOL)
    sink.write(len(data).to_bytes(HEADER, "big") + data)
    sink.flush()


async def serve(source: BinaryIO, sink: BinaryIO) -> None:
    """Answer batches until the gateway closes its socket. The first message is the records Redis's URL (None:
    build only). A batch is built while the last one is being written, and answered once written."""
    reader = asyncio.StreamReader(limit=2**31)
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), source)
    writer = _Writer(await _message(reader))

    async def write(built: Built, epoch: int | None) -> None:
        _answer(sink, await writer.write(built, epoch))

    writing: asyncio.Task[None] | None = None
    while (message := await _message(reader)) is not None:
        rows, epoch = message
        built = build(rows, PAUSE_EVERY)  # meanwhile Redis runs the last batch's script
        if writing is not None:
            await writing
        writing = asyncio.create_task(write(built, epoch))
        await asyncio.sleep(0)  # let it send its calls before the next batch is built
    if writing is not None:
        await writing
    await writer.close()


def main() -> None:
    """Answers go out on this process's stdout, taken over: through a buffered writer of its own, whose `write`
    sends all of a message (under PYTHONUNBUFFERED, which the gateway's image sets, `sys.stdout.buffer` is a raw
    file, and its `write` into a full socket that a stop signal interrupts takes only part of one), and with fd 1
    then pointing at stderr, so that nothing a library prints can land in the middle of a message. Ctrl-C (SIGINT
    to the terminal's whole process group) is left to the gateway, which ends this process once it has handed
    over its last records (it closes the batches' socket): the records queued at that moment are still written."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    heap.steady()
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    asyncio.run(serve(sys.stdin.buffer, answers))


@dataclass
class _Process:
    """A record process and the gateway's ends of its two sockets."""

    process: asyncio.subprocess.Process
    batches: asyncio.StreamWriter
    answers: asyncio.StreamReader
    answers_writer: asyncio.StreamWriter
    """Unused but to close the answers' socket."""

    @classmethod
    async def start(cls) -> _Process:
        """Start one, its stdin and stdout a socket each (`_sockets`)."""
        (batches, its_batches), (answers, its_answers) = _sockets(), _sockets()
        process = None
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.record_worker", stdin=its_batches.fileno(), stdout=its_answers.fileno()
            )
            its_batches.close()  # the process has its own copies
            its_answers.close()
            _, writer = await asyncio.open_unix_connection(sock=batches)
            reader, answers_writer = await asyncio.open_unix_connection(sock=answers, limit=BUFFER_BYTES)
        except BaseException:
            for end in (batches, its_batches, answers, its_answers):
                end.close()
            if process is not None and process.returncode is None:
                process.kill()
            raise
        return cls(process, writer, reader, answers_writer)

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.batches.writelines((len(data).to_bytes(HEADER, "big"), data))

    async def answer(self) -> Built:
        size = int.from_bytes(await self.answers.readexactly(HEADER), "big")
        built: Built = pickle.loads(await self.answers.readexactly(size))  # noqa: S301 (our own process)
        return built

    async def stop(self) -> None:
        """Close its batches' socket (the process ends when it reads to the end) and wait for it, STOP_WAIT_S at most;
        its sockets are closed however this ends (cancelled too: the process is then killed)."""
        self.batches.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_WAIT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it ended as the wait ran out (a loaded machine)
                self.process.kill()
            await self.process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                self.process.kill()
            raise
        finally:
            self.answers_writer.close()


def _sockets() -> tuple[socket.socket, socket.socket]:
    """A Unix socket pair with BUFFER_BYTES of buffer each way (as far as `net.core.wmem_max` allows). One pair
    per direction: the record process reads its stdin without blocking and writes its stdout blocking (whole
    answers, see `main`); were both one end of one pair, they would be one open file, and making its stdin
    non-blocking would make its answers' writes non-blocking too."""
    pair = socket.socketpair()
    for end in pair:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
    return pair


class RecordWorker:
    """The gateway's end: one record process, started on first use, started again if it dies
    (the batches it was handling are then built in a thread, and written by the gateway). Batches are
    pipelined: `send` hands one over and returns at once, `receive` gives back the oldest one's `Built`, so
    the gateway can prepare the next batch while this one is built and written."""

    depth = 2
    """Batches in flight at most: one built while the next is handed over."""

    def __init__(self, redis_url: str | None = None) -> None:
        self._redis_url = redis_url
        self._process: _Process | None = None
        self._in_flight: deque[tuple[_Process | None, list[RawRow], Any, int | None]] = deque()

    @property
    def pending(self) -> int:
        """Batches sent and not yet received."""
        return len(self._in_flight)

    async def send(self, raws: list[RawRow], tag: Any, epoch: int | None = None) -> None:
        """Hand a batch over, to be written too when `epoch` is not None; `receive` returns what became of it
        with `tag`, in the order batches were sent. The bytes are not drained here: the process may be
        answering the previous batch meanwhile.

        A batch is not written here while one sent before it will come back unwritten, for the gateway to write:
        one sent without an epoch, or to a process that has died since (a new one would otherwise write this
        batch before the gateway writes those, out of order)."""
        try:
            process = await self._started()
            if any(sent_to is not process or its_epoch is None for sent_to, _, _, its_epoch in self._in_flight):
                epoch = None
            process.send((raws, epoch))
            self._in_flight.append((process, raws, tag, epoch))
        except (OSError, pickle.PickleError) as exc:
            log.error("completion log: the record process failed (%r); starting another", exc)
            await self.stop()
            self._in_flight.append((None, raws, tag, None))

    async def receive(self) -> tuple[Any, Built]:
        """The oldest batch sent: its tag and what became of it (built in a thread if the process died)."""
        process, raws, tag, _ = self._in_flight.popleft()
        if process is not None and process is self._process:
            try:
                return tag, await process.answer()
            except Exception as exc:  # noqa: BLE001 (pickle raises many kinds on bytes out of step: trust none after)
                log.error("completion log: the record process failed (%r); starting another", exc)
                await self.stop()
        return tag, await asyncio.to_thread(build, raws)

    async def start(self) -> None:
        """Start the process now (at the gateway's start), not on the first batch, mid-traffic."""
        await self._started()

    async def _started(self) -> _Process:
        if self._process is not None and self._process.process.returncode is not None:
            await self.stop()  # it died: its sockets are closed before another starts
        if self._process is None:
            self._process = await _Process.start()
            self._process.send(self._redis_url)  # over the socket: a password is not in its command line
        return self._process

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await process.stop()


class RecordWorkers:
    """Several record processes for one gateway process (`LORAGATE_RECORD_WORKERS` above 1), for a log that one
    process cannot keep up with: each batch goes to the process with the fewest in flight, and `receive` gives them
    back in the order they were sent. A process writes a batch itself only while no other holds one (two writing at
    once could put a later batch in the log first); past that, during a backlog (when the recorder leaves every
    batch to the gateway to write anyway), they build side by side and the gateway writes what comes back, in order."""

    def __init__(self, count: int, redis_url: str | None = None) -> None:
        self._workers = [RecordWorker(redis_url) for _ in range(count)]
        self._order: deque[RecordWorker] = deque()

    @property
    def depth(self) -> int:
        return RecordWorker.depth * len(self._workers)

    @property
    def pending(self) -> int:
        return len(self._order)

    async def send(self, raws: list[RawRow], tag: Any, epoch: int | None = None) -> None:
        worker = min(self._workers, key=lambda w: w.pending)
        if any(other.pending for other in self._workers if other is not worker):
            epoch = None
        await worker.send(raws, tag, epoch)
        self._order.append(worker)

    async def receive(self) -> tuple[Any, Built]:
        return await self._order.popleft().receive()

    async def start(self) -> None:
        await asyncio.gather(*(worker.start() for worker in self._workers))

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in self._workers))


class ThreadBuilder:
    """The same pipeline with each batch built in a thread and written by the gateway (`workers` 0: tests,
    tools)."""

    depth = 2

    def __init__(self) -> None:
        self._in_flight: deque[tuple[asyncio.Task[Built], Any]] = deque()

    @property
    def pending(self) -> int:
        return len(self._in_flight)

    async def send(self, raws: list[RawRow], tag: Any, epoch: int | None = None) -> None:
        self._in_flight.append((asyncio.create_task(asyncio.to_thread(build, raws)), tag))

    async def receive(self) -> tuple[Any, Built]:
        task, tag = self._in_flight.popleft()
        return tag, await task

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


if __name__ == "__main__":
    from gateway import record_worker  # this module by its name: what it pickles (Built) the gateway can load

    record_worker.main()
