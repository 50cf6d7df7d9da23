"""Which gateway processes are replaying spooled completion records into the log (`keys.records_replaying`): while
one is, a completion id no index names yet may be one of its records, and feedback on it is "cannot tell yet" (503,
or spooled) at every process, not a 404 (a client does not retry one, and the rating was lost).

A mark lapses MARK_S after it was last set (a process that died replaying), dated by Redis's clock on both sides:
the processes' own clocks may disagree. Setting one prunes the lapsed ones; the key expires once all have."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway import keys

MARK_S = 30
"""How long a mark lasts unless set again."""
_MARK = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
"""
_LIVE = """
return redis.call('ZCOUNT', KEYS[1], '(' .. redis.call('TIME')[1], '+inf')
"""


async def mark(redis: aioredis.Redis, token: str, lasting_s: int = MARK_S) -> None:
    """Mark process `token` as replaying for `lasting_s` from now (again: from now)."""
    await redis.eval(_MARK, 1, keys.records_replaying(), token, lasting_s)


async def unmark(redis: aioredis.Redis, token: str) -> None:
    await redis.zrem(keys.records_replaying(), token)


async def any_replaying(redis: aioredis.Redis) -> bool:
    """Whether some process's mark is live."""
    return bool(await redis.eval(_LIVE, 1, keys.records_replaying()))
