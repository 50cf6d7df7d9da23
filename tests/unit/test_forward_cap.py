"""The gateway's `max_tokens` cap on a chat request that names no limit: vLLM counts a named limit against the
prompt's room, so where the context cannot hold the cap the request is sent again without it (and gets what the
context has left, which is then below the cap), as vLLM alone would answer it. A stand-in engine refuses as vLLM
0.27 and 0.32 do."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway import serving
from gateway.context import RequestContext
from gateway.errors import EngineFailed, UpstreamError
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest
from gateway.routes.openai import cap_max_tokens
from gateway.routing import Route
from gateway.serving import Call, Forwarder
from gateway.tenants import Tenant
from tests.conftest import RedisServer
from tests.unit.test_placement import gateway_process

CONTEXT, PROMPT = 1024, 900
REFUSALS = {
    "0.27": "This model's maximum context length is {ctx} tokens. However, you requested {asked} output tokens and "
    "your prompt contains at least {prompt} input tokens, for a total of at least {total} tokens.",
    "0.32": "max_tokens={asked} cannot be greater than max_model_len={ctx}.",
}


class Engine:
    """Answers a chat request unless its `max_tokens` and the prompt overflow the context; records what it got."""

    def __init__(self, wording: str) -> None:
        self.wording = wording
        self.bodies: list[dict[str, Any]] = []
        self.encodings: list[str | None] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.encodings.append(request.headers.get("Accept-Encoding"))
        asked = body.get("max_tokens")
        if asked is not None and asked + PROMPT > CONTEXT:
            message = REFUSALS[self.wording].format(ctx=CONTEXT, asked=asked, prompt=PROMPT, total=asked + PROMPT)
            error = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response({"error": error} if self.wording == "0.32" else error, status=400)
        finish = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "base", "choices": [finish]}
        return web.json_response(answer | {"usage": {"prompt_tokens": PROMPT, "completion_tokens": 1}})


async def stays() -> dict[str, Any]:
    """An ASGI receive whose client never leaves."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def serve_engine(
    chat: Callable[[web.Request], Awaitable[web.Response]], healthy: Callable[[], bool] = lambda: True
) -> tuple[web.AppRunner, str]:
    """A stand-in engine answering chat requests with `chat` (serving `base`, healthy while `healthy()`); its
    runner and URL."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok") if healthy() else web.Response(status=503)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "base"}]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@pytest.fixture(params=list(REFUSALS))
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Engine, str]]:
    fake = Engine(request.param)
    runner, url = await serve_engine(fake.chat)
    yield fake, url
    await runner.cleanup()


def chat_call(payload: dict[str, Any], receive: Any = stays, request_id: str = "r1") -> Call:
    """A chat request to `base`, validated and routed, as the forwarder takes it."""
    context = RequestContext(request_id, "chat", Tenant(name="t"), "k1", payload=payload, validated=True)
    context.route = Route(requested="base", upstream_model="base", served_model="base")
    stream = payload.get("stream") is True
    return Call("chat", "/v1/chat/completions", payload, context.route, request_id, stream, receive, context)


async def ask(engine_url: str, redis_server: RedisServer, tmp_path: Path, payload: dict[str, Any]) -> int:
    placement, pool, sessions = await gateway_process([engine_url], redis_server.url, tmp_path)
    try:
        asked = cap_max_tokens(payload, ChatCompletionRequest.model_validate(payload), 2048)
        call = chat_call(payload)
        call.capped_by_default = asked is None
        response = await Forwarder(sessions, pool, placement, Metrics(), 30).forward(call)
        assert json.loads(call.context.sent or b"{}") == call.payload, "the record holds what was sent last"
        return response.status_code
    finally:
        await sessions.close()


async def test_a_cap_the_context_cannot_hold_is_dropped_for_what_it_has_left(
    engine: tuple[Engine, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    fake, url = engine
    payload = {"model": "base", "messages": [{"role": "user", "content": "a long prompt"}]}
    assert await ask(url, redis_server, tmp_path, payload) == 200
    assert [body.get("max_tokens") for body in fake.bodies] == [2048, None], "sent with the cap, then without"
    assert fake.encodings == ["identity", "identity"], "relayed as it comes: a proxy before the engine must not gzip"


async def test_a_limit_the_client_named_is_never_dropped(
    engine: tuple[Engine, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    fake, url = engine
    payload = {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}
    assert await ask(url, redis_server, tmp_path, payload) == 400, "vLLM's own answer to what the client asked"
    assert [body.get("max_tokens") for body in fake.bodies] == [500]


async def test_a_request_that_takes_its_replica_down_is_tried_on_one_more_not_on_all(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each replica drops the connection once it has the request and fails its health check (as an engine the
    request crashes): it goes to a second replica (a replica killed under load moves its requests), then the
    client gets a 502, and the third replica is never sent it."""
    got: list[int] = []
    runners, urls = [], []
    for n in range(3):

        async def crash(request: web.Request, n: int = n) -> web.Response:
            got.append(n)
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(1)
            return web.Response()

        runner, url = await serve_engine(crash, healthy=lambda n=n: n not in got)  # type: ignore[misc]
        runners.append(runner)
        urls.append(url)
    placement, pool, sessions = await gateway_process(urls, redis_server.url, tmp_path)
    try:
        call = chat_call({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5})
        with pytest.raises(UpstreamError) as failed:
            await Forwarder(sessions, pool, placement, Metrics(), 30).forward(call)
        assert len(got) == 2 and len(set(got)) == 2, got
        # OpenAI's SDKs retry a 5xx twice unless told not to: one call took six replicas down (the answer's headers)
        assert failed.value.headers == {"x-should-retry": "false"}
    finally:
        await sessions.close()
        for runner in runners:
            await runner.cleanup()


async def test_a_request_that_takes_the_only_replica_down_is_not_retried_by_the_sdk(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """With no other replica left to try, it was a 503 `engine_unavailable`, which OpenAI's SDKs retry twice: the
    replica, back, would be taken down twice more."""
    got: list[int] = []

    async def crash(request: web.Request) -> web.Response:
        got.append(1)
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()

    runner, url = await serve_engine(crash, healthy=lambda: not got)
    placement, pool, sessions = await gateway_process([url], redis_server.url, tmp_path)
    try:
        call = chat_call({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5})
        with pytest.raises(UpstreamError) as failed:
            await Forwarder(sessions, pool, placement, Metrics(), 30).forward(call)
        assert got == [1] and failed.value.status == 502
        assert failed.value.headers == {"x-should-retry": "false"}
    finally:
        await sessions.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("closes", "after_s", "reset", "posts"),
    [(1, 0, False, 2), (1, 0, True, 2), (2, 0, False, 2), (1, 0.6, False, 1)],
    ids=["once: answered", "reset once: answered", "every time: sent twice", "late, as if cut mid-answer: not again"],
)
async def test_a_connection_closed_by_a_healthy_replica_as_it_is_sent_is_sent_again_once(
    closes: int,
    after_s: float,
    reset: bool,
    posts: int,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica (or a proxy before it) closes the connection, or resets it, as the request is sent (as a pooled
    connection closed for idling; pooled ones: the next test) and is healthy: the request is sent again, once, and
    the replica stays in. One
    closed later (`after_s`, past the window: the request may have run, e.g. a proxy's time limit cut its
    generation) is not."""
    if after_s:  # a shorter window for the late case; the others keep the real one (a loaded machine lags)
        monkeypatch.setattr(serving, "RESEND_WITHIN_S", after_s - 0.2)
    got: list[bytes] = []

    async def closing(request: web.Request) -> web.Response:
        got.append(await request.read())
        if len(got) <= closes:
            await asyncio.sleep(after_s)
            assert request.transport is not None
            if reset:  # RST, not FIN: the client's read fails with ECONNRESET (ClientOSError)
                request.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            request.transport.close()
            await asyncio.sleep(1)
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": "base", "choices": []})

    runner, url = await serve_engine(closing)
    placement, pool, sessions = await gateway_process([url], redis_server.url, tmp_path)
    try:
        call = chat_call({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5})
        forwarder = Forwarder(sessions, pool, placement, Metrics(), 30)
        if posts > closes:
            assert (await forwarder.forward(call)).status_code == 200 and pool.replicas[0].healthy
        else:  # it may have run, on the only replica: the engine's failure, which SDKs are told not to retry
            with pytest.raises(EngineFailed):
                await forwarder.forward(call)
        assert len(got) == posts and len(set(got)) == 1, "the same request, sent at most twice"
    finally:
        await sessions.close()
        await runner.cleanup()


async def test_a_request_sent_again_goes_on_a_new_connection_not_on_another_stale_one(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """After a lull, every pooled connection to a replica may be one it closed (a CI run's burst met that on both
    replicas at once). The replica here closes every connection at its second request, as it is sent: a request
    that met one is sent again on a new connection and answered, never on another pooled one, and the replica
    stays in. (Pooled connections kept a minute here: a loaded machine may take seconds between requests.)"""
    seen: list[object] = []
    """The connections it has answered on (held, so that a new one never takes a closed one's id)."""
    reused: list[object] = []
    first_three = asyncio.Barrier(3)

    async def closes_reused(request: web.Request) -> web.Response:
        await request.read()
        transport = request.transport
        assert transport is not None
        if any(transport is known for known in seen):
            reused.append(transport)
            transport.close()
            await asyncio.sleep(1)
        seen.append(transport)
        if len(seen) <= 3:  # the first three in flight together: three connections, then pooled
            await asyncio.wait_for(first_three.wait(), 10)
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": "base", "choices": []})

    runner, url = await serve_engine(closes_reused)
    placement, pool, sessions = await gateway_process([url], redis_server.url, tmp_path, keepalive_s=60)
    metrics = Metrics()
    forwarder = Forwarder(sessions, pool, placement, metrics, 30)

    def call(n: int) -> Call:
        ask = {"model": "base", "messages": [{"role": "user", "content": str(n)}], "max_tokens": 5}
        return chat_call(ask, request_id=f"r{n}")

    try:
        first = await asyncio.gather(*(forwarder.forward(call(n)) for n in range(3)))
        assert [r.status_code for r in first] == [200] * 3 and not reused
        for n in range(3, 6):
            assert (await forwarder.forward(call(n))).status_code == 200 and pool.replicas[0].healthy
        assert len(reused) == 3, "each request met a pooled connection, and only one"
        assert metrics.registry.get_sample_value("loragate_upstream_resent_total", {"replica": url}) == 3
    finally:
        await sessions.close()
        await runner.cleanup()


async def test_a_stream_whose_client_leaves_before_it_starts_is_not_waited_for(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The client of a stream hangs up while its request waits (an adapter loading, a slow engine): the request is
    given up at once (499), not sent on and answered to no one."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        started.set()
        await release.wait()  # answered once the test is done
        return web.Response(text="data: [DONE]\n\n", content_type="text/event-stream")

    runner, url = await serve_engine(slow)
    placement, pool, sessions = await gateway_process([url], redis_server.url, tmp_path)
    try:

        async def leaves() -> dict[str, Any]:
            await started.wait()
            return {"type": "http.disconnect"}

        finished: list[RequestContext] = []
        call = chat_call({"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": True}, leaves)
        context = call.context
        call.on_finish = finished.append
        response = await asyncio.wait_for(Forwarder(sessions, pool, placement, Metrics(), 30).forward(call), 10)
        assert response.status_code == 499 and context.status == 499 and finished == [context]
    finally:
        release.set()
        await sessions.close()
        await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
async def test_an_engine_that_fails_in_the_middle_of_its_answer_is_an_upstream_error_of_its_replica(
    stream: bool, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Its answer cut after the head (a body shorter than its length, a stream without its end): the request ends as
    an `upstream_error` and counts in `loragate_upstream_errors_total` of its replica, as a failure before the head
    does (it was a `server_error`, not counted for the replica)."""

    async def cut(request: web.Request) -> web.StreamResponse:
        await request.read()
        kind = "text/event-stream" if stream else "application/json"
        answer = web.StreamResponse(headers={"Content-Type": kind} | ({} if stream else {"Content-Length": "1000"}))
        await answer.prepare(request)
        await answer.write(b'data: {"id":"c1","choices":[]}\n\n' if stream else b'{"id": "chatcmpl-1",')
        assert request.transport is not None
        request.transport.close()
        return answer

    runner, url = await serve_engine(cut)  # type: ignore[arg-type]
    placement, pool, sessions = await gateway_process([url], redis_server.url, tmp_path)
    metrics = Metrics()
    try:
        call = chat_call({"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": stream})
        forwarder = Forwarder(sessions, pool, placement, metrics, 30)
        if stream:
            relay = await forwarder.forward(call)
            await relay({"type": "http"}, stays, lambda message: asyncio.sleep(0))
        else:
            with pytest.raises(UpstreamError):
                await forwarder.forward(call)
        assert (call.context.status, call.context.error_type) == (502, "upstream_error")
        assert metrics.upstream_errors.labels(url)._value.get() == 1
    finally:
        await sessions.close()
        await runner.cleanup()
