"""The completion log: every request's context becomes one record in its tenant's Redis Stream,
written off the request path.

`record(context)` takes the context's raw record (a plain tuple of plain values, nothing parsed) and queues it. A
background task takes what is queued `interval_s` after the first record comes into an empty queue (at once when a
batch is full; it sleeps while nothing comes) and hands it to a process of its own (gateway.record_worker; several
with `workers` above 1, sharing a backlog), which builds the records (parsing whole answers, applying the tenant's
policy: redaction, or metadata only) and writes them (gateway.record_store: one Lua script per 100 records, in one
pipelined round trip, appends each to its tenant's stream, trimmed to the tenant's length, indexes its completion
id and adds it to the end user's set). All this gateway process does per record is take it and pickle it, and per
batch remember what came back (`RecentCompletions`): the building and the writing happen beside it. Records are
handed over young (20 ms): kept longer, they cost the gateway more per request than taking and pickling them (its
working set out of the CPU's caches: recording cost the gateway process 2-6 µs per request handed over within 2-20
ms, 12 at 50 ms, 22 at 200 ms, in one run). While a backlog builds, this process writes the batches that follow
itself, so that building and writing overlap; with `workers` 0, and whenever that process is gone, records are
built in a thread and written from here.

The script skips a record already indexed (a batch replayed twice is kept once), one of an end user
erased since it was made, and one of a tenant deleted since (each record carries when its tenant was
created, `tenant_created`: a tenant re-created with the same name is another). The stages overlap:
while one batch is built, the next is taken off the queue and the last one is written.

When Redis cannot be reached, records go to a local spool (bounded: past it the oldest are dropped
and counted in `loragate_records_dropped_total`), and every record after them too (the record process
writes nothing more until the spool has been replayed: `epoch`), so that when Redis returns the spool is
replayed first and the log keeps its order. A spool left by a process that died is adopted and
replayed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys, replay_marks
from gateway.clock import RedisClock
from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.recent_completions import RecentCompletions, owners
from gateway.record_builder import RawRow, raw_row, row_size
from gateway.record_store import UNREACHABLE, RecordStore
from gateway.record_worker import Built, RecordWorker, RecordWorkers, ThreadBuilder
from gateway.spool import Spool

log = logging.getLogger("loragate.recorder")

RETRY_S = 1.0
"""How often Redis is tried again while the log is degraded (and how often an idle recorder looks at its spool)."""
SHARE_AFTER = 4
"""Batches waiting before this process writes too (`_drain_queue`). At one (before), a record process that fell 100 ms
behind at 5,000 requests/s (it gives the CPU away every few records) left this process, the one the requests wait on,
writing 49-74% of the records itself; at four it wrote none. One gateway process switched between the two under load
(64 clients, 2 cores, three runs): 1.1%, 3.9% and 5.3% more requests/s at four, 1.0, 6.8 and 9.7 µs less of its CPU
per request."""


class Recorder:
    def __init__(
        self,
        redis: aioredis.Redis,
        spool: Spool,
        metrics: Metrics,
        *,
        batch: int = 500,
        interval_s: float = 0.02,
        max_queued: int = 100_000,
        max_queued_bytes: int = 256 << 20,
        enabled: bool = True,
        workers: int = 0,
        redis_url: str | None = None,
    ) -> None:
        self._redis = redis
        self._spool = spool
        self._metrics = metrics
        self._batch = batch
        self._interval_s = interval_s
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        """What the queued records' request and answer bodies hold: the queue is bounded by it too (each may be MBs)."""
        self._enabled = enabled
        self._queue: deque[tuple[int, RawRow, int]] = deque()
        """Sequence number, raw record, and its size (`row_size`)."""
        self._queued = asyncio.Event()
        """Set by the first record into an empty queue (and by `written`, `stop`): the loop sleeps until then, or
        RETRY_S (an idle gateway does not wake for each interval)."""
        self._go_now = asyncio.Event()
        """Set when what is queued goes at once: a batch is full, `written` waits, the recorder stops."""
        self._stopping = asyncio.Event()
        self._progress = asyncio.Condition()
        self._queued_seq = 0
        self._done_seq = 0
        self._flush_seq = 0
        """Records queued up to here are waited for (`written`): they go at once."""
        self._records = RecordStore(redis)
        self._token = secrets.token_hex(8)
        """This recorder's name in `keys.records_replaying`."""
        self._marked_until: int | None = None
        """Marked as replaying until the records queued up to here are written (`_replay`)."""
        self.clock = RedisClock(redis, "the records Redis")
        """Records are dated by the records Redis's clock (its scripts compare them with tombstones and ages)."""
        self._builder: RecordWorker | RecordWorkers | ThreadBuilder = ThreadBuilder()
        if workers:
            self._builder = RecordWorkers(workers, redis_url) if workers > 1 else RecordWorker(redis_url)
        self._epoch = 0
        """Batches the record process may write itself; a new epoch begins each time the spool is replayed."""
        self.recent = RecentCompletions()
        """Completion id -> tenant and its creation, for the last RECENT (at least) records this process handled."""
        self.degraded = False
        """True while Redis cannot be written: records go to the spool."""
        self._retry_at = 0.0

    def record(self, context: RequestContext) -> None:
        """Queue a finished request's raw record (never blocks, never fails)."""
        if not self._enabled:
            return
        raw = self._raw(context)  # a few plain values: the context's objects are not kept alive (nor scanned by the GC)
        if raw is None:
            self._metrics.records_dropped.labels("unbuildable").inc()
            return
        if not self._queue:
            self._queued.set()
        self._queued_seq += 1
        size = row_size(raw)
        self._queue.append((self._queued_seq, raw, size))
        self._queued_bytes += size
        while len(self._queue) > self._max_queued or self._queued_bytes > self._max_queued_bytes:
            self._take()
            self._metrics.records_dropped.labels("queue_full").inc()
        if len(self._queue) >= self._batch:
            self._go_now.set()

    def _take(self) -> tuple[int, RawRow, int]:
        """The oldest queued record, out of the queue."""
        taken = self._queue.popleft()
        self._queued_bytes -= taken[2]
        return taken

    async def written(self) -> None:
        """Wait until everything queued before this call is written (or spooled). With all of it written already,
        at once: the next records keep their batching window (feedback on unknown ids asks this every time)."""
        target = self._queued_seq
        if self._done_seq >= target:
            return
        self._flush_seq = max(self._flush_seq, target)
        self._go_now.set()
        self._queued.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._done_seq >= target or self._stopping.is_set())

    async def start(self) -> None:
        await self.clock.try_sync()  # measured again by the upkeep loop
        await self._builder.start()

    async def run(self) -> None:
        """Write what is queued until `stop`: `interval_s` after a record comes into an empty queue (at once when
        a batch is full or `written` waits), and every RETRY_S while nothing comes (the spool's replay)."""
        while not self._stopping.is_set():
            if not self._queue and not self._builder.pending:  # (batches pending: a cycle that failed midway)
                await _until(self._queued, RETRY_S)
            if not self._go_now.is_set():
                await _until(self._go_now, self._interval_s)
            self._queued.clear()
            self._go_now.clear()
            await self._cycle()
        await self._cycle()

    async def stop(self) -> None:
        """Ask `run` to write what is left and return (it is not cancelled: no batch is cut in half)."""
        self._stopping.set()
        self._go_now.set()
        self._queued.set()

    async def _cycle(self) -> None:
        try:
            if (self.degraded or self._spool.pending()) and time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + RETRY_S
                await self._replay()
            await self._drain_queue()
            if self._marked_until is not None and self._done_seq >= self._marked_until:
                self._marked_until = None  # what was queued while it replayed is written too
                with contextlib.suppress(RedisError, OSError):  # it lapses by itself
                    await replay_marks.unmark(self._redis, self._token)
        except Exception:
            log.exception("completion log: a write cycle failed; the next one tries again")
        async with self._progress:
            self._progress.notify_all()

    async def _drain_queue(self) -> None:
        """Three stages overlap: while the builder builds (and writes) batch n, the loop takes batch n+1 off the
        queue and hands it over, and what came back of batch n-1 is written or spooled here.

        A cycle hands over what was queued when it began, and after that only whole batches (or what `written`
        waits for): the records that arrive meanwhile wait for the next cycle, so that under load batches stay
        large. Handing over whatever came in while the last batch was built made batches of a few records, and
        every batch costs the same calls, socket writes and script run whatever its size.

        The record process writes what it builds while it keeps up. Once more than SHARE_AFTER batches are waiting
        (records come faster than one process builds and writes them), this process writes the batches that follow,
        so that building and writing run side by side, until the queue is empty (a batch it writes is written
        after those before it: they come back in order). So does it, for the rest of the cycle, once a batch comes
        back for it to write (its record process died, say): the batches after it are then written after it."""
        writing: asyncio.Task[None] | None = None
        sharing = False
        began = self._queued_seq
        while True:
            if self._queue and self._builder.pending < self._builder.depth and self._due(began):
                sharing = sharing or len(self._queue) > self._batch * SHARE_AFTER
                batch = [self._take() for _ in range(min(len(self._queue), self._batch))]
                epoch = None if sharing or self.degraded or self._spool.pending() else self._epoch
                await self._builder.send([raw for _, raw, _ in batch], batch[-1][0], epoch)
                if self._queue and self._builder.pending < self._builder.depth and self._due(began):
                    continue
            if not self._builder.pending:
                break
            last_seq, built = await self._builder.receive()
            if writing is not None:
                await writing
            writing = self._received(built, last_seq)
            sharing = sharing or writing is not None  # what this process writes goes before what follows it
        if writing is not None:
            await writing

    def _due(self, began: int) -> bool:
        """Whether what is queued goes now, rather than at the next cycle: a whole batch, what was queued before
        the cycle began (`began`) or what `written` waits for, everything at the end."""
        oldest = self._queue[0][0]
        return len(self._queue) >= self._batch or oldest <= max(began, self._flush_seq) or self._stopping.is_set()

    def _received(self, built: Built, last_seq: int) -> asyncio.Task[None] | None:
        """Count and remember what the builder did with a batch; a task writing (or spooling) what it did not write."""
        if built.unbuildable:
            self._metrics.records_dropped.labels("unbuildable").inc(built.unbuildable)
        if built.refused:
            self._metrics.records_dropped.labels("refused").inc(built.refused)
        if built.unreachable and not self.degraded:
            log.warning("completion log: Redis unreachable (%s); spooling records until it returns", built.unreachable)
            self.degraded = True
        self.recent.add(built.written)
        self._count(built.stored, built.skipped)
        if not built.entries:
            self._done_seq = max(self._done_seq, last_seq)
            return None
        self.recent.add(owners(built.entries))
        return asyncio.create_task(self._write_or_spool(built.entries, last_seq))

    def _raw(self, context: RequestContext) -> RawRow | None:
        try:
            return raw_row(context, self.clock.offset_s)
        except Exception:
            log.exception("completion log: request %s could not be recorded", context.request_id)
            return None

    async def _write_or_spool(self, entries: list[dict[str, Any]], last_seq: int) -> None:
        try:
            if not self.degraded:
                try:
                    await self._write(entries)
                    return
                except UNREACHABLE as exc:
                    log.warning("completion log: Redis unreachable (%r); spooling records until it returns", exc)
                    self.degraded = True
                except Exception:  # noqa: BLE001 - unforeseen (a script Redis would not load): kept, in the spool
                    log.exception("completion log: %d records could not be written; spooled", len(entries))
            try:
                await self._spool.append(entries)
                self._metrics.records_spooled.inc(len(entries))
            except OSError:
                log.exception("completion log: the spool cannot be written either; %d records lost", len(entries))
                self._metrics.records_dropped.labels("spool_error").inc(len(entries))
        finally:
            self._done_seq = max(self._done_seq, last_seq)

    async def _write(self, entries: list[dict[str, Any]]) -> None:
        """Write entries here (built in a thread, or replayed from the spool); what Redis refuses is dropped."""
        done = await self._records.write(entries)
        self._count(done.written, done.skipped(len(entries)))
        if done.refused:
            self._metrics.records_dropped.labels("refused").inc(len(done.refused))

    def _count(self, written: int, skipped: int) -> None:
        self._metrics.records_written.inc(written)
        if skipped:
            self._metrics.records_skipped.inc(skipped)

    async def _replay(self) -> None:
        """Write the spool to Redis, oldest first; stay degraded if Redis is still away. While it replays, and
        until the records queued meanwhile are written too (`_cycle`), the process is marked in Redis
        (gateway.replay_marks): feedback on a completion no index names yet is then not a 404 at another process
        (it may be one of these records), but a 503, or spooled."""
        replayed, renew_at = 0, 0.0

        async def mark() -> None:
            nonlocal renew_at
            await replay_marks.mark(self._redis, self._token)
            renew_at = time.monotonic() + replay_marks.MARK_S / 3

        async def write(entries: list[dict[str, Any]]) -> None:
            if time.monotonic() >= renew_at:
                await mark()
            await self._write(entries)

        try:
            await mark()
            while self._spool.pending():  # what was spooled during a pass, too, before the log goes on
                replayed += await self._spool.drain(write)
            await mark()
            self._marked_until = self._queued_seq
        except (RedisError, OSError):
            return  # the mark lapses by itself: the records still wait
        except Exception:  # a record that fails every pass: no mark kept alive for good, for every process
            with contextlib.suppress(RedisError, OSError):
                await replay_marks.unmark(self._redis, self._token)
            raise
        self.degraded = False
        self._epoch += 1
        if replayed:
            log.info("completion log: %d spooled records replayed", replayed)

    async def close(self) -> None:
        await self._records.close()
        await self._builder.stop()

    async def trim(self, policies: dict[str, Any]) -> None:
        """Drop records older than each tenant's age limit (length is trimmed as records are added). Exactly, not
        by whole stream nodes (`~`), which keep a record as long as a younger one shares its node: past its age
        its completion index is gone, and with it the way erasure finds it by id."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, policy in policies.items():
                oldest_ms = int((self.clock.now() - policy.max_age_s) * 1000)
                pipe.xtrim(keys.completion_log(tenant), minid=str(oldest_ms), approximate=False)
            await pipe.execute()


async def _until(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until `event` is set, `timeout_s` at most."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
