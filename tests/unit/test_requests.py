"""Shaping a request before it is forwarded: the max_tokens cap, and cancelling work when the client leaves."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from gateway.answer import Answer
from gateway.body import read_json_sized
from gateway.context import CLIENT_CLOSED, RequestContext
from gateway.errors import InvalidRequest, from_validation_error
from gateway.protocol import MAX_MESSAGES, ChatCompletionRequest, CompletionRequest, SamplingParams
from gateway.routes.openai import _tokens_used, ask_for_usage, cap_max_tokens, salt_prefix_cache
from gateway.streaming import ClientGone, RelayResponse, unless_disconnected
from gateway.tenants import Tenant

MSG = [{"role": "user", "content": "hi"}]


def capped(schema: type[SamplingParams], cap: int, **fields: Any) -> dict[str, Any]:
    payload = {"model": "m", **fields}
    cap_max_tokens(payload, schema.model_validate(payload), cap)
    return payload


def test_a_request_without_a_limit_gets_its_default_under_the_cap() -> None:
    """Chat has no default (as many as the context holds): the cap; text completions default to 16, as at
    OpenAI and in vLLM, and then reserve 16 tokens of quota."""
    assert capped(ChatCompletionRequest, 64, messages=MSG)["max_tokens"] == 64
    assert capped(CompletionRequest, 64, prompt="x")["max_tokens"] == 16
    assert capped(CompletionRequest, 8, prompt="x")["max_tokens"] == 8
    payload = {"model": "m", "prompt": "x"}
    assert cap_max_tokens(payload, CompletionRequest.model_validate(payload), 64) == 16
    payload = {"model": "m", "messages": MSG}
    assert cap_max_tokens(payload, ChatCompletionRequest.model_validate(payload), 64) is None


@pytest.mark.parametrize("prompt", ["", []])
def test_an_empty_prompt_is_refused_in_words_that_fit_a_string_and_a_list(prompt: Any) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    error = from_validation_error(info.value)
    assert (error.param, error.code) == ("prompt", "invalid_value")
    assert error.message == "Invalid value for 'prompt': the prompt is empty: send at least one character or token"
    assert (
        CompletionRequest.model_json_schema()["properties"]["prompt"] | {"minLength": 1, "minItems": 1}
        == (CompletionRequest.model_json_schema()["properties"]["prompt"])
    ), "the published schema says so too"


def test_null_n_and_stream_are_their_defaults_as_the_sdk_sends_them() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "n": None, "stream": None})
    assert request.answers() == 1 and not request.stream


@pytest.mark.parametrize(
    ("schema", "fields", "asks"),
    [
        (ChatCompletionRequest, {"echo": True}, "echo"),
        (ChatCompletionRequest, {"echo": True, "prompt_logprobs": None}, "echo"),
        (ChatCompletionRequest, {"prompt_logprobs": 0}, "prompt_logprobs"),
        (ChatCompletionRequest, {"echo": False, "logprobs": True, "top_logprobs": 2}, None),
        (ChatCompletionRequest, {"prompt_logprobs": None}, None),
        (CompletionRequest, {"echo": True, "logprobs": 0}, "echo"),
        (CompletionRequest, {"prompt_logprobs": 1}, "prompt_logprobs"),
        (CompletionRequest, {"echo": True}, None),
        (CompletionRequest, {"logprobs": 2}, None),
    ],
)
def test_what_makes_vllm_compute_a_prompts_logprobs(
    schema: type[SamplingParams], fields: dict[str, Any], asks: str | None
) -> None:
    """vLLM computes them for `prompt_logprobs`, for chat's `echo` (taking `top_logprobs`, 0 when absent) and for a
    text completion's `echo` with `logprobs`: the requests refused unless LORAGATE_ALLOW_PROMPT_LOGPROBS is on."""
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]} if schema is ChatCompletionRequest else {}
    body = base or {"model": "m", "prompt": "x"}
    assert schema.model_validate({**body, **fields}).asks_prompt_logprobs() == asks


@pytest.mark.parametrize("value", [1, 1.0, "true", "yes", "1"])
def test_chats_echo_is_a_strict_boolean(value: object) -> None:
    """vLLM reads `1` or `"yes"` as true and computes the prompt's logprobs then: only a boolean is taken (a 400
    otherwise), so that no spelling of true passes the refusal of prompt logprobs."""
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": value}
        )


def test_max_tokens_zero_scores_a_prompt_only_with_echo() -> None:
    """vLLM's `echo` with `max_tokens: 0`: the prompt's logprobs, nothing generated; 0 alone generates nothing."""
    scored = {"model": "m", "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0}
    assert capped(CompletionRequest, 64, **{k: v for k, v in scored.items() if k != "model"})["max_tokens"] == 0
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": 0})
    assert from_validation_error(info.value).param == "max_tokens"
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "max_tokens": 0})


def test_more_messages_than_any_context_holds_are_refused_at_once() -> None:
    payload = {"model": "m", "messages": [{"role": "user"}] * 200_000}
    started = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(payload)
    assert time.perf_counter() - started < 1.0, "refused by its length, not after 200,000 messages' errors"
    error = from_validation_error(info.value)
    assert error.param == "messages" and f"at most {MAX_MESSAGES}" in error.message


def test_a_request_over_the_cap_is_lowered_and_one_under_it_kept() -> None:
    assert capped(CompletionRequest, 64, prompt="x", max_tokens=1000)["max_tokens"] == 64
    assert capped(CompletionRequest, 64, prompt="x", max_tokens=10)["max_tokens"] == 10
    chat = capped(ChatCompletionRequest, 64, messages=MSG, max_completion_tokens=500, max_tokens=20)
    assert (chat["max_completion_tokens"], chat["max_tokens"]) == (64, 20)
    assert "max_tokens" not in capped(ChatCompletionRequest, 64, messages=MSG, max_completion_tokens=5)


def test_an_unvalidated_extra_named_like_a_limit_is_left_to_the_engine() -> None:
    """Completions have no max_completion_tokens: an extra of that name is not compared (it may be anything)."""
    payload = capped(CompletionRequest, 64, prompt="x", max_completion_tokens="lots")
    assert payload["max_completion_tokens"] == "lots" and payload["max_tokens"] == 16


def test_min_tokens_above_the_cap_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequest) as info:
        capped(CompletionRequest, 64, prompt="x", min_tokens=100)
    assert info.value.param == "min_tokens" and "64" in info.value.message
    assert capped(CompletionRequest, 64, prompt="x", min_tokens=10)["min_tokens"] == 10


class Connection:
    """An ASGI receive whose client disconnects when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_work_finishes_while_the_client_stays() -> None:
    assert await unless_disconnected(asyncio.sleep(0.01, result="done"), Connection().receive) == "done"


async def test_work_is_cancelled_when_the_client_leaves() -> None:
    connection = Connection()
    cancelled = asyncio.Event()

    async def generate() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    asyncio.get_running_loop().call_later(0.05, connection.gone.set)
    with pytest.raises(ClientGone):
        await asyncio.wait_for(unless_disconnected(generate(), connection.receive), 5)
    assert cancelled.is_set()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    """The request's task cancelled by someone else (the server shutting down) while the client is still there:
    not a client that left, and the disconnect watcher does not outlive the request."""
    before = asyncio.all_tasks()
    request = asyncio.ensure_future(unless_disconnected(asyncio.sleep(30), Connection().receive))
    await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set(), "the watcher is gone with the request"


async def test_errors_of_the_work_reach_the_caller() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await unless_disconnected(fail(), Connection().receive)


class Upstream:
    """vLLM's side of a stream: `events`, then (if `hangs`) no end, as when its stream is slow to close."""

    def __init__(self, events: list[bytes], hangs: bool) -> None:
        self.events, self.hangs, self.closed = events, hangs, False
        self.content = self

    async def iter_any(self) -> Any:
        for event in self.events:
            yield event
        if self.hangs:
            await asyncio.sleep(30)

    def close(self) -> None:
        self.closed = True


async def relay_until_the_client_leaves(events: list[bytes], leave_after: bytes) -> tuple[list[int], Answer]:
    """Relay `events` to a client that hangs up once it has received `leave_after`; what `on_close` got."""
    connection, closed, answer = Connection(), [], Answer()
    upstream = Upstream(events, hangs=True)

    async def send(message: dict[str, Any]) -> None:
        if leave_after in message.get("body", b""):
            connection.gone.set()

    relay = RelayResponse(upstream, answer, lambda: None, closed.append)  # type: ignore[arg-type]
    await asyncio.wait_for(relay({"type": "http"}, connection.receive, send), 5)
    assert upstream.closed, "the upstream connection is closed however the stream ends"
    return closed, answer


CHUNK = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'


async def test_a_client_that_hangs_up_after_done_got_a_whole_answer() -> None:
    """The OpenAI SDK may close the connection on `[DONE]` before vLLM ends its stream: that is not a cancellation."""
    closed, answer = await relay_until_the_client_leaves([CHUNK, b"data: [DONE]\n\n"], b"[DONE]")
    assert closed == [200] and answer.completion_id == "c1"


async def test_a_client_that_hangs_up_before_done_cancelled() -> None:
    closed, _ = await relay_until_the_client_leaves([CHUNK], b'"hi"')
    assert closed == [CLIENT_CLOSED]


def chunk(**fields: Any) -> bytes:
    """A stream event as vLLM writes it (compact JSON)."""
    data = json.dumps({"id": "c1", "object": "chat.completion.chunk", **fields}, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


async def relay_whole(events: list[bytes], hide_usage: bool) -> list[list[dict[str, Any] | str]]:
    """What a client gets of `events` (vLLM's reads, asked for usage): per body message sent, its events parsed
    ("[DONE]" as it is)."""
    sent: list[list[dict[str, Any] | str]] = []

    async def send(message: dict[str, Any]) -> None:
        events_out = [e.removeprefix(b"data: ") for e in message.get("body", b"").split(b"\n\n") if e]
        if events_out:
            sent.append([json.loads(e) if e.startswith(b"{") else e.decode() for e in events_out])

    upstream = Upstream(events, hangs=False)
    relay = RelayResponse(upstream, Answer(), lambda: None, [].append, hide_usage=hide_usage)  # type: ignore[arg-type]
    await asyncio.wait_for(relay({"type": "http"}, Connection().receive, send), 5)
    return sent


FINGERPRINT = "vllm-0.32.0-1a2b3c4d"
USAGE = chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4}, system_fingerprint=FINGERPRINT)
DONE = b"data: [DONE]\n\n"


async def test_a_stream_whose_usage_is_dropped_keeps_vllms_fingerprint_on_its_ending_chunks() -> None:
    """vLLM stamps `system_fingerprint` on the chunks that end choices, or, asked for usage (as the gateway
    always asks), on the usage chunk alone: dropping that chunk lost the fingerprint. Only the chunks that end a
    choice wait for it: another choice's tokens pass at once."""
    events = [
        chunk(choices=[{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]),
        chunk(choices=[{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]),
        chunk(choices=[{"index": 1, "delta": {"content": "Yo"}, "finish_reason": None}]),
        chunk(choices=[{"index": 1, "delta": {}, "finish_reason": "length"}]) + USAGE + DONE,
    ]
    sent = await relay_whole(events, hide_usage=True)
    got = [event for message in sent for event in message]
    assert got[-1] == "[DONE]" and len(got) == 5, "the usage chunk dropped"
    chunks = [c for c in got if isinstance(c, dict)]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content")) for c in chunks] == [
        (0, "Hi"), (1, "Yo"), (0, "!"), (1, None)
    ]  # fmt: skip
    assert [c.get("system_fingerprint") for c in chunks] == [None, None, FINGERPRINT, FINGERPRINT]
    assert [len(message) for message in sent] == [1, 1, 3], "choice 1's token was not held with choice 0's end"
    shown = [event for message in await relay_whole(events, hide_usage=False) for event in message]
    assert shown[-2] == json.loads(USAGE[6:-2]), "a client that asked for usage gets vLLM's chunk as it is"


async def test_held_chunks_are_passed_on_before_done_an_error_or_the_end_without_a_usage_chunk() -> None:
    ending = chunk(choices=[{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}])
    ended = json.loads(ending[6:-2])
    assert [e for m in await relay_whole([ending, DONE], hide_usage=True) for e in m] == [ended, "[DONE]"]
    cut = [e for m in await relay_whole([ending], hide_usage=True) for e in m]  # no usage chunk, nor `[DONE]`
    assert cut[0] == ended and cut[1]["error"]["code"] == "upstream_error" and cut[2] == "[DONE]", "cut short"
    failed = b'data: {"error":{"message":"engine at http://10.0.0.7 died","code":500}}\n\n'
    got = [e for m in await relay_whole([ending, failed, DONE], hide_usage=True) for e in m]
    assert got[0] == ended and isinstance(got[1], dict) and got[1]["error"]["type"] == "server_error"
    garbled = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,\n\n'
    got = [e for m in await relay_whole([ending, garbled, DONE], hide_usage=True) for e in m]
    assert got == [ended, "[DONE]"], "a usage chunk that does not parse is dropped all the same"


def test_each_tenant_gets_its_own_prefix_cache_salt_and_a_clients_salt_is_mixed_in() -> None:
    def salt(tenant: str, **fields: Any) -> str:
        payload = dict(fields)
        salt_prefix_cache(payload, tenant)
        return str(payload["cache_salt"])

    acme, globex = salt("acme"), salt("globex")
    assert acme != globex and acme == salt("acme"), "one salt per tenant, the same on every request"
    again: dict[str, Any] = {}
    salt_prefix_cache(again, "acme", created=1.5)
    assert again["cache_salt"] not in {acme, salt("acme")}, "acme deleted and created again: another salt"
    assert salt("acme", cache_salt="user-1") not in {acme, salt("acme", cache_salt="user-2")}
    assert salt("globex", cache_salt=acme) != acme, "a client cannot name another tenant's salt"
    assert all(len(s) <= 128 and not set("@/\\\x00") & set(s) for s in (acme, globex)), "vLLM's rules for a salt"
    for bad in ("", 5):
        with pytest.raises(InvalidRequest) as info:
            salt("acme", cache_salt=bad)
        assert info.value.param == "cache_salt"


def test_the_limit_a_request_reserves_is_the_one_vllm_applies_capped() -> None:
    """vLLM generates up to max_completion_tokens when both are named; a limit over the cap is the cap."""
    both = {"model": "m", "messages": MSG, "max_completion_tokens": 2000, "max_tokens": 1}
    assert cap_max_tokens(both, ChatCompletionRequest.model_validate(both), 64) == 64
    over = {"model": "m", "prompt": "x", "max_tokens": 5000}
    assert cap_max_tokens(over, CompletionRequest.model_validate(over), 2048) == 2048


def test_a_failed_request_gives_its_reservation_back_unless_tokens_may_have_come() -> None:
    def ended(status: int, usage: dict[str, int] | None = None, first_token: bool = False) -> int | None:
        context = RequestContext("r", "chat", Tenant(name="t"), "k", payload={})
        context.answer.usage = usage
        if first_token:
            context.first_token()
        context.finish(status)
        return _tokens_used(context)

    assert ended(200, {"total_tokens": 42}) == 42
    assert ended(400) == 0, "vLLM refused it: nothing was generated"
    assert ended(502) == 0
    assert ended(502, first_token=True) is None, "a stream that broke after tokens came keeps its reservation"
    assert ended(CLIENT_CLOSED) is None


async def test_a_chunked_body_is_measured_as_read() -> None:
    """The prompt's share of a reservation comes from the bytes read: a chunked body declares no length."""
    body = json.dumps({"model": "m", "prompt": "x" * 5000}).encode()
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)
    payload, size = await read_json_sized(request, 1 << 20)
    assert payload["prompt"] == "x" * 5000 and size == len(body)


@pytest.mark.parametrize(
    ("options", "hidden"),
    [
        (None, True),
        ({"include_usage": False}, True),
        ({"continuous_usage_stats": True}, True),
        ({"include_usage": False, "continuous_usage_stats": True}, True),
        ({"include_usage": True, "continuous_usage_stats": True}, False),
    ],
)
def test_a_stream_always_asks_for_usage_and_continuous_usage_only_when_the_client_does(
    options: dict[str, bool] | None, hidden: bool
) -> None:
    payload: dict[str, Any] = {"model": "m", "messages": MSG, "stream": True, "stream_options": options}
    assert ask_for_usage(payload, ChatCompletionRequest.model_validate(payload)) is hidden
    sent = payload["stream_options"]
    assert sent["include_usage"] is True
    assert sent["continuous_usage_stats"] is (not hidden), "vLLM sends it only with include_usage: so do we"


async def test_a_held_ending_is_recorded_only_once_the_client_has_it() -> None:
    """With the usage chunk hidden, the chunk that ends a choice waits for it; a client that leaves meanwhile never
    got that chunk, and its record keeps what it got: no "!" and no finish reason for choice 0 (they were taken into
    the record as the chunk was held)."""
    events = [
        chunk(choices=[{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]),
        chunk(choices=[{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]),
        chunk(choices=[{"index": 1, "delta": {"content": "Yo"}, "finish_reason": None}]),
    ]
    connection, closed, answer = Connection(), [], Answer()
    upstream = Upstream(events, hangs=True)

    async def send(message: dict[str, Any]) -> None:
        if b'"Yo"' in message.get("body", b""):
            connection.gone.set()

    relay = RelayResponse(upstream, answer, lambda: None, closed.append, hide_usage=True)  # type: ignore[arg-type]
    await asyncio.wait_for(relay({"type": "http"}, connection.receive, send), 5)
    assert closed == [CLIENT_CLOSED]
    assert [(c["text"], c.get("finish_reason")) for c in answer.choice_dicts()] == [("Hi", None), ("Yo", None)]
    whole = Answer()
    await asyncio.wait_for(
        RelayResponse(Upstream([*events, USAGE, DONE], hangs=False), whole, lambda: None, [].append, hide_usage=True)(  # type: ignore[arg-type]
            {"type": "http"}, Connection().receive, send
        ),
        5,
    )
    assert [(c["text"], c.get("finish_reason")) for c in whole.choice_dicts()] == [("Hi!", "stop"), ("Yo", None)]
    assert whole.usage == {"prompt_tokens": 3, "completion_tokens": 4}
