"""Erasing what the completion log and feedback hold: one end user of a tenant, or a whole tenant.

Erasing an end user leaves a tombstone (`keys.forgotten`, named by a digest of the user's name) for the longest age
limit a record can carry: records and ratings of theirs made before the erasure that are still in some gateway's
spool (Redis was down, or a process died) are not written back when the spool is replayed.

Deleting a tenant leaves one too (`keys.tenant_deleted`): the deletion time, and the records Redis's
own clock then. Records and ratings carry when their tenant was created (`tenant_created`: which tenant
of that name they belong to); those of a tenant created at or before the deletion, still queued in some
gateway or in a spool, are refused by the scripts that write them, and a completion index written by
Redis before the deletion does not vouch for a tenant re-created later with the same name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys
from gateway.arm_signal import ERASE
from gateway.context import MAX_USER_CHARS
from gateway.record_store import TRIMMED, TRIMMED_KEEP_S, parse_index
from gateway.records import LogPolicy

log = logging.getLogger("loragate.erasure")
PAGE = 500
MARGIN_S = 2
"""Records this much younger than the age limit are searched too (their index may be expiring meanwhile)."""
LONGEST_AGE_S = 3650 * 86400
"""The longest age limit a record or rating can carry (LogPolicy.max_age_days' bound). Tombstones stay this long
at least: a spooled item carries the limit its tenant had when it was made, which may be longer than today's."""

# KEYS: the tenant's tombstone. ARGV: deletion time (Unix), seconds to keep it. Returns Redis's time (ms), kept
# beside the deletion time: stream entries (and so completion indexes) written up to then are the old tenant's.
_TOMBSTONE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ms, 'EX', ARGV[2])
return ms
"""


class NoUserNamed(ValueError):
    """An erasure of the empty end user: requests without one are nobody's, and there is nothing to erase."""

    def __init__(self) -> None:
        super().__init__("The end user to forget must be named: requests without one belong to no end user.")


async def forget_user(redis: aioredis.Redis, tenant: str, user: str, policy: LogPolicy) -> dict[str, int]:
    """Delete every completion record of an end user, every rating they gave, and every rating of their completions
    (others' corrections quote their conversation), and take what those ratings added out of their experiment arms'
    counters (a user who rates a completion again after their erasure counts once); a completion whose record is
    gone already (whose, unknown) loses every rating, but only the user's leaves its arm, as a trim leaves the others'
    there. Returns the counts. `policy`:
    the tenant's (its age limit: the tombstone stays LONGEST_AGE_S at least; its score range). The tombstone is
    dated by Redis's clock plus MARGIN_S (records and ratings are dated by Redis's clock as each gateway last
    measured it, gateway.clock; the margin covers what a measurement can be off by): what the user sends in the
    next seconds is not kept either."""
    if not user:
        raise NoUserNamed
    user, keep_s = user[:MAX_USER_CHARS], policy.max_age_s  # as records name them
    seconds, micros = await redis.time()
    tombstone = repr(seconds + micros / 1e6 + MARGIN_S)
    await redis.set(keys.forgotten(tenant, user), tombstone, ex=max(keep_s, LONGEST_AGE_S))
    erase = redis.register_script(ERASE)
    removed = {"completions": 0, "feedback": 0}
    while ids := await redis.srandmember(keys.end_user(tenant, user), PAGE):
        for completion_id in ids:
            owner, entry, experiment, arm = parse_index(await redis.get(keys.completion(completion_id)))
            counters = keys.arm_counters(tenant, experiment, arm) if owner == tenant and experiment and arm else ""
            own = 0
            if owner == tenant and entry:
                own = await _delete_record(redis, tenant, user, completion_id, entry, keep_s)
            script_keys, scores = [keys.feedback(tenant, completion_id), counters], [policy.score_min, policy.score_max]
            removed["feedback"] += int(await erase(keys=script_keys, args=["" if own == 1 else user, *scores]))
            if own == -1:  # its record is gone (whose, unknown): the others' ratings go with it, as a trim takes
                # them, their arm keeping them (erasing this user took them out of its results)
                removed["feedback"] += int(await erase(keys=[script_keys[0], ""], args=["", *scores]))
            removed["completions"] += own == 1
        await redis.srem(keys.end_user(tenant, user), *ids)  # only what was done: ids added meanwhile stay
    removed["completions"] += await _forget_past_age(redis, tenant, user, keep_s)
    return removed


async def _forget_past_age(redis: aioredis.Redis, tenant: str, user: str, max_age_s: int) -> int:
    """The user's records that have lost their index (and so their place in the user's set): those past the age
    limit, which the trim (once a minute, while Redis is up) has not reached yet, and those written while a shorter
    limit held (their index expired at it; the limit was raised since). Only the head of the log is read: up to
    that age by Redis's clock (which dates the entries and expires the indexes), then on while entries have no
    index."""
    log, removed, start = keys.completion_log(tenant), 0, "-"
    seconds, micros = await redis.time()
    aged = int((seconds + micros / 1e6 - max_age_s + MARGIN_S) * 1000)
    while page := await redis.xrange(log, start, "+", count=PAGE):
        records = [(entry, *id_and_user(fields)) for entry, fields in page]
        async with redis.pipeline(transaction=False) as pipe:
            for _, completion_id, _ in records:
                pipe.exists(keys.completion(str(completion_id)))
            indexed = await pipe.execute()
        unindexed = {entry for (entry, _, _), has in zip(records, indexed, strict=True) if not has}
        theirs = [
            entry for entry, _, owner in records if owner == user and (entry in unindexed or entry_ms(entry) <= aged)
        ]
        if theirs:
            removed += int(await redis.xdel(log, *theirs))
        if entry_ms(page[-1][0]) > aged and not unindexed:
            break
        start = "(" + page[-1][0]
    return removed


async def _delete_record(
    redis: aioredis.Redis, tenant: str, user: str, completion_id: str, entry: str, keep_s: int
) -> int:
    """1 when the completion (the tenant's, at stream `entry`) was the user's own and its record is deleted now;
    -1 when its record is gone already (its ratings go all the same); 0 for one they only rated (its record is
    someone else's). An index whose record is gone goes too, with its ratings: the length limit's trim deletes the
    ratings itself (and leaves the index as TRIMMED, which names no tenant), but not for records written before
    entries named their completion (`keys.completion_log`), nor for those trimmed by an age limit lowered since.
    The index becomes TRIMMED, which refuses every later rating of the completion: others' ratings still in a spool,
    or sent to a process that answered it, quote the erased conversation and would bring its ratings back. It stays
    as long as the index would have (its record's age limit when written, which a rating of it carries too, maybe
    longer than the tenant's now: once the marker had gone, such a rating was written as one of a completion yet to
    come), the tenant's age limit now, or an hour, whichever is longest."""
    found = await redis.xrange(keys.completion_log(tenant), entry, entry)
    if found and id_and_user(found[0][1])[1] != user:
        return 0
    index = keys.completion(completion_id)
    left_s = math.ceil(max(await redis.pttl(index), 0) / 1000)
    await redis.set(index, TRIMMED, ex=max(keep_s, TRIMMED_KEEP_S, left_s))
    if not found:
        return -1
    return int(await redis.xdel(keys.completion_log(tenant), entry)) or -1


async def tenant_deleted(redis: aioredis.Redis, tenant: str) -> tuple[float, int] | None:
    """When the tenant of that name was last deleted (Unix time), and the records Redis's clock then (ms)."""
    found = await redis.get(keys.tenant_deleted(tenant))
    return parse_tombstone(found) if found else None


def parse_tombstone(found: str) -> tuple[float, int]:
    at, _, ms = found.partition(" ")
    return float(at), int(ms or 0)


async def mark_tenant_deleted(redis: aioredis.Redis, tenant: str, created: float, keep_s: int) -> None:
    """Leave a deleted tenant's tombstone: from now on no record or rating of a tenant of that name created at
    or before now (`created`: when the deleted one was; `keep_s`: its record age limit; the tombstone stays
    LONGEST_AGE_S at least) is written, whichever gateway's queue or spool it comes from. Left before
    `purge_tenant`."""
    at = max(time.time(), created)
    script = redis.register_script(_TOMBSTONE)
    await script(keys=[keys.tenant_deleted(tenant)], args=[repr(at), max(keep_s, LONGEST_AGE_S)])


async def purge_tenant(redis: aioredis.Redis, tenant: str) -> int:
    """Delete a tenant's whole log and feedback (when the tenant is deleted, after `mark_tenant_deleted`).
    Returns the records deleted."""
    stream, start, deleted = keys.completion_log(tenant), "-", 0
    while entries := await redis.xrange(stream, min=start, max="+", count=PAGE):
        ids = [id_and_user(fields)[0] for _, fields in entries]
        await redis.delete(*(keys.completion(i) for i in ids if i))
        deleted += len(entries)
        ms, seq = entries[-1][0].split("-")
        start = f"{ms}-{int(seq) + 1}"
    await redis.delete(stream)
    for pattern in keys.tenant_records_pattern(tenant):
        async for key in redis.scan_iter(match=pattern, count=PAGE):
            await redis.delete(key)
    return deleted


# KEYS: a tombstone named in clear, the same under its digest. ARGV: how long (ms) the one named in clear is kept
# still. Copied under its digest unless that holds a later time (with the time to live it had), and kept ARGV[1] at
# most (gateways of the release before read it meanwhile); 1 if it was copied.
_DIGESTED = """
local at = redis.call('GET', KEYS[1])
if not at then return 0 end
local ttl, copied = redis.call('PTTL', KEYS[1]), 0
if tonumber(at) > tonumber(redis.call('GET', KEYS[2]) or '-1') then
  if ttl > 0 then redis.call('SET', KEYS[2], at, 'PX', ttl) else redis.call('SET', KEYS[2], at) end
  copied = 1
end
if ttl < 0 or ttl > tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return copied
"""
NAMED_KEPT_S = 86_400
"""How long a tombstone named in clear is kept once copied under its digest: gateways of the release before, still
serving during a rolling upgrade, read it there."""
DIGEST_EVERY_S = 3600.0


async def digest_named_tombstones(redis: aioredis.Redis) -> int:
    """Tombstones of releases before 2026-12-07 named the erased user in clear (`keys.named_tombstones`), where
    scripts now look under the digest of the name (and under the name too, until this is done): each is copied
    there, and the one named in clear expires in NAMED_KEPT_S. A pass that finds none (a day after the last one
    a gateway of the release before wrote, at the earliest) sets a marker: the record script stops reading names,
    and later passes return at once (each SCANs the whole records Redis). How many it copied."""
    if await redis.exists(keys.named_tombstones_gone()):
        return 0
    copy, copied, found = redis.register_script(_DIGESTED), 0, 0
    async for key in redis.scan_iter(match=keys.named_tombstones(), count=PAGE):
        _, _, tenant, user = str(key).split(":", 3)
        copied += int(await copy(keys=[key, keys.forgotten(tenant, user)], args=[NAMED_KEPT_S * 1000]))
        found += 1
    if not found:
        await redis.set(keys.named_tombstones_gone(), "1")
    return copied


async def digest_named_tombstones_until_done(redis: aioredis.Redis, every_s: float = DIGEST_EVERY_S) -> None:
    """`digest_named_tombstones` at start, then every `every_s` until a pass finds none: a task of its own,
    as its SCAN may take a while on a large Redis. An error (Redis away) is tried again next time."""
    while True:
        try:
            await digest_named_tombstones(redis)
            if await redis.exists(keys.named_tombstones_gone()):
                return
        except (RedisError, OSError) as exc:
            log.debug("digesting tombstones named in clear: %r", exc)
        except Exception:  # a key of a shape no release writes: said, and the task goes on
            log.exception("digesting tombstones named in clear failed; trying again in %g s", every_s)
        await asyncio.sleep(every_s)


def id_and_user(fields: dict[str, str]) -> tuple[str | None, str | None]:
    """A log entry's completion id and end user (None for none), from its fields `c` and `u`: its record is parsed
    (up to 256 K characters of JSON, on the event loop) only for an entry written before it had them."""
    if "c" in fields:
        return fields["c"] or None, fields.get("u") or None
    record = json.loads(fields["r"])
    return record.get("id"), record.get("user")


def entry_ms(entry: str) -> int:
    """The time (ms, Redis's clock) in a stream entry id `MS-SEQ` followed by anything; 0 when not one."""
    ms = entry.partition("-")[0]
    return int(ms) if ms.isdigit() else 0
