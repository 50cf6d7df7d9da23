"""Forwarding a validated request to a vLLM replica and answering with what it says.

The request body is parsed once (for validation and routing) and re-serialised only with the
upstream model name; answers are passed through without parsing, except error bodies: a client
sees vLLM's message for a request problem (4xx, internals redacted) and never for an engine failure.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pydantic_core
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.context import CLIENT_CLOSED, RequestContext
from gateway.engine.http1 import ConnectFailed, EngineResponse
from gateway.engine.pool import Replica, ReplicaPool
from gateway.engine.sessions import EngineSessions, stale
from gateway.errors import (
    AdapterUnavailable,
    EngineFailed,
    EngineUnavailable,
    UpstreamError,
    UpstreamTimeout,
    engine_refusal,
)
from gateway.metrics import Metrics
from gateway.placement import Placement
from gateway.routing import Route
from gateway.streaming import ClientGone, RelayResponse, refused_at_start, unless_disconnected

log = logging.getLogger("loragate.serving")


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def client_error_body(status: int, raw: bytes) -> bytes:
    """vLLM's answer to a request it refused (4xx), in OpenAI's envelope, with internals redacted."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict) or not error.get("message"):
        error = {"message": f"The engine refused the request (HTTP {status})."}
    body = engine_refusal(str(error["message"]), error.get("param")).body()
    body["error"]["type"] = _error_type(status)
    body["error"]["code"] = error.get("code") if isinstance(error.get("code"), str) else None
    return json.dumps(body).encode()


_DECODER = json.JSONDecoder()
"""Stateless: one for every answer (building one costs more than decoding a usage object)."""
RESEND_WITHIN_S = 3.0
"""A post that fails this soon after it was sent, on a connection closed under it, is sent again (`_closed_as_sent`):
seconds, as a gateway whose event loop lags under load notices a closed connection late."""


def usage_of(raw: bytes) -> dict[str, Any] | None:
    """The usage object of a whole (non-stream) answer, decoded from where it starts: an answer of many
    choices can be megabytes, which are not parsed in the event loop just for this."""
    at = raw.rfind(b'"usage":')
    if at < 0:
        return None
    try:
        usage, _ = _DECODER.raw_decode(raw[at + 8 :].decode().lstrip())
    except (ValueError, UnicodeDecodeError):
        return None
    return usage if isinstance(usage, dict) else None


_OVER_CONTEXT = re.compile(rb"maximum context length|max_model_len")
"""How vLLM refuses a `max_tokens` the context cannot hold (0.27: "This model's maximum context length is ...
you requested 2048 output tokens"; 0.32: "max_tokens=2048 cannot be greater than max_model_len=1024")."""


def _may_have_run(exc: BaseException) -> bool:
    """Whether a failed post may have reached its replica (not a refused or timed-out connection)."""
    return not isinstance(exc, ConnectFailed)


@dataclass
class Call:
    """One request on its way to a replica, and what to do when it is answered."""

    route_name: str
    """"chat" or "completions"."""
    path: str
    payload: dict[str, Any]
    route: Route
    request_id: str
    stream: bool
    receive: Receive
    context: RequestContext
    on_finish: Callable[[RequestContext], None] = lambda context: None
    """Called once, when the request has ended (its context then says how)."""
    hide_usage: bool = False
    """The stream's usage chunk was asked of vLLM by the gateway, not the client: it is not passed on."""
    capped_by_default: bool = False
    """`max_tokens` is the gateway's cap, sent for a chat request that named no limit (see `Forwarder._sent`)."""


class Forwarder:
    def __init__(
        self,
        sessions: EngineSessions,
        pool: ReplicaPool,
        placement: Placement,
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self._sessions = sessions
        self._pool = pool
        self._placement = placement
        self._metrics = metrics
        self._read_timeout_s = timeout_s
        """How long the engine may send nothing (before its answer's head, or in its body)."""

    def _track(self, replica: Replica, delta: int) -> None:
        replica.inflight += delta

    async def _post(
        self, replica: Replica, path: str, body: bytes, request_id: str, fresh: bool = False
    ) -> EngineResponse:
        try:
            # identity (in every request's head): answers are relayed as they come, so a compressing proxy before the
            # engine must not compress them
            return await self._sessions.engine.post(replica.url + path, body, request_id, self._read_timeout_s, fresh)
        except aiohttp.SocketTimeoutError as exc:
            # The replica is alive but silent (a long generation): replaying it elsewhere would not help.
            self._metrics.upstream_errors.labels(replica.url).inc()
            raise UpstreamTimeout(
                f"The engine sent nothing for {self._read_timeout_s:.0f} s; the request was abandoned."
            ) from exc

    async def _discard(self, replica: Replica, upstream: EngineResponse) -> None:
        """A failed answer: logged (never shown to the client), its connection closed, its request untracked."""
        self._metrics.upstream_errors.labels(replica.url).inc()
        try:
            raw = await upstream.content.read(2000)
            log.warning("replica %s answered %s: %s", replica.url, upstream.status, raw)
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            upstream.close()
            self._track(replica, -1)

    def _abandon(self, replica: Replica, upstream: EngineResponse) -> None:
        """An answer left unread, as its reading failed or was cancelled (the client left): its connection closed,
        so that vLLM aborts the request, and the request untracked, or its replica would look busier for good."""
        upstream.close()
        self._track(replica, -1)

    async def _send(
        self, call: Call, body: bytes, failed: frozenset[Replica] = frozenset()
    ) -> tuple[Replica, EngineResponse]:
        """Post to a replica, moving to another one when a replica cannot be reached, has lost the
        adapter, or fails because its engine died (vLLM then answers 5xx and fails its health check).

        The request counts as in flight on its replica from before it is sent (vLLM answers a
        non-streaming request only when it is done), until `forward` finishes it. `failed`: a replica that failed
        this request already (a stream's, before its first event: `_open`), which counts as one lost.
        """
        route = call.route
        tried: set[Replica] = set(failed)
        reloaded = resent = False
        lost = len(failed)
        """Failures after the request may have reached a replica: it is sent to one more replica, no more (a request
        that makes engines fail must not take every replica down in turn)."""
        while True:
            try:
                replica = await self._placement.acquire(route, exclude=frozenset(tried))
            except EngineUnavailable:
                # it took the last replica able to serve down: told as its failure, not retried (not a healthy
                # replica's refusal to load an adapter now, which a retry may find done)
                if lost and not self._pool.healthy(frozenset(tried)):
                    raise EngineFailed("The engine failed while processing the request.") from None
                raise
            self._track(replica, +1)
            sent_at = time.monotonic()
            try:
                upstream = await self._post(replica, call.path, body, call.request_id, fresh=resent)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                self._track(replica, -1)
                if not resent and await self._closed_as_sent(replica, exc, sent_at):
                    log.info("replica %s closed the connection of request %s; sent again", replica.url, call.request_id)
                    self._metrics.upstream_resent.labels(replica.url).inc()
                    resent = True
                    continue
                self._metrics.upstream_errors.labels(replica.url).inc()
                log.warning("replica %s unreachable: %s", replica.url, exc)
                replica.mark_down()
                tried.add(replica)
                lost += _may_have_run(exc)
                if lost > 1:
                    raise EngineFailed("The engine failed while processing the request.") from exc
                continue
            except BaseException:
                self._track(replica, -1)
                raise
            finally:
                self._placement.release(replica, route)
            if upstream.status >= 500:
                await self._discard(replica, upstream)
                if not await self._pool.check(replica) and (lost := lost + 1) < 2:
                    log.warning("replica %s failed a request and its health check: taken out", replica.url)
                    tried.add(replica)
                    continue
                raise EngineFailed("The engine failed while processing the request.")
            if upstream.status == 404 and route.adapter_path is not None:
                self._track(replica, -1)
                upstream.release()
                if reloaded:
                    raise AdapterUnavailable(f"Adapter `{route.requested}` could not be kept loaded; try again.")
                # The replica lost the adapter (another gateway evicted it, or vLLM restarted): load it again, once.
                self._placement.forget(replica, route.upstream_model)
                reloaded = True
                continue
            return replica, upstream

    async def _closed_as_sent(self, replica: Replica, exc: BaseException, sent_at: float) -> bool:
        """Whether a failed post met a connection closed as it was sent (a pooled one the replica, or a proxy before
        it, closed for idling: "Server disconnected", or a reset) by a replica that is up: not a failure of the
        replica, and the request is sent again, once, on a new connection. One that fails later may have run (a
        generation cut by a proxy's time limit): it is not run again on the same replica."""
        if not stale(exc) or time.monotonic() - sent_at > RESEND_WITHIN_S:
            return False
        return await self._pool.check(replica) or replica.healthy  # a check left unanswered: still up (pool)

    async def forward(self, call: Call) -> Response:
        """Answer the request from a replica. A request whose client disconnects before its answer (a stream's:
        before its first event) is cancelled, closing its upstream connection so that vLLM aborts the generation."""
        call.payload["model"] = call.route.upstream_model
        body = call.context.sent = pydantic_core.to_json(call.payload)
        try:  # a stream too, until its answer starts: a client gone while its adapter loads is not sent on
            response = await unless_disconnected(self._open(call, body), call.receive)
        except ClientGone:
            call.context.finish(CLIENT_CLOSED)
            call.on_finish(call.context)
            return Response(status_code=CLIENT_CLOSED)
        return response

    def _finisher(self, call: Call, replica: Replica) -> Callable[[int], None]:

        def finish(status: int) -> None:
            self._track(replica, -1)
            if status in (502, 504):  # the engine failed (cut, its error event) or was silent: the replica's error
                self._metrics.upstream_errors.labels(replica.url).inc()
                call.context.finish(status, UpstreamError.code if status == 502 else UpstreamTimeout.code)
            else:
                call.context.finish(status, _error_type(status) if status >= 400 else None)
            call.on_finish(call.context)

        return finish

    async def _sent(
        self, call: Call, body: bytes, failed: frozenset[Replica] = frozenset()
    ) -> tuple[Replica, EngineResponse]:
        """`_send`, and once more without `max_tokens` when it was the gateway's cap (the client named no limit) and
        the engine refuses it for the context: vLLM counts a named limit against the prompt's room (prompt plus
        `max_tokens` must fit), where without one it generates what the context has left. That is below the cap
        whenever the cap did not fit, so the cap still holds, and the client gets what vLLM alone would give."""
        replica, upstream = await self._send(call, body, failed)
        if upstream.status != 400 or not call.capped_by_default:
            return replica, upstream
        try:
            raw = await upstream.read()  # kept: read again where it is passed on
        except (TimeoutError, aiohttp.ClientError):
            return replica, upstream  # `_open` reads it again, fails alike and finishes the request (502)
        except BaseException:  # cancelled (the client left) or unexpected: nothing after this untracks it
            self._abandon(replica, upstream)
            raise
        if not _OVER_CONTEXT.search(raw):
            return replica, upstream
        upstream.release()
        self._track(replica, -1)
        call.payload.pop("max_tokens", None)
        call.capped_by_default = False
        body = call.context.sent = pydantic_core.to_json(call.payload)
        return await self._send(call, body, failed)

    async def _open(self, call: Call, body: bytes, failed: frozenset[Replica] = frozenset()) -> Response:
        replica, upstream = await self._sent(call, body, failed)
        finish = self._finisher(call, replica)
        context = call.context
        if upstream.status == 200 and upstream.content_type == "text/event-stream":
            try:
                refused = await refused_at_start(upstream, self._read_timeout_s)
            except BaseException:  # cancelled: the client left (`forward` counts it)
                self._abandon(replica, upstream)
                raise
            try:
                gone = isinstance(refused, EngineFailed) and not failed and not await self._pool.check(replica)
            except BaseException:  # cancelled while its replica is checked (the client left)
                self._abandon(replica, upstream)
                raise
            if gone:
                # its engine died before the first event (vLLM sends a stream's head first): nothing was sent to the
                # client yet, so it goes to one more replica, as an unstreamed request whose engine died does
                self._abandon(replica, upstream)
                self._metrics.upstream_errors.labels(replica.url).inc()
                log.warning("replica %s failed a stream before it began, and its health check: taken out", replica.url)
                return await self._open(call, call.context.sent or body, frozenset({replica}))  # as last sent
            if refused is not None:
                upstream.close()
                finish(refused.status)
                raise refused
            rename = call.route.model_rename
            return RelayResponse(upstream, context.answer, context.first_token, finish, rename, call.hide_usage)
        try:
            raw = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            upstream.close()
            finish(502)
            raise EngineFailed("The engine stopped in the middle of the response.") from exc
        except BaseException:  # cancelled: the client left (`forward` counts it)
            self._abandon(replica, upstream)
            raise
        upstream.release()
        status = upstream.status
        if status >= 400:
            finish(status)
            return Response(client_error_body(status, raw), status_code=status, media_type="application/json")
        context.answer.body, context.answer.usage = raw, usage_of(raw)
        if call.route.model_rename is not None:
            raw = raw.replace(*call.route.model_rename, 1)
        return AnswerResponse(raw, status, finish)


class AnswerResponse(Response):
    """A whole answer, whose request is finished (quota settled, metrics, the completion log) once it is sent: the
    client does not wait for that. Finished all the same if sending fails or is cancelled, or if the response is
    dropped unsent (when it is freed), and only once."""

    def __init__(self, content: bytes, status: int, finish: Callable[[int], None]) -> None:
        self._finish: Callable[[int], None] | None = finish
        super().__init__(content, status_code=status, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finished()

    def _finished(self) -> None:
        finish, self._finish = self._finish, None
        try:
            if finish is not None:
                finish(getattr(self, "status_code", 500))  # 500: dropped half-built
        except Exception:  # the answer is sent (or its sending failed: that error is the one to raise)
            log.exception("finishing an answered request failed")

    def __del__(self) -> None:
        self._finished()
