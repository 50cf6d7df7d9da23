"""Forwarding a validated request to vLLM and relaying its answer, streams byte for byte.

The request body is parsed once (for validation and routing) and re-serialised only with the
upstream model name; responses are passed through without parsing, except the small tail of a
stream (for usage) and error bodies (to normalise them to OpenAI's envelope).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pydantic_core
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.engine.pool import Replica
from gateway.errors import AdapterUnavailable, UpstreamError, UpstreamTimeout, sse_error_frame
from gateway.metrics import Metrics
from gateway.placement import Placement
from gateway.routing import Route

log = logging.getLogger("loragate.serving")

TAIL_BYTES = 4096


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def normalise_error(status: int, raw: bytes) -> bytes:
    """vLLM's error bodies use its own type names; clients get OpenAI's, and never a traceback."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return json.dumps(UpstreamError(f"The engine answered with HTTP {status}.").body()).encode()
    message = str(error.get("message") or f"The engine answered with HTTP {status}.")
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": _error_type(status),
                "param": error.get("param"),
                "code": error.get("code") if isinstance(error.get("code"), str) else None,
            }
        }
    ).encode()


def usage_from_tail(tail: bytes) -> dict[str, Any] | None:
    """The usage object of the last stream chunk that carries one, if any."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                usage = json.loads(line[6:]).get("usage")
            except ValueError:
                return None
            return usage if isinstance(usage, dict) else None
    return None


class RelayResponse(StreamingResponse):
    """A stream that always closes its upstream, whether it ends, fails or the client goes away.

    Closing (not releasing) the upstream connection is what makes vLLM abort the generation.
    """

    def __init__(
        self, upstream: aiohttp.ClientResponse, on_close: Callable[[int, dict[str, Any] | None], None]
    ) -> None:
        self._upstream = upstream
        self._on_close = on_close
        self._tail = b""
        self._outcome = 200
        super().__init__(self._relay(), status_code=200, media_type="text/event-stream")

    async def _relay(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.content.iter_any():
                self._tail = (self._tail + chunk)[-TAIL_BYTES:]
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("upstream stream broke: %s", exc)
            self._outcome = 502
            # End a half-sent event first, so the error arrives as an event of its own.
            cut = b"" if not self._tail or self._tail.endswith(b"\n\n") else b"\n\n"
            yield cut + sse_error_frame(UpstreamError("The engine stopped in the middle of the response."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._upstream.close()
            self._on_close(self._outcome, usage_from_tail(self._tail))


class Forwarder:
    def __init__(
        self, session: aiohttp.ClientSession, placement: Placement, metrics: Metrics, timeout_s: float
    ) -> None:
        self._session = session
        self._placement = placement
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_s)

    def _track(self, replica: Replica, delta: int) -> None:
        replica.inflight += delta
        self._metrics.inflight.labels(replica.url).inc(delta)

    async def _send(
        self, path: str, route: Route, body: bytes, request_id: str
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """Post to a replica; a replica that cannot be reached is marked down and another one tried.

        The request counts as in flight on its replica from before it is sent (vLLM answers a
        non-streaming request only when it is done), until `forward` finishes it.
        """
        tried: set[Replica] = set()
        reloaded = False
        while True:
            replica = await self._placement.acquire(route, exclude=frozenset(tried))
            self._track(replica, +1)
            try:
                upstream = await self._session.post(
                    replica.url + path,
                    data=body,
                    headers={"Content-Type": "application/json", "X-Request-Id": request_id},
                    timeout=self._timeout,
                )
            except aiohttp.SocketTimeoutError as exc:
                # The replica is alive but silent (a long generation): replaying it elsewhere would not help.
                self._track(replica, -1)
                self._metrics.upstream_errors.labels(replica.url).inc()
                raise UpstreamTimeout(
                    f"The engine sent nothing for {self._timeout.sock_read:.0f} s; the request was abandoned."
                ) from exc
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                self._track(replica, -1)
                log.warning("replica %s unreachable: %s", replica.url, exc)
                self._metrics.upstream_errors.labels(replica.url).inc()
                replica.mark_down()
                tried.add(replica)
                continue
            except BaseException:
                self._track(replica, -1)
                raise
            finally:
                self._placement.release(replica, route)
            if upstream.status == 404 and route.adapter_path is not None:
                self._track(replica, -1)
                upstream.release()
                if reloaded:
                    raise AdapterUnavailable(f"Adapter `{route.requested}` could not be kept loaded; try again.")
                # The replica lost the adapter (it restarted in between): load it again, once.
                self._placement.forget(replica, route.upstream_model)
                reloaded = True
                continue
            return replica, upstream

    async def forward(
        self, route_name: str, path: str, payload: dict[str, Any], route: Route, request_id: str, stream: bool
    ) -> Response:
        started = time.perf_counter()
        payload["model"] = route.upstream_model
        body = pydantic_core.to_json(payload)
        replica, upstream = await self._send(path, route, body, request_id)

        def finish(status: int, usage: dict[str, Any] | None) -> None:
            self._track(replica, -1)
            self._metrics.requests.labels(route_name, route.upstream_model, str(status)).inc()
            if usage:
                for kind in ("prompt", "completion"):
                    count = usage.get(f"{kind}_tokens")
                    if isinstance(count, int):
                        self._metrics.tokens.labels(route.upstream_model, kind).inc(count)

        if stream and upstream.status == 200:
            self._metrics.duration.labels(route_name).observe(time.perf_counter() - started)
            return RelayResponse(upstream, finish)
        status, usage = 502, None
        try:
            raw = await upstream.read()
            status = upstream.status
            if status >= 400:
                raw = normalise_error(status, raw)
                status = 502 if status >= 500 else status
            elif b'"usage"' in raw:
                usage = json.loads(raw).get("usage")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError("The engine stopped in the middle of the response.") from exc
        except ValueError:
            usage = None
        finally:
            upstream.release()
            finish(status, usage)
        self._metrics.duration.labels(route_name).observe(time.perf_counter() - started)
        return Response(raw, status_code=status, media_type="application/json")
