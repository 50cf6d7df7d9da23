"""The vLLM replicas a gateway talks to: their health, their load, and which one serves a request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiohttp

from gateway.errors import EngineUnavailable

log = logging.getLogger("loragate.engine")


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    inflight: int = 0
    generation: int = 0
    """Bumped whenever the replica comes back from being down: what it had loaded is gone."""
    resident: dict[str, None] = field(default_factory=dict)
    """Adapters loaded on this replica, least recently used first."""

    def mark_down(self) -> None:
        if self.healthy:
            log.warning("vLLM replica %s is down", self.url)
        self.healthy = False

    def mark_up(self) -> None:
        if not self.healthy:
            self.generation += 1
            self.resident.clear()
            log.info("vLLM replica %s is up", self.url)
        self.healthy = True


class ReplicaPool:
    """Tracks replicas through periodic `/health` checks and hands out the least busy healthy one."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession, interval_s: float = 2.0) -> None:
        if not urls:
            raise ValueError("at least one vLLM URL is needed")
        self.replicas = [Replica(url) for url in urls]
        self._session = session
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def check(self, replica: Replica) -> bool:
        try:
            async with self._session.get(f"{replica.url}/health", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        replica.mark_up() if ok else replica.mark_down()
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(replica) for replica in self.replicas))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check_all()

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def healthy(self, exclude: frozenset[Replica] = frozenset()) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r not in exclude]

    def pick(self, exclude: frozenset[Replica] = frozenset()) -> Replica:
        candidates = self.healthy(exclude)
        if not candidates:
            raise EngineUnavailable("No inference engine is available right now; try again shortly.")
        return min(candidates, key=lambda r: r.inflight)
