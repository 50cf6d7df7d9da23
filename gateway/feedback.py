"""Feedback on completions: ratings (thumbs, score) and corrections, durable once acknowledged.

A 2xx from `POST /v1/feedback` means the feedback is on disk:
- 200: written to Redis, which had it on disk before answering: the gateway checks how Redis
  persists (gateway.durability): `waitaof` (Redis >= 7.2 with AOF: every write is followed by
  `WAITAOF 1 0`) or `fsync-always` (AOF with `appendfsync always` and `no-appendfsync-on-rewrite
  no`, checked with CONFIG GET);
- 202: written, fsynced, to this process's local spool, because Redis is down or does not fsync
  (`spool`), or the completion cannot be vouched for yet; it is replayed into Redis in order, and is
  visible to `GET /v1/feedback` from then on.

Feedback is stored per completion in a hash keyed by end user (empty for anonymous feedback), so a
second rating by the same user replaces the first. A completion takes the ratings of MAX_RATERS end users (each
up to ~110 KB, read whole by `GET /v1/feedback` and exports): a new one past that gets 409 (`too_many_ratings`)
when it is checked before its answer. One acknowledged from the spool (202: Redis could not say) is written when
replayed, past the cap too: an acknowledgement is never taken back.
A replay never overwrites a newer rating, nor writes back a rating of an end user erased since it was given;
no write keeps a rating given to a tenant deleted since (each carries when its tenant was created: a tenant
re-created with the same name is another).

Whether a completion is the caller's is told apart only from "not found": an id of another tenant is
looked for exactly as an unknown one is, waits included, so neither the answer nor its time says which.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pydantic_core
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import durability, feedback_script, keys, replay_marks
from gateway.durability import Durability, NotDurable
from gateway.erasure import entry_ms, parse_tombstone
from gateway.errors import Conflict, InvalidRequest, NotFound, StateUnavailable
from gateway.metrics import Metrics
from gateway.record_store import TRIMMED, parse_index
from gateway.recorder import Recorder
from gateway.records import CorrectionMessage, Feedback, FeedbackIn, stored_feedback
from gateway.redaction import Findings, Redactor, map_strings
from gateway.spool import Spool
from gateway.tenants import Tenant

GONE = ""
"""`_owner` of a completion known to be no one's now (trimmed from its log, or of a tenant deleted since)."""
log = logging.getLogger("loragate.feedback")

UNVERIFIED_MAX = 10_000
"""Spooled ratings of completions not yet vouched for, per tenant and process (beyond: 503)."""
MAX_RATERS = 100
"""Distinct end users (anonymous is one) whose ratings one completion keeps; a rater already in may change theirs."""
UNCOUNTED = ',"counted":false}'
"""What ends a rating written before its completion's record came (no index yet): no experiment arm counts it, so
replacing or erasing it later takes nothing from one (gateway.arm_signal). Read by the scripts only."""
VERIFY_FOR_S = 600.0
"""How long a spooled rating waits for its completion's record (spooled elsewhere) before it is dropped, from when
Redis could first be asked (an outage, however long, does not count)."""


class CompletionUnknown(NotFound):
    """The same 404 for a completion id that does not exist and for one of another tenant."""

    code = "completion_not_found"

    def __init__(self, completion_id: str) -> None:
        super().__init__(f"No completion `{completion_id}` was found.", param="completion_id")


class NotKept(RedisError):
    """The script refused a new rating (its rater was erased meanwhile, say): it goes to the spool, whose replay drops
    it. Not a failure of Redis: how Redis persists is still known."""


class TooManyRatings(Conflict):
    """A new end user's rating of a completion that has MAX_RATERS already."""

    code = "too_many_ratings"

    def __init__(self, completion_id: str) -> None:
        super().__init__(
            f"Completion `{completion_id}` already has the ratings of {MAX_RATERS} end users, the most one completion "
            "keeps; an end user who rated it can still change their rating.",
            param="user",
        )


def whose(index: str | None, tombstone: str | None, tenant: str) -> tuple[str | None, str | None]:
    """`FeedbackStore._owner` as far as a completion's index and `tenant`'s tombstone tell, and the log entry
    whose absence from `tenant`'s log makes it GONE (None: nothing to look for)."""
    if not index:
        return None, None
    if index == TRIMMED:
        return GONE, None
    owner, entry, _, _ = parse_index(index)
    if owner == tenant and tombstone and entry_ms(entry) <= parse_tombstone(tombstone)[1]:
        return GONE, None
    return owner, entry if owner == tenant else None


def deleted_since(found: str | None, item: dict[str, Any], feedback: dict[str, Any]) -> bool:
    """Whether the rating's tenant was deleted since it was given (the script refuses it: it waits for nothing)."""
    return found is not None and parse_tombstone(found)[0] >= (item.get("tenant_created") or feedback["created"])


class FeedbackStore:
    def __init__(
        self, redis: aioredis.Redis, spool: Spool, recorder: Recorder, metrics: Metrics, settle_s: float = 0.5
    ) -> None:
        self._redis = redis
        self._spool = spool
        self._recorder = recorder
        self._metrics = metrics
        self._settle_s = settle_s
        self._script = redis.register_script(feedback_script.STORE)
        self._unverified: Counter[str] = Counter()
        self._spooled_raters: dict[str, set[str]] = {}
        """Per completion's feedback key, the end users whose ratings wait in this process's spool (MAX_RATERS)."""
        self.durability: Durability = "unknown"

    async def check_durability(self) -> Durability:
        """How Redis persists what it is told (gateway.durability), kept for the writes and the metric."""
        self.durability = await durability.probe(self._redis)
        self._metrics.feedback_durable.set(int(durability.trusted(self.durability)))
        return self.durability

    def _unknown_durability(self) -> None:
        """After a write that failed or was not confirmed: not known until probed again (the records upkeep does, before
        it replays anything)."""
        self.durability = "unknown"
        self._metrics.feedback_durable.set(0)

    # -- whose completion ----------------------------------------------------------------------

    async def _owner(self, completion_id: str, tenant: str) -> str | None:
        """The tenant whose completion it is, by its index in Redis; None when not indexed (its record may still
        be on its way). GONE when it is known to be no one's now: an index Redis wrote before `tenant` was last
        deleted is the deleted tenant's (not a re-created `tenant`'s), and one whose record is no longer in
        `tenant`'s log (trimmed by its length limit: TRIMMED, or by an age limit lowered since): its ratings go
        with it."""
        index, tombstone = await self._redis.mget([keys.completion(completion_id), keys.tenant_deleted(tenant)])
        owner, entry = whose(index, tombstone, tenant)
        if entry is not None and not await self._redis.xrange(keys.completion_log(tenant), entry, entry):
            return GONE
        return owner

    async def _owners(self, items: list[dict[str, Any]], parsed: list[dict[str, Any]]) -> list[tuple[str | None, bool]]:
        """Spooled ratings' `_owner`, and for one not indexed whether its tenant was deleted since it was given
        (`deleted_since`): for a whole segment in two round trips, an MGET and a pipeline of the XRANGEs needed."""
        indexes = [keys.completion(feedback["completion_id"]) for feedback in parsed]
        tombs = [keys.tenant_deleted(item["tenant"]) for item in items]
        wanted = list(dict.fromkeys(indexes + tombs))
        found = dict(zip(wanted, await self._redis.mget(wanted), strict=True)) if wanted else {}
        verdicts = [whose(found[i], found[t], item["tenant"]) for i, t, item in zip(indexes, tombs, items, strict=True)]
        looked = {(item["tenant"], e) for item, (_, e) in zip(items, verdicts, strict=True) if e is not None}
        logged: dict[tuple[str, str], Any] = {}
        if looked:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant, in_log in looked:
                    pipe.xrange(keys.completion_log(tenant), in_log, in_log)
                logged = dict(zip(looked, await pipe.execute(), strict=True))
        owned = []
        for item, feedback, (owner, entry), tomb in zip(items, parsed, verdicts, tombs, strict=True):
            owner = GONE if entry is not None and not logged[item["tenant"], entry] else owner
            owned.append((owner, owner is None and deleted_since(found[tomb], item, feedback)))
        return owned

    def _answered_here(self, tenant: Tenant, completion_id: str) -> bool:
        """Whether this process answered the completion for this tenant (not for a deleted one of that name), within
        the tenant's age limit: past it, the record and its index are gone, and no marker says so."""
        owner = self._recorder.recent.get(completion_id, within_s=tenant.logging.max_age_s)
        return owner == (tenant.name, tenant.created)

    async def owned(self, tenant: Tenant, completion_id: str) -> bool | None:
        """Whether the completion is the tenant's; None when it cannot be told yet (Redis is down, or the
        log is spooling). A completion answered a moment ago may not be logged yet: this process's queue
        is written first, and other processes (which write within tens of ms) are waited for, up to `settle_s`.
        Another tenant's completion takes the very path of an unknown id (the same waits and Redis calls,
        and the same answer), so that neither tells whether the id exists."""
        if self._answered_here(tenant, completion_id):
            return True

        async def indexed() -> bool:
            return await self._owner(completion_id, tenant.name) == tenant.name

        try:
            if await indexed():
                return True
            await self._recorder.written()
            if self._answered_here(tenant, completion_id) or await indexed():
                return True
            deadline = time.monotonic() + self._settle_s
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if await indexed():
                    return True
            if self._recorder.degraded:  # when spooling, its record may be in a spool
                return None
            replaying = await replay_marks.any_replaying(self._redis)
        except (RedisError, OSError):
            return None
        return None if replaying else False  # another process's spool is being replayed: it may be there

    # -- writing -------------------------------------------------------------------------------

    def _prepared(self, tenant: Tenant, given: FeedbackIn) -> Feedback:
        """Feedback as it is kept: validated against the tenant's policy, redacted (in a worker thread)."""
        policy = tenant.logging
        if given.score is not None and not policy.score_min <= given.score <= policy.score_max:
            raise InvalidRequest(
                f"score must be between {policy.score_min:g} and {policy.score_max:g} for this tenant.", param="score"
            )
        for field in ("correction", "comment") if not policy.content else ():
            if getattr(given, field) is not None:  # free text an end user wrote: content, as a prompt is
                raise InvalidRequest(
                    f"This tenant keeps no prompts or responses, so a {field} cannot be stored.", param=field
                )
        feedback = Feedback(**given.model_dump(), created=self._recorder.clock.now())  # by the records Redis's clock
        if given.score is not None:
            feedback.score_range = (policy.score_min, policy.score_max)
        redactor = Redactor(policy.redact, policy.phone_region)
        counts = Findings()
        if redactor.kinds:
            feedback.correction = _redacted_correction(redactor, feedback.correction, counts)
            feedback.comment = feedback.comment and redactor.redact_into(feedback.comment, counts)
            feedback.labels = feedback.labels and [redactor.redact_into(label, counts) for label in feedback.labels]
        feedback.redactions = dict(counts)
        return feedback

    async def submit(self, tenant: Tenant, given: FeedbackIn) -> tuple[Feedback, bool]:
        """Store feedback; True when it is in Redis (on its disk), False when it waits in the local spool."""
        owned = await self.owned(tenant, given.completion_id)  # first: no redaction's CPU for an id not the tenant's
        if owned is False:
            raise CompletionUnknown(given.completion_id)
        feedback = await asyncio.to_thread(self._prepared, tenant, given)
        item = {"tenant": tenant.name, "verify": owned is None, "ttl": tenant.logging.max_age_s}
        item["since"] = time.time()  # what versions before `missing_since` time the wait from (a rolling upgrade)
        item["tenant_created"] = tenant.created
        item |= {"score_min": tenant.logging.score_min, "score_max": tenant.logging.score_max}
        item["feedback"] = feedback.model_dump_json(exclude={"score_range"} if feedback.score_range is None else None)
        if owned and not durability.trusted(self.durability) and await self._full(tenant.name, given):
            raise TooManyRatings(given.completion_id)  # known now: not acknowledged (202) to be dropped on replay
        if owned and durability.trusted(self.durability):
            try:
                await self._write([item], replay=False)
                return feedback, True
            except (RedisError, OSError) as exc:
                log.warning("feedback not written to Redis (%r): spooled", exc)
                if not isinstance(exc, NotKept):  # Redis failed: what answers next may not fsync, probed before trusted
                    self._unknown_durability()
        if owned is None:
            if self._unverified[tenant.name] >= UNVERIFIED_MAX:
                raise StateUnavailable("Feedback cannot be checked right now; nothing was kept. Try again shortly.")
            self._unverified[tenant.name] += 1
        try:
            await self._spool.append([item])
            if owned:
                self._spooled_raters.setdefault(keys.feedback(tenant.name, given.completion_id), set()).add(
                    given.user or ""
                )
        except OSError as exc:
            if owned is None:
                self._unverified[tenant.name] -= 1  # it was not kept: nothing waits
            log.exception("feedback spool cannot be written")
            raise StateUnavailable("Feedback cannot be stored right now; nothing was kept. Try again.") from exc
        self._metrics.feedback_spooled.inc()
        return feedback, False

    async def _indexes(self, parsed: list[dict[str, Any]]) -> list[str | None]:
        """The completions' indexes: which arm answered each (its rating counts for that arm)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for feedback in parsed:
                pipe.get(keys.completion(feedback["completion_id"]))
            return list(await pipe.execute())

    async def _write(self, items: list[dict[str, Any]], replay: bool) -> None:
        """Write ratings into Redis, confirmed on its disk as the durability probed says (read once: another write's
        failure may change it meanwhile). NotDurable where it cannot be: not known, or (for a new rating) Redis does
        not fsync, and the caller keeps it in the spool."""
        mode = self.durability
        if mode == "unknown" or (not replay and not durability.trusted(mode)):
            raise NotDurable(f"feedback cannot be confirmed on Redis's disk now ({mode})")
        parsed = [pydantic_core.from_json(item["feedback"]) for item in items]
        indexes = await self._indexes(parsed)
        if not replay and indexes[0] is None:  # answered here a moment ago, its record on its way: Redis has it first,
            await self._recorder.written()  # or the rating would not count for the arm that answered
            indexes = await self._indexes(parsed)
        async with self._redis.pipeline(transaction=False) as pipe:
            for item, feedback, index in zip(items, parsed, indexes, strict=True):
                tenant, completion_id, user = item["tenant"], feedback["completion_id"], feedback.get("user") or ""
                script_keys = [keys.feedback(tenant, completion_id)]
                script_keys += [keys.end_user(tenant, user), keys.forgotten(tenant, user)] if user else ["", ""]
                _, _, experiment, arm = parse_index(index)
                counters = keys.arm_counters(tenant, experiment, arm) if experiment and arm else ""
                script_keys += [counters, keys.tenant_deleted(tenant), keys.completion(completion_id)]
                script_keys.append(keys.named_tombstone_prefix(tenant) + user if user else "")
                raw = item["feedback"] if index is not None else item["feedback"][:-1] + UNCOUNTED
                args = [user, raw, feedback["created"], completion_id, item["ttl"], int(replay)]
                args += [item.get("score_min", 0.0), item.get("score_max", 1.0)]
                args += [item.get("tenant_created") or feedback["created"], TRIMMED, MAX_RATERS]
                await self._script(keys=script_keys, args=args, client=pipe)
            durability.confirm(pipe, mode)
            results = durability.confirmed(await pipe.execute(), mode)
        if not replay and results[0] == -1:  # its tenant was deleted (and maybe re-created), or it trimmed, meanwhile
            raise CompletionUnknown(parsed[0]["completion_id"])
        if not replay and results[0] == -3:
            raise TooManyRatings(parsed[0]["completion_id"])
        if not replay and results[0] != 1:
            raise NotKept("Redis did not keep the feedback")

    async def _full(self, tenant: str, given: FeedbackIn) -> bool:
        """Whether a rating to be spooled is past MAX_RATERS (a new end user, that many already), counting those in
        Redis and those waiting in this process's spool (without them, 105 end users rating at once were all taken);
        False when Redis cannot say (it is then acknowledged, and written past the cap when replayed). Ratings other
        processes spooled and have not replayed yet are not counted."""
        feedback_key = keys.feedback(tenant, given.completion_id)
        user = given.user or ""
        waiting = sorted(self._spooled_raters.get(feedback_key, set()))
        if user in waiting:
            return False
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hexists(feedback_key, user)
                pipe.hlen(feedback_key)
                if waiting:
                    pipe.hmget(feedback_key, waiting)
                rated, count, *stored = await pipe.execute()
        except (RedisError, OSError):
            return False
        only_spooled = sum(value is None for value in stored[0]) if stored else 0
        return not rated and int(count) + only_spooled >= MAX_RATERS

    def _replayed(self, items: list[dict[str, Any]], ratings: list[dict[str, Any]]) -> None:
        """These spooled ratings (each item's feedback, parsed) are in Redis now: no longer counted as waiting."""
        for item, feedback in zip(items, ratings, strict=True):
            feedback_key = keys.feedback(item["tenant"], feedback["completion_id"])
            if (waiting := self._spooled_raters.get(feedback_key)) is not None:
                waiting.discard(feedback.get("user") or "")
                if not waiting:
                    del self._spooled_raters[feedback_key]

    async def replay(self) -> int:
        """Write the spooled feedback into Redis, in order. Feedback taken while its completion could not be
        checked is checked now: kept when it is the tenant's, dropped (counted) when it is another's. Any whose
        record is not in Redis yet (it may be in some spool) is put back to wait, for VERIFY_FOR_S from the first
        time Redis was asked: a rating counts for the arm its completion's index names. Nothing while how Redis
        persists is not known (the records upkeep probes first)."""
        await self._spool.adopt()
        if not self._spool.pending() or self.durability == "unknown":
            return 0

        async def handle(items: list[dict[str, Any]]) -> None:
            """One segment: written, and what waits put back (fsynced) before the segment is removed, so that
            a crash or a failed write in between loses nothing and copies nothing."""
            kept, kept_ratings, waiting, checked, dropped = [], [], [], Counter[str](), 0
            parsed = [pydantic_core.from_json(item["feedback"]) for item in items]
            owners = await self._owners(items, parsed)
            for item, rating, (owner, deleted) in zip(items, parsed, owners, strict=True):
                if owner is None and not deleted:
                    # Redis answered, and has no record of it yet (not GONE): it may come (from a spool; one vouched
                    # for waits too, so that it counts for the arm that answered, which its index names)
                    missing_since = item.setdefault("missing_since", time.time())  # not while Redis was down
                    if time.time() - missing_since < VERIFY_FOR_S:
                        waiting.append(item)
                        continue
                if item["verify"]:
                    checked[item["tenant"]] += 1
                    if owner != item["tenant"]:
                        dropped += 1
                        continue
                kept.append(item)
                kept_ratings.append(rating)
            if kept:
                await self._write(kept, replay=True)
                self._replayed(kept, kept_ratings)
            if waiting:
                await self._spool.append(waiting)
            for tenant, count in checked.items():  # once the segment is done: a failed pass takes it again
                self._unverified[tenant] = max(self._unverified[tenant] - count, 0)
            self._metrics.feedback_dropped.inc(dropped)

        try:
            return await self._spool.drain(handle)
        except (RedisError, OSError):
            self._unknown_durability()
            return 0

    # -- reading -------------------------------------------------------------------------------

    async def of_completion(self, tenant: Tenant, completion_id: str) -> list[Feedback]:
        """The feedback on one of the tenant's completions. 503 when that cannot be told (Redis is down, or
        the log is spooling and the completion is not found): a 404 would say it does not exist."""
        owned = await self.owned(tenant, completion_id)
        if owned is None:
            raise StateUnavailable("Feedback cannot be read right now: the completion log is unavailable. Try again.")
        gone = self._answered_here(tenant, completion_id) and await self._owner(completion_id, tenant.name) == GONE
        if not owned or gone:  # gone: erased (or trimmed) though this process answered it, as other processes say
            raise CompletionUnknown(completion_id)
        return stored_feedback(await self._redis.hgetall(keys.feedback(tenant.name, completion_id)))


def _redacted_correction(
    redactor: Redactor, correction: str | CorrectionMessage | None, counts: Findings
) -> str | CorrectionMessage | None:
    """A correction redacted as a completion's answer is: its text, and a message's content and calls (their
    arguments as the JSON text they are). A call's id too, whatever its shape: the log keeps an id that looks like a
    label (gateway.redaction.CALL_LABELS) for the `tool_call_id` naming it, but nothing refers to a correction's."""

    def redact(text: str) -> str:
        return redactor.redact_into(text, counts)

    if not isinstance(correction, CorrectionMessage):
        return correction and redact(correction)
    message = correction.model_dump()
    ids = [call.pop("id") for call in message["tool_calls"]]
    message = map_strings(message, redact)
    for call, given in zip(message["tool_calls"], ids, strict=True):
        call["id"] = given and redact(given)
    return CorrectionMessage.model_validate(message)
