"""Erasing what the completion log and feedback hold: one end user of a tenant, or a whole tenant.

Erasing an end user leaves a tombstone (`keys.forgotten`) for as long as the tenant keeps records:
records and ratings of theirs made before the erasure that are still in some gateway's spool (Redis
was down, or a process died) are not written back when the spool is replayed.
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from gateway import keys

PAGE = 500


async def forget_user(redis: aioredis.Redis, tenant: str, user: str, keep_s: int) -> dict[str, int]:
    """Delete every completion record of an end user and every rating they gave. Returns the counts.
    `keep_s`: how long the tombstone stays (the tenant's record age limit)."""
    await redis.set(keys.forgotten(tenant, user), repr(time.time()), ex=max(keep_s, 1))
    removed = {"completions": 0, "feedback": 0}
    while ids := await redis.srandmember(keys.end_user(tenant, user), PAGE):
        for completion_id in ids:
            removed["completions"] += await _delete_record(redis, tenant, user, completion_id)
            removed["feedback"] += await redis.hdel(keys.feedback(tenant, completion_id), user)
        await redis.srem(keys.end_user(tenant, user), *ids)  # only what was done: ids added meanwhile stay
    return removed


async def _delete_record(redis: aioredis.Redis, tenant: str, user: str, completion_id: str) -> int:
    index = await redis.get(keys.completion(completion_id))
    owner, entry = ((index or "").split(" ") + ["", ""])[:2]  # TENANT ENTRY[ EXPERIMENT ARM]
    if owner != tenant or not entry:
        return 0
    found = await redis.xrange(keys.completion_log(tenant), entry, entry)
    if not found or json.loads(found[0][1]["r"]).get("user") != user:
        return 0  # a completion the user only rated: its record is someone else's
    await redis.delete(keys.completion(completion_id))
    return int(await redis.xdel(keys.completion_log(tenant), entry))


async def purge_tenant(redis: aioredis.Redis, tenant: str) -> int:
    """Delete a tenant's whole log and feedback (when the tenant is deleted). Returns the records deleted."""
    stream, start, deleted = keys.completion_log(tenant), "-", 0
    while entries := await redis.xrange(stream, min=start, max="+", count=PAGE):
        ids = [json.loads(fields["r"]).get("id") for _, fields in entries]
        await redis.delete(*(keys.completion(i) for i in ids if i))
        deleted += len(entries)
        ms, seq = entries[-1][0].split("-")
        start = f"{ms}-{int(seq) + 1}"
    await redis.delete(stream)
    for pattern in keys.tenant_records_pattern(tenant):
        async for key in redis.scan_iter(match=pattern, count=PAGE):
            await redis.delete(key)
    return deleted
