"""What a forwarded request leaves behind, however it ends: a stream refused before any token gives its quota
reservation back (as the same request without streaming does), and a request whose answer is being read when its
client leaves (or the read fails) closes its upstream and no longer counts as in flight on its replica."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import aiohttp
import pytest

from gateway.context import CLIENT_CLOSED, RequestContext
from gateway.engine.pool import Replica
from gateway.errors import EngineUnavailable, InvalidRequest, UpstreamError, UpstreamTimeout
from gateway.metrics import Metrics
from gateway.routes.openai import _tokens_used
from gateway.routing import Route
from gateway.serving import Call, Forwarder
from gateway.streaming import RelayResponse
from gateway.tenants import Tenant

ROUTE = Route(requested="base", upstream_model="base", served_model="base")
TOKEN = b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
USAGE = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":0,"total_tokens":3}}\n\n'
REFUSED = (
    b'data: {"error":{"object":"error","message":"The provided JSON schema contains features not supported by '
    b'xgrammar.","type":"BadRequestError","param":null,"code":400}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def new_context(stream: bool = True) -> RequestContext:
    context = RequestContext("r1", "chat", Tenant(name="t"), "k1", payload={"stream": stream}, validated=True)
    context.route = ROUTE
    return context


async def stays() -> dict[str, Any]:
    """An ASGI receive whose client never leaves."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


class Stream:
    """vLLM's side of a stream: its events, one read each."""

    def __init__(self, events: list[bytes]) -> None:
        self.events, self.closed = events, False
        self.content = self

    async def iter_any(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield event

    def close(self) -> None:
        self.closed = True


async def relay(events: list[bytes], hide_usage: bool) -> tuple[RequestContext, list[float | None]]:
    """Relay `events` for a new request; its context, and its first-token time as each body message was sent."""
    context, seen = new_context(), []

    async def send(message: MutableMapping[str, Any]) -> None:
        if message.get("body"):
            seen.append(context.first_token_s)

    response = RelayResponse(Stream(events), context.answer, context.first_token, context.finish, None, hide_usage)  # type: ignore[arg-type]
    await asyncio.wait_for(response({"type": "http"}, stays, send), 5)
    return context, seen


@pytest.mark.parametrize("hide_usage", [False, True])
async def test_a_stream_refused_before_any_token_gives_its_reservation_back(hide_usage: bool) -> None:
    """vLLM answers 200 and then an error event, e.g. for a `json_schema` it cannot compile: no token came."""
    context, _ = await relay([REFUSED, DONE], hide_usage)
    assert context.status == 400 and context.outcome == "error"
    assert context.first_token_s is None, "no time to first token is logged: there was none"
    assert _tokens_used(context) == 0, "its reservation is given back, as without streaming"


@pytest.mark.parametrize("hide_usage", [False, True])
async def test_the_first_token_is_timed_when_it_passes_and_kept_if_the_stream_fails_after(hide_usage: bool) -> None:
    context, seen = await relay([TOKEN, REFUSED, DONE], hide_usage)
    assert seen[0] is not None, "timed by the time its event is sent, as before"
    assert context.first_token_s == seen[0] and context.status == 400
    assert _tokens_used(context) is None, "tokens may have been generated: the reservation stands"
    context, seen = await relay([TOKEN + USAGE + DONE], hide_usage)
    assert context.status == 200 and seen[0] is not None and _tokens_used(context) == 3


@pytest.mark.parametrize("hide_usage", [False, True])
async def test_a_stream_whose_body_ends_before_its_done_is_cut_short_not_complete(hide_usage: bool) -> None:
    """An engine (or a proxy before it) that ends the body cleanly mid-answer: the client's stream ended with no
    `[DONE]` and no error, which the SDK takes for a whole answer, and the log recorded a 200. A `[DONE]` missing only
    its blank line is still the end."""
    context, _ = await relay([TOKEN, b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hal'], hide_usage)
    assert (context.status, context.outcome) == (502, "error")
    context, _ = await relay([TOKEN + USAGE + DONE[:-2]], hide_usage)
    assert (context.status, context.outcome) == (200, "ok")


class Answer:
    """vLLM's answer to a request: `status`, its body read as `reading` says (waits for ever when None)."""

    def __init__(self, status: int, reading: BaseException | bytes | None) -> None:
        self.status, self.content_type = status, "application/json"
        self.reading, self.started = reading, asyncio.Event()
        self.closed = self.released = False

    async def read(self) -> bytes:
        self.started.set()
        if self.reading is None:
            await asyncio.Event().wait()
        if isinstance(self.reading, BaseException):
            raise self.reading
        assert self.reading is not None
        return self.reading

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        self.released = True


class Session:
    """The engine client (`EngineSessions.engine`): every post is answered `answer` (given a dict, its replica's)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.engine = self

    async def post(self, url: str, *_: Any) -> Any:
        if isinstance(self.answer, dict):
            return next(answer for replica, answer in self.answer.items() if url.startswith(replica))
        return self.answer


class Placement:
    def __init__(self, *replicas: Replica) -> None:
        self.replicas = replicas

    async def acquire(self, route: Route, exclude: frozenset[Replica] = frozenset()) -> Replica:
        left = [r for r in self.replicas if r not in exclude and r.healthy]
        if not left:
            raise EngineUnavailable("No inference engine is available right now; try again shortly.")
        return left[0]

    def release(self, replica: Replica, route: Route) -> None:
        pass


class Pool:
    """Replicas' health checks: those of `down` fail (and mark them down)."""

    def __init__(self, down: frozenset[str] = frozenset()) -> None:
        self.down, self.checked = down, list[str]()

    async def check(self, replica: Replica) -> bool:
        self.checked.append(replica.url)
        if replica.url in self.down:
            replica.mark_down()
        return replica.url not in self.down

    def healthy(self, exclude: frozenset[Replica] = frozenset()) -> list[Replica]:
        return []


def forwarding(answer: Answer, stream: bool, receive: Any = stays) -> tuple[Forwarder, Call, Replica]:
    """A forwarder to one replica that answers `answer`, and a chat request that named no limit (the gateway's cap
    was sent: a 400 is read to see whether the cap is what vLLM refused)."""
    replica = Replica("http://engine", healthy=True)
    forwarder = Forwarder(Session(answer), Pool(), Placement(replica), Metrics(), 30)  # type: ignore[arg-type]
    payload = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048}
    call = Call("chat", "/v1/chat/completions", payload, ROUTE, "r1", stream, receive, new_context(stream))
    call.capped_by_default = True
    return forwarder, call, replica


@pytest.mark.parametrize("status", [400, 200], ids=["refused, read for the cap", "answered"])
async def test_a_client_that_leaves_while_the_answer_is_read_leaves_no_request_in_flight(status: int) -> None:
    answer = Answer(status, None)

    async def leaves() -> dict[str, Any]:
        await answer.started.wait()
        return {"type": "http.disconnect"}

    forwarder, call, replica = forwarding(answer, stream=False, receive=leaves)
    response = await asyncio.wait_for(forwarder.forward(call), 5)
    assert response.status_code == CLIENT_CLOSED and call.context.outcome == "cancelled"
    assert replica.inflight == 0, "the replica does not look busier for good"
    assert answer.closed, "the upstream connection is closed: vLLM aborts the request"


async def cancelled_once(forwarder: Forwarder, call: Call, reached: asyncio.Event) -> None:
    """Forward `call`, and cancel it once `reached` is set (the client left): the cancellation gets through."""
    request = asyncio.ensure_future(forwarder.forward(call))
    await asyncio.wait_for(reached.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_a_stream_request_cancelled_while_its_refusal_is_read_leaves_no_request_in_flight() -> None:
    answer = Answer(400, None)
    forwarder, call, replica = forwarding(answer, stream=True)
    await cancelled_once(forwarder, call, answer.started)
    assert replica.inflight == 0 and answer.closed


async def test_an_unexpected_failure_reading_a_refusal_leaves_no_request_in_flight() -> None:
    answer = Answer(400, RuntimeError("boom"))
    forwarder, call, replica = forwarding(answer, stream=False)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(forwarder.forward(call), 5)
    assert replica.inflight == 0 and answer.closed


async def test_a_refusal_read_for_the_cap_is_answered_and_untracked_once() -> None:
    answer = Answer(400, b'{"error":{"message":"The schema is not valid.","code":400}}')
    forwarder, call, replica = forwarding(answer, stream=False)
    response = await asyncio.wait_for(forwarder.forward(call), 5)
    assert response.status_code == 400 and call.context.status == 400
    assert replica.inflight == 0 and not answer.closed and answer.released


class FailsAfter(Stream):
    """A stream whose connection fails (`failure`) after its events."""

    def __init__(self, events: list[bytes], failure: BaseException) -> None:
        super().__init__(events)
        self.failure = failure

    async def iter_any(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield event
        raise self.failure


async def relayed(upstream: Stream) -> tuple[RequestContext, bytes]:
    """A new request's context once `upstream` is relayed to a client that stays, and what the client got."""
    context, body = new_context(), []

    async def send(message: MutableMapping[str, Any]) -> None:
        body.append(message.get("body", b""))

    response = RelayResponse(upstream, context.answer, context.first_token, context.finish, None, False)  # type: ignore[arg-type]
    await asyncio.wait_for(response({"type": "http"}, stays, send), 5)
    return context, b"".join(body)


async def test_a_connection_failing_after_the_end_of_the_stream_leaves_the_answer_whole() -> None:
    """The replica killed just after `[DONE]`: before, the client got an error event and a second `[DONE]`, and the
    finished answer was recorded as a 502."""
    cut = aiohttp.ClientPayloadError("Response payload is not completed")
    context, sent = await relayed(FailsAfter([TOKEN + USAGE + DONE], cut))
    assert sent.count(b"[DONE]") == 1 and b'"error"' not in sent
    assert context.status == 200 and context.outcome == "ok"


async def test_an_engine_silent_in_the_middle_of_a_stream_is_a_timeout_not_a_failure() -> None:
    """As without streaming, and as the README says of `LORAGATE_UPSTREAM_TIMEOUT_S`: a 504 `upstream_timeout`
    (the replica's error), not "the engine stopped", a 502 as though it had died."""
    silent = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
    context, sent = await relayed(FailsAfter([TOKEN], silent))
    event = sent.split(b"\n\n")[-3]
    assert json.loads(event.removeprefix(b"data: "))["error"]["code"] == "upstream_timeout", event
    assert context.status == 504, "(the forwarder's finisher names it upstream_timeout, as an unstreamed 504)"


class StreamAnswer:
    """vLLM's 200 to a stream request: its events, read a piece at a time (`content.read(n)`), as the engine
    client reads them."""

    def __init__(self, events: list[bytes | BaseException]) -> None:
        self.status, self.content_type = 200, "text/event-stream"
        self.pieces, self.content = list(events), self
        self.closed = False

    async def read(self, n: int = -1) -> bytes:
        piece = self.pieces.pop(0) if self.pieces else b""
        if isinstance(piece, BaseException):
            raise piece
        return piece

    def unread(self, data: bytes) -> None:
        if data:
            self.pieces.insert(0, data)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while self.pieces:
            yield self.pieces.pop(0)

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        pass


STOP_REFUSED = (
    b'data: {"error":{"object":"error","message":"stop_token_ids [99999999] are out of the vocabulary",'
    b'"type":"BadRequestError","param":"stop_token_ids","code":400}}\n\n'
)


@pytest.mark.parametrize("pieces", [[STOP_REFUSED + DONE], [STOP_REFUSED[:20], STOP_REFUSED[20:], DONE]])
async def test_a_stream_refused_before_its_first_event_is_a_400_as_without_streaming(pieces: list[bytes]) -> None:
    """vLLM answered 200 and an error event; the client got a 200 stream ending in that event (the SDK raised a bare
    APIError with no status) where the same request without streaming is a 400: OpenAI refuses before streaming."""
    answer = StreamAnswer(pieces)
    forwarder, call, replica = forwarding(answer, stream=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as refused:
        await asyncio.wait_for(forwarder.forward(call), 5)
    assert refused.value.status == 400 and refused.value.param == "stop_token_ids"
    assert "out of the vocabulary" in refused.value.message
    assert call.context.status == 400 and call.context.first_token_s is None
    assert replica.inflight == 0 and answer.closed


@pytest.mark.parametrize(
    ("first", "refusal", "code"),
    [
        (
            b'data: {"error":{"message":"EngineCore died","type":"InternalServerError","code":500}}\n\n',
            UpstreamError,
            "upstream_error",
        ),
        (aiohttp.ClientPayloadError("cut"), UpstreamError, "upstream_error"),
        (aiohttp.SocketTimeoutError("silent"), UpstreamTimeout, "upstream_timeout"),
    ],
    ids=["error event", "connection lost", "silent"],
)
async def test_an_engine_failing_before_a_streams_first_event_is_answered_as_unstreamed(
    first: bytes | BaseException, refusal: type[Exception], code: str
) -> None:
    """Failed, gone or silent before its first event: a JSON 502 or 504 (was a 200 stream ending in an error event),
    counted for its replica and recorded with the code the client got (a 504 was logged as `server_error`)."""
    forwarder, call, replica = forwarding(StreamAnswer([first, DONE]), stream=True)  # type: ignore[arg-type]
    with pytest.raises(refusal) as refused:
        await asyncio.wait_for(forwarder.forward(call), 5)
    assert call.context.status == refused.value.status == (504 if code == "upstream_timeout" else 502)  # type: ignore[attr-defined]
    assert call.context.error_type == code and replica.inflight == 0
    assert forwarder._metrics.upstream_errors.labels(replica.url)._value.get() == 1  # noqa: SLF001
    assert refused.value.headers == {"x-should-retry": "false"}, "the request may have caused it: SDKs must not retry"  # type: ignore[attr-defined]


async def test_a_stream_whose_engine_died_before_its_first_event_goes_to_another_replica() -> None:
    """vLLM sends a stream's head before its first token: an engine core dying meanwhile answered an error event, and
    the client got a 502 it was told not to retry, where the same request unstreamed went to another replica. Nothing
    was sent to the client yet: one more replica is tried, as without streaming, when the first fails its check."""
    died = b'data: {"error":{"message":"EngineCore died","type":"InternalServerError","code":500}}\n\n'
    first, second = Replica("http://one", healthy=True), Replica("http://two", healthy=True)
    dying, answering = StreamAnswer([died, DONE]), StreamAnswer([TOKEN + USAGE + DONE])
    pool = Pool(down=frozenset({"http://one"}))
    forwarder = Forwarder(
        Session({"http://one": dying, "http://two": answering}), pool, Placement(first, second), Metrics(), 30
    )  # type: ignore[arg-type]
    call = Call(
        "chat", "/v1/chat/completions", {"model": "base", "messages": []}, ROUTE, "r1", True, stays, new_context()
    )
    response = await asyncio.wait_for(forwarder.forward(call), 5)
    assert isinstance(response, RelayResponse) and dying.closed and not first.healthy
    assert (first.inflight, second.inflight, pool.checked) == (0, 1, ["http://one"])
    assert forwarder._metrics.upstream_errors.labels("http://one")._value.get() == 1  # noqa: SLF001
    second.healthy = first.healthy = True  # and again, with the second one dying too: a 502, no third try
    forwarder = Forwarder(
        Session(StreamAnswer([died, DONE])),
        Pool(down=frozenset({"http://one", "http://two"})),
        Placement(first, second),
        Metrics(),
        30,
    )  # type: ignore[arg-type]
    call = Call(
        "chat", "/v1/chat/completions", {"model": "base", "messages": []}, ROUTE, "r2", True, stays, new_context()
    )
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(forwarder.forward(call), 5)


class ClosedOnce(Session):
    """A pooled connection the engine closed: the first post meets it, the next is answered."""

    def __init__(self, answer: Any) -> None:
        super().__init__(answer)
        self.posts = 0

    async def post(self, url: str, *_: Any) -> Any:
        self.posts += 1
        if self.posts == 1:
            raise aiohttp.ServerDisconnectedError("Server disconnected")
        return self.answer


class Unanswered(Pool):
    """Health checks that time out: no answer, and the replica still healthy (the first two in a row)."""

    async def check(self, replica: Replica) -> bool:
        self.checked.append(replica.url)
        return False


class Hangs(Pool):
    """A health check that never comes back (a frozen engine, within its 3 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()

    async def check(self, replica: Replica) -> bool:
        self.asked.set()
        await asyncio.Event().wait()
        return False


async def test_a_stream_cancelled_while_its_failed_replica_is_checked_leaves_nothing_in_flight() -> None:
    """Its first event said the engine failed; the client left while the replica's health was asked: the replica
    looked busier for good, and the connection to it stayed open."""
    died = b'data: {"error":{"message":"EngineCore died","type":"InternalServerError","code":500}}\n\n'
    answer, pool, replica = StreamAnswer([died, DONE]), Hangs(), Replica("http://engine", healthy=True)
    forwarder = Forwarder(Session(answer), pool, Placement(replica), Metrics(), 30)  # type: ignore[arg-type]
    call = Call(
        "chat", "/v1/chat/completions", {"model": "base", "messages": []}, ROUTE, "r1", True, stays, new_context()
    )
    await cancelled_once(forwarder, call, pool.asked)
    assert replica.inflight == 0 and answer.closed


async def test_a_request_on_a_closed_connection_is_sent_again_when_the_health_check_is_late() -> None:
    """A pooled connection closed under a request, and the engine's `/health` answering late (busy on the CPU): the
    request is sent again and the replica stays in, as with a check answered. It was taken down at once, the one
    late answer that SILENT_CHECKS lets pass."""
    answer = Answer(200, b'{"id": "c1", "choices": []}')
    replica = Replica("http://engine", healthy=True)
    session = ClosedOnce(answer)
    forwarder = Forwarder(session, Unanswered(), Placement(replica), Metrics(), 30)  # type: ignore[arg-type]
    call = Call(
        "chat", "/v1/chat/completions", {"model": "base", "messages": []}, ROUTE, "r1", False, stays, new_context(False)
    )
    response = await asyncio.wait_for(forwarder.forward(call), 5)
    assert response.status_code == 200 and session.posts == 2 and replica.healthy


async def test_a_stream_sent_again_without_the_cap_goes_to_another_replica_without_it() -> None:
    """The cap refused for the context, the stream was sent again without it; its engine dying before the first
    event, the request went to the next replica with the cap again, and the client got that 400 for a limit it never
    named."""
    died = b'data: {"error":{"message":"EngineCore died","type":"InternalServerError","code":500}}\n\n'
    over = Answer(400, b'{"error":{"message":"max_tokens=2048 cannot be greater than max_model_len=1024"}}')
    answers = {"http://one": [over, StreamAnswer([died, DONE])], "http://two": [StreamAnswer([TOKEN + USAGE + DONE])]}
    sent: list[tuple[str, dict[str, Any]]] = []

    class Sending:
        engine = None

        async def post(self, url: str, body: bytes, *_: Any) -> Any:
            sent.append((url, json.loads(body)))
            return answers[url.removesuffix("/v1/chat/completions")].pop(0)

    one, two = Replica("http://one", healthy=True), Replica("http://two", healthy=True)
    session = Sending()
    session.engine = session  # type: ignore[assignment]
    forwarder = Forwarder(session, Pool(down=frozenset({"http://one"})), Placement(one, two), Metrics(), 30)  # type: ignore[arg-type]
    payload = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048}
    call = Call("chat", "/v1/chat/completions", payload, ROUTE, "r1", True, stays, new_context())
    call.capped_by_default = True
    response = await asyncio.wait_for(forwarder.forward(call), 5)
    assert isinstance(response, RelayResponse), response
    assert [(url.split("/v1")[0], "max_tokens" in body) for url, body in sent] == [
        ("http://one", True), ("http://one", False), ("http://two", False)
    ]  # fmt: skip
    assert b"max_tokens" not in (call.context.sent or b"max_tokens"), "the record keeps what was sent"


async def test_a_stream_looked_at_before_it_starts_is_relayed_whole() -> None:
    """Its first event, read to choose the status, is put back: the client gets every byte once."""
    answer = StreamAnswer([TOKEN[:30], TOKEN[30:] + USAGE[:10], USAGE[10:] + DONE])
    forwarder, call, replica = forwarding(answer, stream=True)  # type: ignore[arg-type]
    response = await asyncio.wait_for(forwarder.forward(call), 5)
    assert isinstance(response, RelayResponse)
    body: list[bytes] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        body.append(message.get("body", b""))

    await asyncio.wait_for(response({"type": "http"}, stays, send), 5)
    assert b"".join(body) == TOKEN + USAGE + DONE
    assert call.context.status == 200 and call.context.first_token_s is not None and replica.inflight == 0
