"""The completion log: every request's context becomes one record in its tenant's Redis Stream,
written off the request path.

`record(context)` only queues the context. A background task takes what is queued every
`interval_s` (sooner when a batch is full), turns it into records in a worker thread (parsing whole
answers, applying the tenant's policy: redaction, or metadata only) and writes the batch in one
pipelined round trip: one small Lua script per record appends it to the stream (trimmed to the
tenant's length), indexes its completion id (owner and entry, expiring with the tenant's age limit)
and the end user's set (for erasure). The script skips a record already indexed, so a batch written
twice (a replay after a crash) is kept once.

When Redis cannot be reached, records go to a local spool (bounded: past it the oldest are dropped
and counted in `loragate_records_dropped_total`), and every record after them too, so that when
Redis returns the spool is replayed first and the log keeps its order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys
from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.records import LogPolicy
from gateway.redaction import Redactor, redact_value
from gateway.spool import Spool

log = logging.getLogger("loragate.recorder")

# KEYS: log stream, completion index[, end user's set]. ARGV: record JSON, max length, ttl (s), tenant, id.
_RECORD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[1])
redis.call('SET', KEYS[2], ARGV[4] .. ' ' .. entry, 'EX', ARGV[3])
if #KEYS > 2 then
  redis.call('SADD', KEYS[3], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 1
"""

REQUEST_FIELDS = ("messages", "prompt", "suffix", "tools", "tool_choice", "response_format")
"""What of a request is content (kept only when the tenant keeps content); every other field is a parameter."""
DROPPED_FIELDS = ("model", "user", "safety_identifier", "stream_options")
RETRY_S = 1.0
"""How often Redis is tried again while the log is degraded."""
RECENT = 65536
"""Completion ids remembered per process (owner tenant), for feedback that arrives while Redis is down."""


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
    ) -> None:
        self._redis = redis
        self._spool = spool
        self._metrics = metrics
        self._batch = batch
        self._interval_s = interval_s
        self._max_queued = max_queued
        self._enabled = enabled
        self._queue: deque[RequestContext] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._script = redis.register_script(_RECORD)
        self._redactors: dict[tuple[str, ...], Redactor] = {}
        self.recent: OrderedDict[str, str] = OrderedDict()
        """Completion id -> tenant, for the last RECENT records this process wrote."""
        self.degraded = False
        """True while Redis cannot be written: records go to the spool."""
        self._retry_at = 0.0
        self.policies: dict[str, LogPolicy] = {}
        """The log policy of every tenant recorded by this process (for trimming by age)."""

    def record(self, context: RequestContext) -> None:
        """Queue a finished request's context (never blocks, never fails)."""
        if not self._enabled:
            return
        self._queue.append(context)
        self.policies[context.tenant.name] = context.tenant.logging
        if len(self._queue) > self._max_queued:
            self._queue.popleft()
            self._metrics.records_dropped.labels("queue_full").inc()
        if len(self._queue) >= self._batch:
            self._wake.set()

    def queued(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Write what is queued, every interval (or at once when a batch is full), until cancelled; then
        write what is left."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Write everything queued so far (to Redis, else to the spool)."""
        async with self._flushing:
            if self.degraded and time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + RETRY_S
                await self._replay()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch))]
                entries = await asyncio.to_thread(self._entries, batch)
                self._remember(entries)
                await self._store(entries)

    async def _store(self, entries: list[dict[str, Any]]) -> None:
        if not self.degraded:
            try:
                await self._write(entries)
                return
            except (RedisError, OSError) as exc:
                log.warning("completion log: Redis unreachable (%r); spooling records until it returns", exc)
                self.degraded = True
        try:
            await self._spool.append(entries)
            self._metrics.records_spooled.inc(len(entries))
        except OSError:
            log.exception("completion log: the spool cannot be written either; %d records lost", len(entries))
            self._metrics.records_dropped.labels("spool_error").inc(len(entries))

    async def _write(self, entries: list[dict[str, Any]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                script_keys = [keys.completion_log(entry["tenant"]), keys.completion(entry["id"])]
                if entry["user"]:
                    script_keys.append(keys.end_user(entry["tenant"], entry["user"]))
                args = [entry["record"], entry["max_records"], entry["ttl"], entry["tenant"], entry["id"]]
                await self._script(keys=script_keys, args=args, client=pipe)
            await pipe.execute()
        self._metrics.records_written.inc(len(entries))

    async def _replay(self) -> None:
        """Write the spool to Redis, oldest first; stay degraded if Redis is still away."""
        try:
            replayed = await self._spool.drain(self._write)
        except (RedisError, OSError):
            return
        self.degraded = False
        if replayed:
            log.info("completion log: %d spooled records replayed", replayed)

    async def trim(self) -> None:
        """Drop records older than each tenant's age limit (length is trimmed as records are added)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, policy in self.policies.items():
                oldest_ms = int((time.time() - policy.max_age_s) * 1000)
                pipe.xtrim(keys.completion_log(tenant), minid=str(oldest_ms), approximate=True)
            await pipe.execute()

    # -- turning contexts into records (in a worker thread) --------------------------------------

    def _entries(self, batch: list[RequestContext]) -> list[dict[str, Any]]:
        return [self._entry(context) for context in batch]

    def _remember(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            self.recent[entry["id"]] = entry["tenant"]
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    def _redactor(self, policy: LogPolicy) -> Redactor:
        kinds = tuple(sorted(policy.redact))
        if kinds not in self._redactors:
            self._redactors[kinds] = Redactor(kinds)
        return self._redactors[kinds]

    def _entry(self, context: RequestContext) -> dict[str, Any]:
        record = record_of(context)
        policy = context.tenant.logging
        if policy.content:
            counts: Counter[str] = Counter()
            redactor = self._redactor(policy)
            if redactor.kinds:
                for field in ("request", "choices"):
                    record[field], found = redact_value(redactor, record[field])
                    counts.update(found)
            record["redactions"] = dict(counts)
        else:
            record["request"] = record["choices"] = None
        return {
            "id": record["id"],
            "tenant": record["tenant"],
            "user": record["user"],
            "record": json.dumps(record, separators=(",", ":"), ensure_ascii=False),
            "max_records": policy.max_records,
            "ttl": policy.max_age_s,
        }


def record_of(context: RequestContext) -> dict[str, Any]:
    """A context as a completion record (the fields of records.CompletionRecord), before the tenant's policy."""
    answer = context.answer
    answer.parse_body()
    route = context.route
    adapter = route.adapter if route is not None else None
    payload = context.payload
    request = {k: v for k, v in payload.items() if k in REQUEST_FIELDS}
    request["params"] = {k: v for k, v in payload.items() if k not in REQUEST_FIELDS and k not in DROPPED_FIELDS}
    choices = [choice.model_dump(exclude_none=True) for choice in answer.choices()]
    return {
        "id": answer.completion_id or f"req-{context.request_id}",
        "request_id": context.request_id,
        "tenant": context.tenant.name,
        "key_id": context.key_id,
        "user": context.user,
        "endpoint": context.endpoint,
        "model": route.requested if route is not None else str(payload.get("model", "")),
        "alias": route.alias if route is not None else None,
        "experiment": None,
        "arm": None,
        "adapter": route.adapter_label if route is not None else None,
        "version": adapter.version if adapter is not None else None,
        "served_model": route.served_model if route is not None else None,
        "stream": context.stream,
        "request": request,
        "choices": choices or None,
        "usage": {k: v for k, v in (answer.usage or {}).items() if isinstance(v, int)} or None,
        "status": context.status,
        "outcome": context.outcome,
        "error_type": context.error_type,
        "created": context.received,
        "latency_ms": round(context.latency_s * 1000, 3) if context.latency_s is not None else None,
        "ttft_ms": round(context.first_token_s * 1000, 3) if context.first_token_s is not None else None,
        "redactions": {},
    }
