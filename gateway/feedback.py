"""Feedback on completions: ratings (thumbs, score) and corrections, durable once acknowledged.

A 2xx from `POST /v1/feedback` means the feedback is on disk:
- 200: written to Redis, which had it on disk before answering: the gateway checks how Redis
  persists (`durability`): `waitaof` (Redis >= 7.2 with AOF: every write is followed by
  `WAITAOF 1 0`) or `fsync-always` (AOF with `appendfsync always`, checked with CONFIG GET);
- 202: written, fsynced, to this process's local spool, because Redis is down or does not fsync
  (`spool`); it is replayed into Redis in order, and is visible to `GET /v1/feedback` from then on.

Feedback is stored per completion in a hash keyed by end user (empty for anonymous feedback), so a
second rating by the same user replaces the first. A replay never overwrites a newer rating.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway import keys
from gateway.errors import InvalidRequest, NotFound, StateUnavailable
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.records import Feedback, FeedbackIn
from gateway.redaction import Redactor
from gateway.spool import Spool
from gateway.tenants import Tenant

log = logging.getLogger("loragate.feedback")

Durability = Literal["waitaof", "fsync-always", "spool"]

# KEYS: the completion's feedback hash, the tenant's feedback index[, the end user's set].
# ARGV: field (end user), feedback JSON, created, completion id, ttl (s). A newer rating is never replaced.
_STORE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, previous = pcall(cjson.decode, old)
  if ok and tonumber(previous['created']) and tonumber(previous['created']) > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if #KEYS > 2 then
  redis.call('SADD', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
return 1
"""


class CompletionUnknown(NotFound):
    """The same 404 for a completion id that does not exist and for one of another tenant."""

    code = "completion_not_found"

    def __init__(self, completion_id: str) -> None:
        super().__init__(f"No completion `{completion_id}` was found.", param="completion_id")


class NotDurable(RedisError):
    """Redis took the write but could not confirm it reached its disk."""


class FeedbackStore:
    def __init__(
        self, redis: aioredis.Redis, spool: Spool, recorder: Recorder, metrics: Metrics, settle_s: float = 0.5
    ) -> None:
        self._redis = redis
        self._spool = spool
        self._recorder = recorder
        self._metrics = metrics
        self._settle_s = settle_s
        self._script = redis.register_script(_STORE)
        self.durability: Durability = "spool"

    async def check_durability(self) -> Durability:
        """How Redis persists what it is told; `spool` when it does not fsync before answering (or cannot say)."""
        try:
            server = await self._redis.info("server")
            aof = (await self._redis.info("persistence")).get("aof_enabled") == 1
            version = tuple(int(part) for part in str(server["redis_version"]).split(".")[:2])
            if aof and version >= (7, 2):
                self.durability = "waitaof"
            elif aof and (await self._redis.config_get("appendfsync")).get("appendfsync") == "always":
                self.durability = "fsync-always"
            else:
                self.durability = "spool"
        except ResponseError:  # CONFIG disabled (managed Redis): cannot tell, so do not trust it
            self.durability = "spool"
        except (RedisError, OSError):
            pass  # unreachable: the last answer stands
        self._metrics.feedback_durable.set(0 if self.durability == "spool" else 1)
        return self.durability

    # -- whose completion ----------------------------------------------------------------------

    async def _owner(self, completion_id: str) -> str | None:
        found = await self._redis.get(keys.completion(completion_id))
        return found.partition(" ")[0] if found else None

    async def owned(self, tenant: str, completion_id: str) -> bool | None:
        """Whether the completion is the tenant's; None when Redis is down and this process never saw it.
        A completion answered a moment ago may not be logged yet: this process's queue is written first,
        and other processes (which write every 50 ms) are waited for, up to `settle_s`."""
        try:
            owner = await self._owner(completion_id)
            if owner is None and self._recorder.queued():
                await self._recorder.flush()
                owner = await self._owner(completion_id)
            waited = 0.0
            while owner is None and waited < self._settle_s:
                await asyncio.sleep(0.1)
                waited += 0.1
                owner = await self._owner(completion_id)
        except (RedisError, OSError):
            owner = self._recorder.recent.get(completion_id)
            if owner is None:
                return None
        return owner == tenant

    # -- writing -------------------------------------------------------------------------------

    def _prepared(self, tenant: Tenant, given: FeedbackIn) -> Feedback:
        policy = tenant.logging
        if given.score is not None and not policy.score_min <= given.score <= policy.score_max:
            raise InvalidRequest(
                f"score must be between {policy.score_min:g} and {policy.score_max:g} for this tenant.", param="score"
            )
        if given.correction is not None and not policy.content:
            raise InvalidRequest(
                "This tenant keeps no prompts or responses, so a correction cannot be stored.", param="correction"
            )
        feedback = Feedback(**given.model_dump())
        redactor = Redactor(policy.redact)
        for field in ("correction", "comment"):
            text = getattr(feedback, field)
            if text and redactor.kinds:
                cleaned, counts = redactor.redact(text)
                setattr(feedback, field, cleaned)
                for kind, count in counts.items():
                    feedback.redactions[kind] = feedback.redactions.get(kind, 0) + count
        return feedback

    async def submit(self, tenant: Tenant, given: FeedbackIn) -> tuple[Feedback, bool]:
        """Store feedback; True when it is in Redis (on its disk), False when it waits in the local spool."""
        feedback = self._prepared(tenant, given)
        owned = await self.owned(tenant.name, given.completion_id)
        if owned is False:
            raise CompletionUnknown(given.completion_id)
        item = {"tenant": tenant.name, "verify": owned is None, "ttl": tenant.logging.max_age_s}
        item["feedback"] = feedback.model_dump_json()
        if owned and self.durability != "spool":
            try:
                await self._write([item])
                return feedback, True
            except (RedisError, OSError) as exc:
                log.warning("feedback not written to Redis (%r): spooled", exc)
        try:
            await self._spool.append([item])
        except OSError as exc:
            log.exception("feedback spool cannot be written")
            raise StateUnavailable("Feedback cannot be stored right now; nothing was kept. Try again.") from exc
        self._metrics.feedback_spooled.inc()
        return feedback, False

    async def _write(self, items: list[dict[str, Any]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in items:
                feedback = json.loads(item["feedback"])
                tenant, completion_id, user = item["tenant"], feedback["completion_id"], feedback.get("user") or ""
                script_keys = [keys.feedback(tenant, completion_id), keys.feedback_index(tenant)]
                if user:
                    script_keys.append(keys.end_user(tenant, user))
                args = [user, item["feedback"], feedback["created"], completion_id, item["ttl"]]
                await self._script(keys=script_keys, args=args, client=pipe)
            if self.durability == "waitaof":
                pipe.execute_command("WAITAOF", 1, 0, 2000)
            results = await pipe.execute()
        if self.durability == "waitaof" and int(results[-1][0]) < 1:
            raise NotDurable("Redis did not confirm that the feedback reached its disk")

    async def replay(self) -> int:
        """Write the spooled feedback into Redis, in order. Feedback taken while its owner could not be
        checked is checked now; feedback on another tenant's or an unknown completion is dropped (counted)."""
        if not self._spool.pending():
            return 0

        async def handle(items: list[dict[str, Any]]) -> None:
            kept = []
            for item in items:
                completion_id = json.loads(item["feedback"])["completion_id"]
                if item["verify"] and await self._owner(completion_id) != item["tenant"]:
                    self._metrics.feedback_dropped.inc()
                    log.warning("spooled feedback on an unknown completion dropped")
                    continue
                kept.append(item)
            if kept:
                await self._write(kept)

        try:
            return await self._spool.drain(handle)
        except (RedisError, OSError):
            return 0

    # -- reading and erasing -------------------------------------------------------------------

    async def of_completion(self, tenant: str, completion_id: str) -> list[Feedback]:
        if not await self.owned(tenant, completion_id):
            raise CompletionUnknown(completion_id)
        stored = await self._redis.hgetall(keys.feedback(tenant, completion_id))
        return sorted((Feedback.model_validate_json(raw) for raw in stored.values()), key=lambda f: f.created)

    async def forget(self, tenant: str, user: str) -> dict[str, int]:
        return await forget_user(self._redis, tenant, user)


async def forget_user(redis: aioredis.Redis, tenant: str, user: str) -> dict[str, int]:
    """Delete every completion record of an end user and every feedback they gave. Returns the counts."""
    ids = sorted(await redis.smembers(keys.end_user(tenant, user)))
    removed = {"completions": 0, "feedback": 0}
    for completion_id in ids:
        index = await redis.get(keys.completion(completion_id))
        owner, _, entry = (index or "").partition(" ")
        if owner == tenant and entry:
            found = await redis.xrange(keys.completion_log(tenant), entry, entry)
            if found and json.loads(found[0][1]["r"]).get("user") == user:
                removed["completions"] += await redis.xdel(keys.completion_log(tenant), entry)
                await redis.delete(keys.completion(completion_id))
        removed["feedback"] += await redis.hdel(keys.feedback(tenant, completion_id), user)
        if not await redis.exists(keys.feedback(tenant, completion_id)):
            await redis.zrem(keys.feedback_index(tenant), completion_id)
    await redis.delete(keys.end_user(tenant, user))
    return removed
