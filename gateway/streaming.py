"""Relaying vLLM's server-sent events to the client, event by event, and noticing clients that leave.

Events are passed on whole, as vLLM wrote them, but for three rewrites: the `"model"` of an adapter
becomes the name the tenant knows it by, an error event loses vLLM's own text (which names engine
internals), and the usage chunk the gateway asked for (not the client) is dropped. vLLM puts its
`system_fingerprint` on the chunks that end choices, or on the usage chunk alone when it is asked for
usage: so a stream whose usage is dropped holds each chunk that ends a choice (its last) until the usage
chunk, which vLLM sends once every choice has ended, and passes them on with its fingerprint, as vLLM
would have sent them to this client (with `n` > 1, a choice's last chunk waits for the other choices).
As events pass, the answer is assembled into the request's context (text, finish reasons, usage), and how the
stream ended is noted: done, failed upstream, or cancelled by a client that left.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.answer import Answer, parse_chunk
from gateway.context import CLIENT_CLOSED
from gateway.engine.http1 import EngineResponse
from gateway.errors import (
    APIError,
    EngineFailed,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    engine_refusal,
    sse_error_event,
    sse_error_frame,
)

log = logging.getLogger("loragate.streaming")

ERROR_EVENT = b'data: {"error"'
DONE_EVENT = b"data: [DONE]"
USAGE_ONLY = b'"choices":[],"usage":{'
"""How vLLM's final usage chunk reads, in a stream asked for `include_usage`."""
T = TypeVar("T")


def _ends(events: bytes) -> bool:
    """Whether whole SSE `events` hold the `[DONE]` terminator as an event of its own (not inside a token's text,
    where a JSON string holds it quoted: `"content":"data: [DONE]"`)."""
    return events.startswith(DONE_EVENT) or b"\n\n" + DONE_EVENT in events


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work for it was cancelled."""


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await `work` in this task, cancelling it (which closes its upstream connection, so vLLM aborts the
    generation) if the client disconnects first. Only for requests whose body has been read in full.

    One watcher task waits for the disconnect and cancels this one; the cancellation can only land in
    `work`, at one of its awaits, as the watcher runs only while this task waits there."""
    current = asyncio.current_task()
    assert current is not None
    gone, cancelling = False, current.cancelling()

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == cancelling:
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


def client_error(event: bytes) -> APIError:
    """vLLM's in-stream error event, as the client may see it: a request problem keeps its (redacted)
    message, an engine failure becomes a plain server error."""
    try:
        error = json.loads(event.removeprefix(b"data: "))["error"]
        status = int(error.get("code") or 500)
        message = str(error["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        status, message = 500, ""
    if 400 <= status < 500 and message:
        return engine_refusal(message, error.get("param"))  # as a refusal that is not streamed
    return UpstreamError("The engine failed in the middle of the response.")


FIRST_EVENT_BYTES = 1 << 20
"""Read this much at most looking for a stream's first event (a body that is not one is left to the relay)."""


async def refused_at_start(upstream: EngineResponse, timeout_s: float) -> APIError | None:
    """vLLM answers a stream it cannot start (a `json_schema` that does not compile, a `stop_token_ids` past the
    vocabulary) with 200 and an error event before any token. Its first event is read (then put back) so that such
    a refusal is answered as without streaming, and as OpenAI does: 400 (502 for an engine failure), not an event of
    a stream; an engine silent until the read timeout, 504; one gone before its first event, 502. A failure after
    part of the first event came is left to the relay (its error event ends what was sent)."""
    seen = b""
    try:
        while b"\n\n" not in seen and len(seen) < FIRST_EVENT_BYTES and (data := await upstream.content.read(1 << 16)):
            seen += data
    except TimeoutError:  # aiohttp's socket timeout is one
        if not seen:
            return UpstreamTimeout(f"The engine sent nothing for {timeout_s:g} s; the request was abandoned.")
    except aiohttp.ClientError:
        if not seen:
            return EngineFailed("The engine stopped before the response started.")
    upstream.unread(seen)
    if not seen.startswith(ERROR_EVENT):
        return None
    refused = client_error(seen.partition(b"\n\n")[0])
    return refused if isinstance(refused, InvalidRequest) else EngineFailed("The engine failed to start the answer.")


def client_error_event(event: bytes) -> bytes:
    return sse_error_event(client_error(event))


def _ends_a_choice(chunk: dict[str, Any] | None) -> bool:
    """Whether a stream chunk ends a choice (a finish reason) and bears no fingerprint of its own."""
    if chunk is None or "system_fingerprint" in chunk or not isinstance(chunk.get("choices"), list):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") for c in chunk["choices"])


class RelayResponse(StreamingResponse):
    """A stream that always closes its upstream, whether it ends, fails or the client goes away.

    Closing (not releasing) the upstream connection is what makes vLLM abort the generation.
    `on_first()` is called when the first event that carries a choice passes (see `_feed`).
    `on_close(status)` is called once: 200 (done), 400 (vLLM refused it in the stream), 502 (the engine
    failed), 504 (it was silent for the read timeout) or 499 (the client left).
    """

    def __init__(
        self,
        upstream: EngineResponse,
        answer: Answer,
        on_first: Callable[[], None],
        on_close: Callable[[int], None],
        rename: tuple[bytes, bytes] | None = None,
        hide_usage: bool = False,
    ) -> None:
        self._upstream = upstream
        self._answer = answer
        self._on_first = on_first
        self._on_close = on_close
        self._rename = rename
        self._hide_usage = hide_usage
        self._outcome = 200
        self._done = False
        self._held: list[tuple[bytes, dict[str, Any]]] = []
        """Chunks that ended a choice (each event and its chunk), held back until the usage chunk (with
        `hide_usage`): taken into the answer only when passed on, so that a client that leaves meanwhile is
        recorded with what it got."""
        self._before_first = True
        """No event with a choice has passed yet (`_feed`)."""
        super().__init__(self._relay(), status_code=200, media_type="text/event-stream")

    def _feed(self, event: bytes) -> dict[str, Any] | None:
        """One `data: {...}` event into the answer, as it is passed on; the chunk, parsed."""
        chunk = self._answer.feed(event[6:])
        self._passed(chunk)
        return chunk

    def _passed(self, chunk: dict[str, Any] | None) -> None:
        """The first chunk with a choice passed on is the first token: not just any event, as vLLM may send an error
        event in place of any token (a `json_schema` it cannot compile). Such a stream must end as one without a
        first token, so that its quota reservation is given back (as without streaming) and it has no time to first
        token, in the log or the metrics."""
        if self._before_first and chunk is not None and chunk.get("choices"):
            self._before_first = False
            self._on_first()

    def _take(self, chunk: dict[str, Any] | None) -> None:
        """A chunk parsed apart (`_client_event`) into the answer, as it is passed on."""
        if chunk is not None and self._answer.take(chunk):
            self._passed(chunk)

    def _pass_on(self, events: bytes) -> bytes:
        if self._rename is not None:
            events = events.replace(*self._rename)
        if not self._hide_usage and ERROR_EVENT not in events:
            for event in events.split(b"\n\n"):
                if event.startswith(b"data: {"):
                    self._feed(event)
            return events
        return b"".join(self._client_event(e) for e in events.split(b"\n\n") if e)

    def _client_event(self, event: bytes) -> bytes:
        """One whole event as the client gets it: an engine error rewritten; a usage chunk it did not ask for
        dropped (the gateway asked for it, to settle the quota and log the usage), its `system_fingerprint` put on
        the chunks that ended choices, each held back until then (`_held`)."""
        chunk = parse_chunk(event[6:]) if event.startswith(b"data: {") else None
        if self._hide_usage and chunk is not None and _ends_a_choice(chunk):
            self._held.append((event, chunk))
            return b""
        self._take(chunk)
        if event.startswith(ERROR_EVENT):
            error = client_error(event)
            self._outcome = 502 if error.status >= 500 else error.status
            return self._release(None) + sse_error_event(error)
        if self._hide_usage and USAGE_ONLY in event:
            return self._release(chunk.get("system_fingerprint") if chunk is not None else None)
        return self._release(None) + event + b"\n\n" if event.startswith(DONE_EVENT) else event + b"\n\n"

    def _release(self, fingerprint: object) -> bytes:
        """The chunks held since they ended their choices, stamped with `fingerprint` (vLLM's, from the usage
        chunk; as vLLM stamps them when it is not asked for usage), and taken into the answer as they go."""
        if not self._held:
            return b""
        held, self._held = self._held, []
        stamp = b',"system_fingerprint":' + json.dumps(fingerprint).encode() + b"}" if fingerprint else b""
        for _, chunk in held:
            self._take(chunk)
        return b"".join(
            (event[:-1] + stamp if stamp and event.endswith(b"}") else event) + b"\n\n" for event, _ in held
        )

    async def _relay(self) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for chunk in self._upstream.content.iter_any():
                pending += chunk
                cut = pending.rfind(b"\n\n") + 2
                if cut >= 2:
                    whole, pending = pending[:cut], pending[cut:]
                    # A client may hang up as soon as it has `[DONE]`, before vLLM's stream ends:
                    # the answer is whole then, so it is not a cancellation.
                    self._done = self._done or _ends(whole)
                    yield self._pass_on(whole)
            if pending and _ends(pending):  # `[DONE]` without its blank line: whole all the same
                self._done = True
                yield self._pass_on(pending + b"\n\n")
            if not self._done:  # ended as complete (a proxy that closed it so), but cut short: no `[DONE]` came
                raise aiohttp.ClientPayloadError("the stream ended before its [DONE]")
        except (TimeoutError, aiohttp.ClientError) as exc:
            if self._done:  # it broke after `[DONE]`: the answer is whole, and the client has its terminator
                log.info("upstream stream closed uncleanly after its end: %s", exc)
            else:
                log.warning("upstream stream broke: %r", exc)
                error: APIError = UpstreamError("The engine stopped in the middle of the response.")
                if isinstance(exc, TimeoutError):  # aiohttp's socket timeout is one: silent, not gone (a 504)
                    error = UpstreamTimeout(
                        "The engine sent nothing for the read timeout in the middle of the response."
                    )
                self._outcome, self._done = error.status, True
                # Only whole events were passed on (a piece of one is not), so the error arrives as an event of its
                # own: the client knows the answer is cut short, where the end of a body left it looking complete.
                yield self._release(None) + sse_error_frame(error)
        if self._held:  # the stream ended without its usage chunk
            yield self._release(None)
        self._done = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._upstream.close()
            self._on_close(self._outcome if self._done else CLIENT_CLOSED)
