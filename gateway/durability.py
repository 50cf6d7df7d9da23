"""How the records Redis persists what it is told, and so what a 200 from `POST /v1/feedback` may promise.

- `waitaof`: Redis >= 7.2 with AOF, and WAITAOF confirms a write's local fsync: every feedback write is followed by
  `WAITAOF 1 0` (`confirm` adds it to the write's pipeline, `confirmed` reads its answer);
- `fsync-always`: AOF with `appendfsync always` and `no-appendfsync-on-rewrite no` (CONFIG GET): Redis fsyncs before
  it answers;
- `spool`: neither, or Redis cannot say (CONFIG refused, no WAITAOF): feedback goes to the local fsynced spool, and
  is replayed into Redis unconfirmed (only as safe as that Redis);
- `unknown`: not probed yet, or Redis failed (down, a write that failed or was not confirmed): feedback goes to the
  spool, and waits there until a probe says how Redis persists (a Redis back from an outage may be another).

Each write is confirmed in its own pipeline: `WAITAOF` under `waitaof`, and under `fsync-always` the settings that
make Redis fsync before it answers, read again after the write (a Redis restarted or replaced without them, which the
connection pool reconnects to unnoticed, is caught at its first write, not at the next probe).
"""

from __future__ import annotations

from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway import keys

Durability = Literal["waitaof", "fsync-always", "spool", "unknown"]
FSYNC_ALWAYS = {"appendonly": "yes", "appendfsync": "always", "no-appendfsync-on-rewrite": "no"}
"""The settings under which Redis fsyncs every write before it answers."""
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
        return "unknown"  # until it answers again: spooled feedback waits, never at risk


def trusted(durability: Durability) -> bool:
    """Whether a write can be confirmed on Redis's disk: feedback is acknowledged from Redis (200), not the spool."""
    return durability in ("waitaof", "fsync-always")


def confirm(pipe: Any, durability: Durability) -> None:
    """Ask, last in a write's pipeline, for Redis to confirm the write reached its disk: WAITAOF, or the settings under
    which it fsyncs before answering."""
    if durability == "waitaof":
        pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
    elif durability == "fsync-always":
        pipe.execute_command("CONFIG GET", "*append*")  # one pattern for the three: any Redis version takes it


def confirmed(results: list[Any], durability: Durability) -> list[Any]:
    """A pipeline's results without `confirm`'s answer; NotDurable when that answer denies the fsync."""
    if durability == "waitaof":
        if int(results[-1][0]) < 1:
            raise NotDurable("Redis did not confirm that the feedback reached its disk")
        return results[:-1]
    if durability == "fsync-always":
        settings = {_text(k): _text(v) for k, v in dict(results[-1]).items()}
        if any(settings.get(name) != value for name, value in FSYNC_ALWAYS.items()):
            raise NotDurable("Redis no longer fsyncs every write before it answers")
        return results[:-1]
    return results


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
