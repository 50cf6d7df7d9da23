"""The process that builds completion records for one gateway process (`python -m gateway.record_worker`).

Record building is CPU work (parsing answers, redaction, JSON). In a thread of the gateway it would
share the GIL with the event loop, and every socket call of the loop would then wait for the thread's
switch interval (the GIL convoy): measured here, that cost the gateway more than the building itself.
So the gateway sends each batch to this process over a pipe, as a length-prefixed pickle, and reads
the built entries back the same way; no thread of the gateway does Python work meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import sys
from collections import deque
from typing import Any

from gateway.record_builder import build_entries

log = logging.getLogger("loragate.recorder")
HEADER = 8


def main() -> None:
    """Answer batches until the gateway closes the pipe."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while header := source.read(HEADER):
        raws = pickle.loads(source.read(int.from_bytes(header, "big")))  # noqa: S301 (our own gateway, a pipe)
        built = pickle.dumps(build_entries(raws), protocol=pickle.HIGHEST_PROTOCOL)
        sink.write(len(built).to_bytes(HEADER, "big") + built)
        sink.flush()


class RecordWorker:
    """The gateway's end of the pipe: one worker process, started on first use, started again if it dies
    (the batches it was building are then built in a thread). Batches are pipelined: `send` hands one
    over and returns at once, `receive` gives back the oldest one's entries, so the gateway can prepare
    the next batch while this one is built."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._in_flight: deque[tuple[asyncio.subprocess.Process | None, list[dict[str, Any]], Any]] = deque()

    @property
    def pending(self) -> int:
        """Batches sent and not yet received."""
        return len(self._in_flight)

    async def send(self, raws: list[dict[str, Any]], tag: Any) -> None:
        """Hand a batch over; `receive` returns its entries with `tag`, in the order batches were sent. The
        bytes are not drained here: the worker may be writing the previous batch's entries meanwhile."""
        try:
            process = await self._started()
            assert process.stdin is not None
            sent = pickle.dumps(raws, protocol=pickle.HIGHEST_PROTOCOL)
            process.stdin.write(len(sent).to_bytes(HEADER, "big") + sent)
            self._in_flight.append((process, raws, tag))
        except (OSError, pickle.PickleError) as exc:
            log.error("completion log: the record builder process failed (%r); starting another", exc)
            await self.stop()
            self._in_flight.append((None, raws, tag))

    async def receive(self) -> tuple[Any, list[dict[str, Any]]]:
        """The oldest batch sent: its tag and its entries (built in a thread if the process died)."""
        process, raws, tag = self._in_flight.popleft()
        if process is not None and process is self._process and process.stdout is not None:
            try:
                size = int.from_bytes(await process.stdout.readexactly(HEADER), "big")
                return tag, pickle.loads(await process.stdout.readexactly(size))  # noqa: S301 (our own worker)
            except (OSError, EOFError, asyncio.IncompleteReadError, pickle.PickleError) as exc:
                log.error("completion log: the record builder process failed (%r); starting another", exc)
                await self.stop()
        return tag, await asyncio.to_thread(build_entries, raws)

    async def start(self) -> None:
        """Start the process now (at the gateway's start), not on the first batch, mid-traffic."""
        await self._started()

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.record_worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
        return self._process

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


class ThreadBuilder:
    """The same pipeline with each batch built in a thread (`workers` 0: tests, tools)."""

    def __init__(self) -> None:
        self._in_flight: deque[tuple[asyncio.Task[list[dict[str, Any]]], Any]] = deque()

    @property
    def pending(self) -> int:
        return len(self._in_flight)

    async def send(self, raws: list[dict[str, Any]], tag: Any) -> None:
        self._in_flight.append((asyncio.create_task(asyncio.to_thread(build_entries, raws)), tag))

    async def receive(self) -> tuple[Any, list[dict[str, Any]]]:
        task, tag = self._in_flight.popleft()
        return tag, await task

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


if __name__ == "__main__":
    main()
