"""The gateway's HTTP sessions to its engines: one that keeps idle connections, and one that opens a new connection
for each request, for a request sent again after it met a pooled connection closed under it.

vLLM (uvicorn) closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). The gateway keeps one idle for
less (`keepalive_s`), but dates its idling from when its event loop got to the end of the answer, which lags the
engine's clock under load: a request after a lull can meet a connection the engine has just closed ("Server
disconnected", or a body it could not write). Other pooled connections idled as long may have gone too (a CI run's
burst met that on both replicas at once), so a request is sent again on a new connection, never on another pooled
one, and a healthy engine is not taken out for it.
"""

from __future__ import annotations

import aiohttp


def stale(exc: BaseException) -> bool:
    """Whether a failed request met a connection closed or reset under it (not a refused or timed-out connect:
    an engine that is down)."""
    closed = isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
    return closed and not isinstance(exc, aiohttp.ClientConnectorError)


class EngineSessions:
    def __init__(self, keepalive_s: float) -> None:
        pooled = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s, ttl_dns_cache=300)
        self.pooled = aiohttp.ClientSession(connector=pooled, auto_decompress=False)
        """Requests, loads and listings (aiohttp sends an idempotent one again itself, once, from the pool)."""
        fresh = aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=300)
        self.fresh = aiohttp.ClientSession(connector=fresh, auto_decompress=False)
        """A connection for each request: one sent again, and health checks (a check on a stale pooled connection
        would take a healthy engine out)."""

    def pick(self, fresh: bool) -> aiohttp.ClientSession:
        return self.fresh if fresh else self.pooled

    async def close(self) -> None:
        await self.pooled.close()
        await self.fresh.close()
