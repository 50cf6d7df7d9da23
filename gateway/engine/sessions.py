"""The gateway's HTTP sessions to its engines: the completion requests' own client (gateway.engine.http1), and two
aiohttp sessions for the rest (adapter loads, listings, health checks): one that keeps idle connections, and one
that opens a new connection for each request, for a call sent again after it met a pooled connection closed under it.

vLLM (uvicorn) closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). The gateway keeps one idle for
less (`keepalive_s`), which makes a clash rarer but cannot rule it out: the gateway dates a connection's idling from
when it got to the end of the answer, the engine from when it wrote it, and the two part under load (or behind a slow
stream's client). A request after a lull can then meet a connection the engine has just closed ("Server
disconnected", or a body it could not write), which the engine never ran. Other pooled connections idled as long may
have gone too (a CI run's burst met that on both replicas at once), so a request is sent again on a new connection,
never on another pooled one, and a healthy engine is not taken out for it.
"""

from __future__ import annotations

import aiohttp

from gateway.engine.http1 import EngineClient


def stale(exc: BaseException) -> bool:
    """Whether a failed request met a connection closed or reset under it before any answer: not a refused or
    timed-out connect (an engine that is down), nor a disconnect after part of an answer (the request ran)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)  # else the part of an answer it had read
    closed = isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientConnectionResetError)
    return closed and not isinstance(exc, aiohttp.ClientConnectorError)


class EngineSessions:
    """Every HTTP client of one gateway process to its engines, closed together."""

    def __init__(self, keepalive_s: float) -> None:
        pooled = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s, ttl_dns_cache=300)
        self.pooled = aiohttp.ClientSession(connector=pooled, auto_decompress=False)
        """Loads and listings (aiohttp sends an idempotent one again itself, once, from the pool)."""
        fresh = aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=300)
        self.fresh = aiohttp.ClientSession(connector=fresh, auto_decompress=False)
        """A connection for each request: a load sent again, and health checks (a check on a stale pooled connection
        would take a healthy engine out)."""
        self.engine = EngineClient(keepalive_s)
        """Completion requests (gateway.engine.http1): its connections kept as long, a request sent again on a new
        one (`post(..., fresh=True)`)."""

    async def close(self) -> None:
        try:
            await self.engine.close()
            await self.pooled.close()
        finally:
            await self.fresh.close()
