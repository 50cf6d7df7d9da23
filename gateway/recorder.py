"""The completion log: every request's context becomes one record in its tenant's Redis Stream,
written off the request path.

`record(context)` only queues the context. A background task takes what is queued every
`interval_s` (sooner when a batch is full), turns it into records in a worker process of its own
(gateway.record_worker: parsing whole answers, applying the tenant's policy: redaction, or metadata
only; a thread when `workers` is 0), and writes them in one pipelined round trip: one Lua script per
100 records appends each to its tenant's stream (trimmed to the tenant's length), indexes its
completion id (owner and entry, expiring with the tenant's age limit) and adds it to the end user's
set (for erasure). The script skips a record already indexed (a batch replayed twice is kept once),
one of an end user erased since it was made, and one of a tenant deleted since (each record carries
when its tenant was created, `tenant_created`: a tenant re-created with the same name is another).
The stages overlap: while one batch is built, the next is taken off the queue and the last one is written.

When Redis cannot be reached, records go to a local spool (bounded: past it the oldest are dropped
and counted in `loragate_records_dropped_total`), and every record after them too, so that when
Redis returns the spool is replayed first and the log keeps its order. A spool left by a process
that died is adopted and replayed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import keys
from gateway.context import RequestContext
from gateway.lane import Call, ScriptLane
from gateway.metrics import Metrics
from gateway.record_builder import raw_record
from gateway.record_worker import RecordWorker, ThreadBuilder
from gateway.spool import Spool

log = logging.getLogger("loragate.recorder")

# Per record, KEYS: log stream, completion index, end user's set, end user's erasure, experiment arm's
# counters, experiment arm's users ('' for what does not apply), the tenant's deletion. ARGV: record JSON,
# max length, ttl (s), tenant, completion id, created, ' EXPERIMENT ARM' (or ''), end user, error (1/0),
# prompt tokens, completion tokens, latency bucket, when its tenant was created. A record of a tenant created
# at or before its deletion is skipped (each tenant's deletion is read once per call). An arm's counters move
# only when its record is written (a replay counts once). What many records of a call share is summed in the
# script and written once at its end: each end user's set gets one SADD and one EXPIRE (the longest ttl), each
# arm one HINCRBY per counter and one PFADD. A record that fails stops the loop, but what the records before it
# share is still written before the error is returned: the recorder then retries record by record, and the index
# skips those.
# Returns the records written.
_RECORD = """
local written, sets, arms, deleted = 0, {}, {}, {}
local function bump(counts, field, by)
  if by ~= 0 then counts[field] = (counts[field] or 0) + by end
end
local function deletion(key)
  local at = deleted[key]
  if at == nil then
    local found = redis.call('GET', key)
    at = found and tonumber(string.match(found, '^%S+')) or -1
    deleted[key] = at
  end
  return at
end
local function one(i)
  local stream, index, user, gone = KEYS[7 * i + 1], KEYS[7 * i + 2], KEYS[7 * i + 3], KEYS[7 * i + 4]
  local arm = KEYS[7 * i + 5]
  local a = 13 * i
  local errors, prompt, completion = tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11])
  local incarnation = tonumber(ARGV[a + 13])
  if errors == nil or prompt == nil or completion == nil or incarnation == nil then
    error('record ' .. ARGV[a + 5] .. ': bad counts')
  end
  if deletion(KEYS[7 * i + 7]) >= incarnation then return end
  local erased = user ~= '' and tonumber(redis.call('GET', gone) or '-1') >= tonumber(ARGV[a + 6])
  if erased or redis.call('EXISTS', index) == 1 then return end
  local entry = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[a + 2], '*', 'r', ARGV[a + 1])
  redis.call('SET', index, ARGV[a + 4] .. ' ' .. entry .. ARGV[a + 7], 'EX', ARGV[a + 3])
  written = written + 1
  if user ~= '' then
    local set = sets[user]
    if set == nil then set = {ttl = 0, ids = {}}; sets[user] = set end
    set.ids[#set.ids + 1] = ARGV[a + 5]
    set.ttl = math.max(set.ttl, tonumber(ARGV[a + 3]))
  end
  if arm ~= '' then
    local found = arms[arm]
    if found == nil then found = {users = KEYS[7 * i + 6], counts = {}, who = {}}; arms[arm] = found end
    local counts = found.counts
    bump(counts, 'requests', 1)
    if ARGV[a + 8] == '' then bump(counts, 'anonymous', 1) else found.who[#found.who + 1] = ARGV[a + 8] end
    bump(counts, 'errors', errors)
    bump(counts, 'prompt_tokens', prompt)
    bump(counts, 'completion_tokens', completion)
    if ARGV[a + 12] ~= '' then bump(counts, 'latency:' .. ARGV[a + 12], 1) end
  end
end
local failed = nil
for i = 0, #KEYS / 7 - 1 do
  local ok, err = pcall(one, i)
  if not ok then failed = err; break end
end
local function shared(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err and failed == nil then failed = reply end
end
for key, set in pairs(sets) do
  shared('SADD', key, unpack(set.ids))
  shared('EXPIRE', key, set.ttl)
end
for key, found in pairs(arms) do
  for field, by in pairs(found.counts) do shared('HINCRBY', key, field, by) end
  if #found.who > 0 then shared('PFADD', found.users, unpack(found.who)) end
end
if failed ~= nil then
  if type(failed) == 'table' then return failed end
  return redis.error_reply(tostring(failed))
end
return written
"""
CHUNK = 100
"""Records per script call: a call blocks Redis while it runs, so a batch is several short calls."""
RETRY_S = 1.0
"""How often Redis is tried again while the log is degraded."""
RECENT = 65536
"""Completion ids remembered per process (owner tenant), for feedback that arrives while Redis is down."""
Recent = tuple[str, float | None]
"""Who answered a completion: the tenant's name and when that tenant was created (None: not known)."""
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class Recorder:
    def __init__(
        self,
        redis: aioredis.Redis,
        spool: Spool,
        metrics: Metrics,
        *,
        batch: int = 500,
        interval_s: float = 0.05,
        max_queued: int = 100_000,
        enabled: bool = True,
        workers: int = 0,
    ) -> None:
        self._redis = redis
        self._spool = spool
        self._metrics = metrics
        self._batch = batch
        self._interval_s = interval_s
        self._max_queued = max_queued
        self._enabled = enabled
        self._queue: deque[tuple[int, RequestContext]] = deque()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._progress = asyncio.Condition()
        self._queued_seq = 0
        self._done_seq = 0
        self._lane = ScriptLane(redis, _RECORD, size=2)
        self._builder: RecordWorker | ThreadBuilder = RecordWorker() if workers else ThreadBuilder()
        self.recent: OrderedDict[str, Recent] = OrderedDict()
        """Completion id -> tenant and its creation, for the last RECENT records this process handled."""
        self.degraded = False
        """True while Redis cannot be written: records go to the spool."""
        self._retry_at = 0.0

    def record(self, context: RequestContext) -> None:
        """Queue a finished request's context (never blocks, never fails)."""
        if not self._enabled:
            return
        self._queued_seq += 1
        self._queue.append((self._queued_seq, context))
        if len(self._queue) > self._max_queued:
            self._queue.popleft()
            self._metrics.records_dropped.labels("queue_full").inc()
        if len(self._queue) >= self._batch:
            self._wake.set()

    async def written(self) -> None:
        """Wait until everything queued before this call is written (or spooled)."""
        target = self._queued_seq
        self._wake.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._done_seq >= target or self._stopping.is_set())

    async def start(self) -> None:
        await self._builder.start()

    async def run(self) -> None:
        """Write what is queued, every interval (or at once when a batch is full), until `stop`."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._cycle()
        await self._cycle()

    async def stop(self) -> None:
        """Ask `run` to write what is left and return (it is not cancelled: no batch is cut in half)."""
        self._stopping.set()
        self._wake.set()

    async def _cycle(self) -> None:
        try:
            if (self.degraded or self._spool.pending()) and time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + RETRY_S
                await self._replay()
            await self._drain_queue()
        except Exception:
            log.exception("completion log: a write cycle failed; the next one tries again")
        async with self._progress:
            self._progress.notify_all()

    async def _drain_queue(self) -> None:
        """Three stages overlap: while the builder builds batch n, the loop takes batch n+1 off the queue
        and hands it over, and batch n-1 is written."""
        writing: asyncio.Task[None] | None = None
        while self._queue or self._builder.pending:
            if self._queue and self._builder.pending < 2:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch))]
                raws = [raw for _, context in batch if (raw := self._raw(context)) is not None]
                await self._builder.send(raws, (batch[-1][0], len(batch)))
                if self._queue and self._builder.pending < 2:
                    continue
            (last_seq, count), entries = await self._builder.receive()
            if len(entries) < count:
                self._metrics.records_dropped.labels("unbuildable").inc(count - len(entries))
            if writing is not None:
                await writing
            self._remember(entries)
            writing = asyncio.create_task(self._store(entries, last_seq))
        if writing is not None:
            await writing

    def _raw(self, context: RequestContext) -> dict[str, Any] | None:
        try:
            return raw_record(context)
        except Exception:
            log.exception("completion log: request %s could not be recorded", context.request_id)
            return None

    async def _store(self, entries: list[dict[str, Any]], last_seq: int) -> None:
        try:
            if not self.degraded:
                try:
                    await self._write(entries)
                    return
                except UNREACHABLE as exc:
                    log.warning("completion log: Redis unreachable (%r); spooling records until it returns", exc)
                    self.degraded = True
            try:
                await self._spool.append(entries)
                self._metrics.records_spooled.inc(len(entries))
            except OSError:
                log.exception("completion log: the spool cannot be written either; %d records lost", len(entries))
                self._metrics.records_dropped.labels("spool_error").inc(len(entries))
        finally:
            self._done_seq = max(self._done_seq, last_seq)

    async def _write(self, entries: list[dict[str, Any]]) -> None:
        """Write entries; a chunk Redis refuses (a script error, not an outage) is retried record by record,
        and a record it still refuses is dropped and counted, so one bad record cannot stop the log."""
        chunks = [entries[i : i + CHUNK] for i in range(0, len(entries), CHUNK)]
        replies = await self._lane.many([_call(chunk) for chunk in chunks])
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, ResponseError):
                await self._one_by_one(chunk, reply)
        self._metrics.records_written.inc(len(entries))

    async def _one_by_one(self, chunk: list[dict[str, Any]], error: Exception) -> None:
        log.error("completion log: Redis refused a batch (%s); writing its records one by one", error)
        for entry, reply in zip(chunk, await self._lane.many([_call([entry]) for entry in chunk]), strict=True):
            if isinstance(reply, ResponseError):
                log.error("completion log: record %s refused by Redis, dropped: %s", entry["id"], reply)
                self._metrics.records_dropped.labels("refused").inc()

    async def _replay(self) -> None:
        """Write the spool to Redis, oldest first; stay degraded if Redis is still away."""
        try:
            replayed = await self._spool.drain(self._write)
        except (RedisError, OSError):
            return
        self.degraded = False
        if replayed:
            log.info("completion log: %d spooled records replayed", replayed)

    def _remember(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            self.recent[entry["id"]] = (entry["tenant"], entry.get("tenant_created"))
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    async def close(self) -> None:
        await self._lane.close()
        await self._builder.stop()

    async def trim(self, policies: dict[str, Any]) -> None:
        """Drop records older than each tenant's age limit (length is trimmed as records are added)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, policy in policies.items():
                oldest_ms = int((time.time() - policy.max_age_s) * 1000)
                pipe.xtrim(keys.completion_log(tenant), minid=str(oldest_ms), approximate=True)
            await pipe.execute()


def _call(chunk: list[dict[str, Any]]) -> Call:
    """The keys and arguments of one script call writing `chunk`."""
    script_keys: list[str] = []
    args: list[Any] = []
    for e in chunk:
        tenant, user, experiment, arm = e["tenant"], e["user"], e.get("experiment"), e.get("arm")
        script_keys += [keys.completion_log(tenant), keys.completion(e["id"])]
        script_keys += [keys.end_user(tenant, user), keys.forgotten(tenant, user)] if user else ["", ""]
        if experiment and arm:
            script_keys += [keys.arm_counters(tenant, experiment, arm), keys.arm_users(tenant, experiment, arm)]
        else:
            script_keys += ["", ""]
        script_keys.append(keys.tenant_deleted(tenant))
        args += [e["record"], e["max_records"], e["ttl"], tenant, e["id"], e["created"]]
        args += [f" {experiment} {arm}" if experiment and arm else "", user or "", e.get("error", 0)]
        args += [e.get("prompt_tokens", 0), e.get("completion_tokens", 0), e.get("latency_bucket", "")]
        args.append(e.get("tenant_created") or e["created"])
    return script_keys, args
