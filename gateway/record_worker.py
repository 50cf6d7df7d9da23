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
    (the batch it was building is then built in a thread)."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None

    async def build(self, raws: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            process = await self._started()
            assert process.stdin is not None and process.stdout is not None
            sent = pickle.dumps(raws, protocol=pickle.HIGHEST_PROTOCOL)
            process.stdin.write(len(sent).to_bytes(HEADER, "big") + sent)
            await process.stdin.drain()
            size = int.from_bytes(await process.stdout.readexactly(HEADER), "big")
            return pickle.loads(await process.stdout.readexactly(size))  # type: ignore[no-any-return]  # noqa: S301
        except (OSError, EOFError, asyncio.IncompleteReadError, pickle.PickleError) as exc:
            log.error("completion log: the record builder process failed (%r); starting another", exc)
            await self.stop()
            return await asyncio.to_thread(build_entries, raws)

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


if __name__ == "__main__":
    main()
