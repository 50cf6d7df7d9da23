"""The vLLM replicas a gateway talks to: their health, their load, and which one serves a request."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from gateway.errors import EngineUnavailable

log = logging.getLogger("loragate.engine")
HEALTH_TIMEOUT_S = 3.0
SILENT_CHECKS = 3
"""Health checks in a row a replica may leave unanswered for HEALTH_TIMEOUT_S before it is taken for down: one slow
answer from an engine busy on the CPU turned every request into a 503 until the next check. A refused connection or an
error answer takes it down at once."""


async def loaded_adapters(session: aiohttp.ClientSession, url: str, timeout_s: float) -> list[str] | None:
    """The LoRA adapters the vLLM server at `url` says it holds (`GET /v1/models`: the models with a parent), or None
    when it cannot be asked."""
    try:
        async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            listed = await resp.json() if resp.status == 200 else None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None
    models = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(models, list):
        return None
    return [m["id"] for m in models if isinstance(m, dict) and m.get("parent") and isinstance(m.get("id"), str)]


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    inflight: int = 0
    generation: int = 0
    """Bumped whenever the replica comes back from being down: what it had loaded is gone."""
    resident: dict[str, None] = field(default_factory=dict)
    """Adapters loaded on this replica, least recently used first."""
    silent: int = 0
    """Health checks in a row it did not answer in time (`SILENT_CHECKS`)."""
    in_use: Counter[str] = field(default_factory=Counter)
    """Adapters of requests chosen for this replica that vLLM has not received yet: not to be evicted."""

    def mark_down(self) -> None:
        if self.healthy:
            log.warning("vLLM replica %s is down", self.url)
        self.healthy = False

    def mark_up(self, loaded: list[str]) -> None:
        """Back up: `loaded` is what vLLM says it holds (nothing after a restart)."""
        if not self.healthy:
            self.generation += 1
            self.resident = dict.fromkeys(loaded)
            log.info("vLLM replica %s is up (%d adapters loaded)", self.url, len(self.resident))
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
        self._checking: dict[Replica, asyncio.Future[bool]] = {}
        """The check of a replica under way, which checks asked meanwhile share."""

    async def check(self, replica: Replica) -> bool:
        """Ask the replica's /health (on a connection of its own, in the gateway) and mark it up or down (down after
        SILENT_CHECKS unanswered in a row); whether it answered, healthy, in time. Checks
        asked while one is under way share its answer: a burst of requests that met closed connections, or of
        readiness probes, sends the engine one request, not one each."""
        running = self._checking.get(replica)
        if running is None:
            running = self._checking[replica] = asyncio.ensure_future(self._check(replica))
            running.add_done_callback(lambda _: self._checking.pop(replica, None))
        return await asyncio.shield(running)

    async def _check(self, replica: Replica) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._session.get(f"{replica.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except TimeoutError:  # busy (a CPU engine under load answers late), or frozen: down only if it stays silent,
            replica.silent += 1  # but no answer all the same for the request that asked (it moves on: `_send`)
            if replica.silent >= SILENT_CHECKS or not replica.healthy:
                replica.mark_down()
            return False
        except (aiohttp.ClientError, OSError):
            ok = False
        replica.silent = 0
        if not ok:
            replica.mark_down()
        elif not replica.healthy:  # what vLLM has registered: a replica marked down for a blip has lost nothing
            replica.mark_up(await loaded_adapters(self._session, replica.url, timeout_s=3) or [])
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
