"""How the records Redis persists what it is told, and so what a 200 from `POST /v1/feedback` may promise.

- `waitaof`: Redis >= 7.2 with AOF, and WAITAOF confirms a write's local fsync: every feedback write is followed by
  `WAITAOF 1 0` (`confirm` adds it to the write's pipeline, `confirmed` reads its answer);
- `fsync-always`: AOF with `appendfsync always` and `no-appendfsync-on-rewrite no` (CONFIG GET): Redis fsyncs before
  it answers;
- `spool`: neither, or Redis cannot say (CONFIG refused, no WAITAOF, down): feedback goes to the local fsynced spool.
"""

from __future__ import annotations

from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway import keys

Durability = Literal["waitaof", "fsync-always", "spool"]
WAITAOF_TIMEOUT_MS = 2000
"""How long a write waits for Redis to confirm it fsynced it (`waitaof`), before its feedback goes to the spool."""


class NotDurable(RedisError):
    """Redis took the write but could not confirm it reached its disk."""


async def probe(redis: aioredis.Redis) -> Durability:
    """How Redis persists what it is told; `spool` when it does not fsync before answering (or cannot say). WAITAOF
    is probed only where it could confirm anything: not under `appendfsync no` (it would wait out its timeout at
    every check, every second while feedback spools)."""
    try:
        server = await redis.info("server")
        aof = (await redis.info("persistence")).get("aof_enabled") == 1
        version = tuple(int(part) for part in str(server["redis_version"]).split(".")[:2])
        config = await _fsync_config(redis) if aof else None
        fsyncs = config is None or config.get("appendfsync") != "no"  # None: CONFIG refused, WAITAOF may tell
        if aof and version >= (7, 2) and fsyncs and await _waitaof_works(redis):
            return "waitaof"
        if config is not None and config.get("appendfsync") == "always":
            return "fsync-always" if config.get("no-appendfsync-on-rewrite") == "no" else "spool"
        return "spool"
    except (RedisError, OSError):
        return "spool"  # until it answers again: spooled feedback is never at risk


def confirm(pipe: Any, durability: Durability) -> None:
    """Ask, last in a write's pipeline, for Redis to confirm the write reached its disk (`waitaof` only)."""
    if durability == "waitaof":
        pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)


def confirmed(results: list[Any], durability: Durability) -> list[Any]:
    """A pipeline's results without `confirm`'s answer; NotDurable when that answer denies the fsync."""
    if durability != "waitaof":
        return results
    if int(results[-1][0]) < 1:
        raise NotDurable("Redis did not confirm that the feedback reached its disk")
    return results[:-1]


async def _fsync_config(redis: aioredis.Redis) -> dict[str, str] | None:
    """Redis's fsync settings; None where CONFIG is refused (a managed Redis)."""
    try:
        config: dict[str, str] = await redis.config_get("*fsync*")
    except ResponseError:
        return None
    return config


async def _waitaof_works(redis: aioredis.Redis) -> bool:
    """Whether WAITAOF confirms the local fsync of a write made just before it on its connection (WAITAOF waits for
    that connection's own writes: on one that wrote nothing it answers at once, whatever the server's fsync
    policy). A server that names itself Redis 7.2 or later may still lack it (a fork, a proxy), or not fsync
    (`appendfsync no`): then every acknowledgement would fail, and every rating wait in the spool."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.durability_probe(), "1", ex=60)
            pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
            _, reply = await pipe.execute()
        return int(reply[0]) >= 1
    except (RedisError, TypeError, ValueError, IndexError):
        return False
