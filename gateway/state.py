"""Changes made by any process reach every gateway process within `interval_s`.

Every write to tenants, keys, pins, aliases and shares bumps one Redis counter in the same
transaction; each gateway polls it and, when it moves, empties the caches built from that state
(auth, pointers). A poll is one GET, off the request path. (Pub/sub would be faster on average but
loses messages across reconnects; a counter cannot be missed.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys

log = logging.getLogger("loragate.state")


class StateWatcher:
    def __init__(self, redis: aioredis.Redis, interval_s: float, on_change: list[Callable[[], None]]) -> None:
        self._redis = redis
        self._interval_s = interval_s
        self._on_change = on_change
        self._seen: str | None = None
        self.changes = 0

    async def check(self) -> None:
        version = await self._redis.get(keys.state_version())
        if version != self._seen:
            self._seen = version
            self.changes += 1
            for forget in self._on_change:
                forget()

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self.check()
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("cannot watch for state changes (caches expire on their own): %s", exc)
                failing = True
            await asyncio.sleep(self._interval_s)
