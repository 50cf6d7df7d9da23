"""Which replica serves a request, and making sure the adapter it needs is loaded there.

- affinity: a replica that already holds the adapter is preferred, unless it is much busier
  than the least busy replica, in which case the adapter is loaded there too (spreading load);
- single flight: concurrent first requests for a cold adapter on a replica share one load;
- LRU residency: each replica holds at most `capacity` adapters (vLLM's `--max-cpu-loras`);
  the least recently used one (by any gateway process) that is not pinned and not in use is
  unloaded to make room, under the replica's Redis lock (gateway.residency).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable

import aiohttp
from redis.exceptions import RedisError

from adapters.registry import Registry
from adapters.store import IntegrityError
from gateway.engine.pool import Replica, ReplicaPool
from gateway.engine.sessions import EngineSessions, stale
from gateway.errors import AdapterUnavailable, APIError, EngineUnavailable, UpstreamError
from gateway.metrics import Metrics
from gateway.residency import Residency
from gateway.routing import Route

log = logging.getLogger("loragate.placement")

SPREAD_MARGIN = 4
"""How many more in-flight requests a holder may have than the least busy replica before spreading."""
REFUSED_S = 30.0
"""How long an adapter vLLM refused to load (4xx) is not asked for again by this process: each try would take the
replica's lock and make room for it first, evicting another tenant's adapter."""
FAILED_S = 10.0
"""The same, on that replica, for a load vLLM failed (5xx): it may pass later, but if the adapter is at fault (an
exception of vLLM's parser that is no ValueError) each try evicted an adapter, on every replica."""


class Placement:
    def __init__(
        self,
        pool: ReplicaPool,
        sessions: EngineSessions,
        registry: Registry,
        metrics: Metrics,
        residency: Residency,
        pinned: frozenset[str] = frozenset(),
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._sessions = sessions
        self._metrics = metrics
        self._residency = residency
        self.capacity = residency.capacity
        self.pinned = set(pinned)
        self._loading: dict[tuple[Replica, int, str], asyncio.Future[None]] = {}
        self._slots: defaultdict[Replica, asyncio.Lock] = defaultdict(asyncio.Lock)
        """One load at a time per replica, so making room and loading never overshoot capacity."""
        self._refused: dict[str, float] = {}
        """Upstream name (or "name replica-url", a failed load) -> until when a load is not tried again (there)."""

    async def acquire(self, route: Route, exclude: frozenset[Replica] = frozenset()) -> Replica:
        """A replica ready to serve `route`; the adapter stays protected from eviction until `release`.

        A replica that fails to load the adapter is skipped for another one; the error of the last
        attempt is raised only when no replica is left.
        """
        if route.adapter_path is None:
            return self._pool.pick(exclude)
        tried = set(exclude)
        failure: EngineUnavailable | UpstreamError | None = None
        while True:
            try:
                replica = self._choose(route.upstream_model, frozenset(tried))
            except EngineUnavailable:
                if failure is not None:
                    raise failure from None
                raise
            try:
                await self._ensure_loaded(replica, route)
            except (EngineUnavailable, UpstreamError) as exc:
                failure = exc
                tried.add(replica)
                continue
            replica.in_use[route.upstream_model] += 1
            return replica

    def release(self, replica: Replica, route: Route) -> None:
        """The request has reached vLLM (which keeps its adapter for it even if unloaded now)."""
        if route.adapter_path is not None:
            replica.in_use[route.upstream_model] -= 1
            if replica.in_use[route.upstream_model] <= 0:
                del replica.in_use[route.upstream_model]

    def _holds(self, replica: Replica, name: str) -> bool:
        return name in replica.resident or (replica, replica.generation, name) in self._loading

    def _refuse(self, name: str, seconds: float) -> None:
        """Not asked for again for `seconds`; refusals past theirs leave the map (a name never asked for again too)."""
        now = time.monotonic()
        self._refused = {other: until for other, until in self._refused.items() if until > now}
        self._refused[name] = now + seconds

    def _choose(self, name: str, exclude: frozenset[Replica]) -> Replica:
        healthy = self._pool.healthy(exclude)
        if not healthy:
            raise EngineUnavailable("No inference engine is available right now; try again shortly.")
        least_busy = min(healthy, key=lambda r: r.inflight)
        holders = [r for r in healthy if self._holds(r, name)]
        if holders:
            best = min(holders, key=lambda r: r.inflight)
            if best.inflight - least_busy.inflight <= SPREAD_MARGIN:
                return best
        return least_busy

    async def _ensure_loaded(self, replica: Replica, route: Route) -> None:
        name = route.upstream_model
        if name in replica.resident:
            replica.resident.pop(name)
            replica.resident[name] = None
            self._residency.note_use(replica.url, name)
            return
        key = (replica, replica.generation, name)
        future = self._loading.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(replica, route))
            self._loading[key] = future
            future.add_done_callback(lambda _: self._loading.pop(key, None))
        await asyncio.shield(future)

    async def _post(self, replica: Replica, path: str, payload: dict[str, str]) -> tuple[int, str]:
        """A load or an unload. One that met a pooled connection closed under it (a load after a lull) is sent again,
        once, on a new connection (`gateway.engine.sessions`; a load of an adapter vLLM holds is taken as done)."""
        try:
            try:
                return await self._send(self._sessions.pooled, replica.url + path, payload)
            except aiohttp.ClientError as exc:
                if not stale(exc):
                    raise
                log.info("%s on %s met a closed connection (%s); sent again", path, replica.url, exc)
                self._metrics.upstream_resent.labels(replica.url).inc()
            return await self._send(self._sessions.fresh, replica.url + path, payload)
        except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
            # Slow, not gone (a load waits for generation steps); the health check decides about "down".
            log.warning("%s on %s took too long: %r", path, replica.url, exc)
            raise EngineUnavailable("The engine took too long to load or unload an adapter; try again.") from exc
        except aiohttp.ClientError as exc:
            log.warning("%s on %s failed: %s", path, replica.url, exc)
            replica.mark_down()
            raise EngineUnavailable("The engine could not be reached to load or unload an adapter.") from exc

    @staticmethod
    async def _send(session: aiohttp.ClientSession, url: str, payload: dict[str, str]) -> tuple[int, str]:
        async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=120, sock_connect=5)) as resp:
            return resp.status, await resp.text()

    async def _load(self, replica: Replica, route: Route) -> None:
        name = route.upstream_model
        assert route.adapter is not None
        started, generation = time.perf_counter(), replica.generation
        here = f"{name} {replica.url}"
        if max(self._refused.get(name, 0.0), self._refused.get(here, 0.0)) > time.monotonic():
            raise UpstreamError(f"The engine could not load adapter `{route.requested}`.")  # no room made for it
        try:
            await asyncio.to_thread(self._registry.verify_once, route.adapter)
        except (IntegrityError, OSError) as exc:
            self._metrics.adapter_loaded(name, "integrity_error")
            log.error("refusing to load %s: %s", name, exc)
            raise AdapterUnavailable(
                f"Adapter `{route.requested}` failed its integrity check and was not loaded."
            ) from exc
        async with self._slots[replica], self._residency.exclusive(replica.url):
            if not replica.healthy or replica.generation != generation:  # went down while this load waited its turn
                raise EngineUnavailable("The engine went away before the adapter could be loaded.")  # (another then)
            await self._refresh(replica)
            if name not in replica.resident:
                await self._make_room(replica)
                status, text = await self._post(
                    replica, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(route.adapter_path)}
                )
                if status != 200 and "already been loaded" not in text:
                    self._metrics.adapter_loaded(name, "error")
                    log.error("loading %s on %s failed (%s): %s", name, replica.url, status, text[:500])
                    if 400 <= status < 500:  # the adapter's fault: every replica would refuse it
                        self._refuse(name, REFUSED_S)
                    else:  # this replica's, or the adapter's: the others are tried
                        self._refuse(here, FAILED_S)
                    raise UpstreamError(f"The engine could not load adapter `{route.requested}`.")
                replica.resident[name] = None
                await self._residency.loaded_now(replica.url, name)
            self._residency.note_use(replica.url, name)
        self._metrics.adapter_loaded(name, "ok", time.perf_counter() - started)

    async def _make_room(self, replica: Replica) -> None:
        """Unload least recently used adapters; pinned ones and those of requests on their way stay.

        When nothing can go, vLLM's own LRU of `--max-cpu-loras` keeps its memory bounded.
        """
        while len(replica.resident) >= self.capacity:
            keep = self.pinned | set(replica.in_use)
            victims = await self._residency.evictable(replica.url, list(replica.resident), keep)
            if not victims:
                return
            self._metrics.adapter_evictions.labels(replica.url).inc()
            await self._unload(replica, victims[0])

    async def _refresh(self, replica: Replica) -> bool:
        """Bring this process's view of the replica in line with what vLLM says it holds (other gateway
        processes load and evict too), keeping the local LRU order of what is still there. False when vLLM
        could not say: the view is this process's alone."""
        truth = await self._residency.loaded(replica.url)
        if truth is None:
            return False
        held = set(truth)
        for gone in [name for name in replica.resident if name not in held]:
            replica.resident.pop(gone)
            self._residency.forget(replica.url, gone)  # this process's uses of it go too: nothing grows unbounded
        arrived = [name for name in truth if name not in replica.resident]
        replica.resident = dict.fromkeys([*arrived, *replica.resident])
        return True

    async def _unload(self, replica: Replica, name: str) -> None:
        replica.resident.pop(name, None)
        self._residency.forget(replica.url, name)
        status, text = await self._post(replica, "/v1/unload_lora_adapter", {"lora_name": name})
        if status != 200 and status != 404:
            log.warning("unloading %s from %s answered %s: %s", name, replica.url, status, text[:300])

    def forget(self, replica: Replica, name: str) -> None:
        replica.resident.pop(name, None)
        self._residency.forget(replica.url, name)

    async def maintain(self, hot: list[Route]) -> None:
        """Unload versions deleted from the store (by any process); keep hot adapters loaded and pinned.

        One replica or adapter that fails does not stop the others from being looked after.
        """
        hot = [route for route in hot if route.adapter_path is not None]
        self.pinned = {route.upstream_model for route in hot}
        for replica in self._pool.healthy():
            await self._refresh(replica)
            for name in await asyncio.to_thread(self._deleted, list(replica.resident)):
                await self._unload(replica, name)
                self._registry.forget(name)
            for route in hot:
                try:
                    await self._ensure_loaded(replica, route)
                except APIError as exc:
                    log.warning("keeping %s loaded on %s: %s", route.upstream_model, replica.url, exc.message)
        await self._residency.flush_uses()

    async def share_uses(self) -> None:
        """Share this process's adapter uses now (also done at the end of each maintenance round)."""
        await self._residency.flush_uses()

    def _deleted(self, names: list[str]) -> list[str]:
        return [name for name in names if self._registry.deleted(name)]

    async def unload_deleted(self, names: Iterable[str]) -> None:
        """`unload_everywhere` for versions already deleted; one that cannot be unloaded now (a replica failing, Redis
        away) is left to the gateways' maintenance, which unloads deleted versions in time."""
        for name in names:
            try:
                await self.unload_everywhere(name)
            except (APIError, RedisError) as exc:
                log.warning("%s deleted, but not unloaded everywhere yet: %r", name, exc)

    async def unload_everywhere(self, name: str) -> None:
        """Used when an adapter version is deleted: no replica may keep serving it."""
        for replica in self._pool.replicas:
            if replica.healthy:
                async with self._residency.exclusive(replica.url):
                    # Not known to be there when vLLM cannot list what it holds: another process may have loaded
                    # it, so the unload is asked all the same (an adapter it does not hold answers 404).
                    if not await self._refresh(replica) or name in replica.resident:
                        await self._unload(replica, name)
            replica.resident.pop(name, None)
        await self._residency.forget_everywhere([replica.url for replica in self._pool.replicas], name)
        self._registry.forget(name)
