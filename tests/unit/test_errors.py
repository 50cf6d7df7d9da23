from __future__ import annotations

import json
import math
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessage
from pydantic import ValidationError
from starlette.testclient import TestClient

from gateway.apikeys import InvalidKeyRequest, parse_duration
from gateway.errors import (
    APIError,
    EngineUnavailable,
    ModelNotFound,
    PayloadTooLarge,
    from_validation_error,
    redact_internals,
    sse_error_frame,
)
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.records import CorrectionMessage, FeedbackIn
from gateway.serving import client_error_body, usage_of
from gateway.streaming import client_error_event
from tests.unit.admin_api import ADMIN, BASE


def test_envelope_shape_and_status() -> None:
    for exc, status in ((ModelNotFound("x"), 404), (PayloadTooLarge("big"), 413), (EngineUnavailable("down"), 503)):
        body = exc.body()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert exc.status == status
    assert ModelNotFound("x").body()["error"]["param"] is None, "as OpenAI answers it"
    assert len(ModelNotFound("m" * 100_000).body()["error"]["message"]) < 400, "a huge name is not echoed whole"


def test_sse_error_frame_ends_the_stream() -> None:
    frame = sse_error_frame(APIError("boom"))
    events = [e for e in frame.decode().split("\n\n") if e]
    assert json.loads(events[0].removeprefix("data: "))["error"]["message"] == "boom"
    assert events[-1] == "data: [DONE]"


def test_engine_refusals_get_openai_types() -> None:
    vllm = json.dumps({"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}})
    out = json.loads(client_error_body(400, vllm.encode()))["error"]
    assert out == {"message": "too long", "type": "invalid_request_error", "param": None, "code": None}


@pytest.mark.parametrize("param", [{"x": 1}, 5, ["messages"], True])
def test_an_engine_param_that_is_not_a_string_is_not_passed_on(param: object) -> None:
    """OpenAI's envelope has a string or null there: anything else an engine sent would break the client's parsing."""
    vllm = json.dumps({"error": {"message": "bad", "param": param, "code": "bad_thing"}})
    out = json.loads(client_error_body(400, vllm.encode()))["error"]
    assert out == {"message": "bad", "type": "invalid_request_error", "param": None, "code": "bad_thing"}


def test_engine_html_or_garbage_never_leaks() -> None:
    out = json.loads(client_error_body(400, b"<html>Traceback (most recent call last)...</html>"))["error"]
    assert "Traceback" not in out["message"] and out["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "message",
    [
        "Cannot connect to host 127.0.0.1:8100 ssl:default",
        "Loading lora support-bot@1 failed: No adapter found for /var/lib/loragate/adapters/support-bot/v1",
        "see http://vllm-0.vllm.svc:8000/v1/models",
        "connect to localhost:8100 refused",
        "Cannot connect to host vllm-0.vllm.svc:8100 ssl:default",
        "Cannot connect to host [::1]:8100",
        "Cannot connect to host vllm-0:8100 ssl:default",
        "Error -2 connecting to redis-primary:8100. Name or service not known.",
        "no such file: /data",
    ],
)
def test_internal_addresses_and_paths_are_redacted(message: str) -> None:
    out = redact_internals(message)
    for secret in ("127.0.0.1", "8100", "/var/lib", "vllm-0", "localhost", "::1", "/data", "redis-primary"):
        assert secret not in out
    assert "<internal>" in out


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 8192 tokens; you asked for 9000 (prompt/answer).",
        "min_tokens must be less than or equal to max_tokens=5, got 50.",
        "at 12.5 tokens/s, 1/2 of the time; see name@version, e.g. support-bot@3; at 10:30",
        "Expected a string at messages.0.content: 42; max_tokens=16, n: 2",
        "line 1 column:12, error code:400, maximum context length:8192, max-lora-rank:64, n:16, status:500",
        "token_id(s) [99999999] in logit_bias are out of vocab; value=[0.5], stop=[ab], [deadbeef], [0:5]",
    ],
)
def test_ordinary_messages_are_kept(message: str) -> None:
    assert redact_internals(message) == message


def test_in_stream_engine_failures_lose_their_internals() -> None:
    dead = json.dumps(
        {"error": {"message": "EngineCore encountered an issue. See stack trace (above)", "code": 500}}
    ).encode()
    out = json.loads(client_error_event(b"data: " + dead).removeprefix(b"data: "))["error"]
    assert "EngineCore" not in out["message"] and out["type"] == "server_error"
    refused = json.dumps({"error": {"message": "bad regex at /opt/x/y.py", "code": 400}}).encode()
    out = json.loads(client_error_event(b"data: " + refused).removeprefix(b"data: "))["error"]
    assert out["type"] == "invalid_request_error" and out["message"] == "bad regex at <internal>"


def test_usage_is_read_from_a_whole_answer_without_parsing_it_all() -> None:
    usage = {"prompt_tokens": 3, "total_tokens": 8, "completion_tokens": 5}
    answer = {"id": "x", "choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 99}'}}], "usage": usage}
    assert usage_of(json.dumps(answer).encode()) == usage
    assert usage_of(json.dumps({"usage": None}).encode()) is None
    assert usage_of(b'{"choices": []}') is None


def test_numbers_too_large_for_a_float_are_the_callers_error() -> None:
    """JSON integers have no size limit: one past a float's range is a 400 naming its field, not a 500."""
    with pytest.raises(ValidationError) as info:
        FeedbackIn.model_validate({"completion_id": "chatcmpl-1", "score": 10**400})
    assert from_validation_error(info.value).param == "score"
    for duration in (10**400, "9" * 400 + "d", math.inf, math.nan, 200 * 365 * 86400):
        with pytest.raises(InvalidKeyRequest):
            parse_duration(duration)
    assert parse_duration("7d") == 7 * 86400


WEATHER_CALL = {"name": "weather", "arguments": '{"city": "Paris"}'}


def test_a_correction_is_a_text_or_an_answers_message_that_calls_tools_as_the_api_takes_them() -> None:
    """The SDK's `message.model_dump()` of an answer that called a tool is taken as it is (its empty response-only
    fields dropped); a filled one, a call's name the API refuses, or arguments that are no JSON object are 400s."""
    answered = ChatCompletionMessage.model_validate(
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": WEATHER_CALL}]}
    )
    taken = FeedbackIn.model_validate({"completion_id": "chatcmpl-1", "correction": answered.model_dump()})
    assert isinstance(taken.correction, CorrectionMessage) and taken.correction.tool_calls[0].function.name == "weather"
    text_only = ChatCompletionMessage(role="assistant", content="Sunny.").model_dump()  # `tool_calls: null`
    assert FeedbackIn.model_validate({"completion_id": "c", "correction": text_only}).correction == CorrectionMessage(
        content="Sunny."
    )
    refused = {
        "refusal": {"content": "x", "refusal": "no"},
        "empty": {"content": "", "tool_calls": []},
        "name": {"tool_calls": [{"function": {"name": "get weather", "arguments": "{}"}}]},
        "arguments": {"tool_calls": [{"function": {"name": "weather", "arguments": "[1]"}}]},
        "deep": {"tool_calls": [{"function": {"name": "weather", "arguments": "[" * 90_000}}]},
        "type": 5,
    }
    for why, correction in refused.items():
        with pytest.raises(ValidationError) as info:
            FeedbackIn.model_validate({"completion_id": "c", "correction": correction})
        error = from_validation_error(info.value)
        assert error.param and error.param.startswith("correction"), (why, error.body())


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("request_class", "fields", "param", "expected"),
    [
        (ChatCompletionRequest, {"stop": 5}, "stop", "expected one of: str, list[str], but got an integer"),
        (ChatCompletionRequest, {"stop": [1]}, "stop[0]", "expected a string, but got an integer"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [1]}]}, "messages[0].content[0]", "object"),
        (CompletionRequest, {"prompt": 5}, "prompt", "expected one of: str, list[str], list[int], list[list[int]]"),
        (CompletionRequest, {"prompt": ["a", 2]}, "prompt[1]", "expected a string, but got an integer"),
        (CompletionRequest, {"prompt": [[1, "a"]]}, "prompt[0][1]", "expected an integer, but got a string"),
    ],
)
def test_a_union_names_the_member_the_value_fits(
    request_class: type[CompletionRequest | ChatCompletionRequest], fields: dict, param: str, expected: str
) -> None:
    """A value of none of a union's JSON types lists them all; one of the right type with a wrong part
    inside names that part, as the member it fits says (not another member's type)."""
    body = {"model": "m", **({"messages": HI} if request_class is ChatCompletionRequest else {}), **fields}
    with pytest.raises(ValidationError) as info:
        request_class.model_validate(body)
    error = from_validation_error(info.value)
    assert (error.param, error.code) == (param, "invalid_type")
    assert f"Invalid type for '{param}'" in error.message and expected in error.message


def test_a_long_engine_message_is_cut_at_a_space_before_its_redaction() -> None:
    """It may echo a client's text; the redaction of 20 KB of `a.a.a...` took seconds on the event loop."""
    from gateway.errors import MAX_ENGINE_MESSAGE_CHARS

    out = redact_internals("a." * 50_000)
    assert len(out) <= MAX_ENGINE_MESSAGE_CHARS + 10 and out.endswith(" (cut)")
    cut = redact_internals("x " * (MAX_ENGINE_MESSAGE_CHARS // 2 - 4) + "from 10.20.30.40:8000 on")
    assert "10.20" not in cut and "10.20.30" not in cut, "an address across the cut is left out whole"


def test_the_end_of_a_stream_is_its_own_event_not_a_tokens_text() -> None:
    from gateway.streaming import _ends

    token = b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n'
    assert not _ends(token), "a model writing about SSE"
    assert _ends(b"data: [DONE]\n\n") and _ends(token + b"data: [DONE]\n\n")


def test_an_unexpected_500_names_its_request(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette answers an unexpected exception from its outermost middleware, outside the request-id
    one: the 500 still carries the id the log line names, and nothing of the exception."""

    async def broken() -> None:
        raise RuntimeError("internal detail at 10.0.0.7")

    monkeypatch.setattr(api.app.state.services.tenants, "all", broken)
    client = TestClient(api.app, headers=ADMIN, raise_server_exceptions=False)  # no `with`: one lifespan is running
    response = client.get("/admin/tenants")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "10.0.0.7" not in response.text
    assert len(response.headers["x-request-id"]) == 32


def test_an_unexpected_500_of_an_admitted_request_keeps_its_rate_limit_headers(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request was counted against its tenant's limits before it failed: the client still learns where those
    stand, as on any other answer."""
    assert api.patch("/admin/tenants/acme", json={"limits": {"rpm": 60}}).status_code == 200
    key = api.post("/admin/tenants/acme/keys", json={}).json()["key"]

    async def broken(_: Any) -> None:
        raise RuntimeError("internal detail at 10.0.0.7")

    monkeypatch.setattr(api.app.state.services.forwarder, "forward", broken)
    monkeypatch.setattr(api._transport, "raise_server_exceptions", False)  # the lifespan's loop holds Redis's pool
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    response = api.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 500 and "10.0.0.7" not in response.text
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert response.headers["x-ratelimit-remaining-requests"] == "59" and len(response.headers["x-request-id"]) == 32
