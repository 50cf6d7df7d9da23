from __future__ import annotations

import json

from gateway.errors import APIError, EngineUnavailable, ModelNotFound, PayloadTooLarge, sse_error_frame
from gateway.serving import normalise_error, usage_from_tail


def test_envelope_shape_and_status() -> None:
    for exc, status in ((ModelNotFound("x"), 404), (PayloadTooLarge("big"), 413), (EngineUnavailable("down"), 503)):
        body = exc.body()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert exc.status == status
    assert ModelNotFound("x").body()["error"]["param"] == "model"


def test_sse_error_frame_ends_the_stream() -> None:
    frame = sse_error_frame(APIError("boom"))
    events = [e for e in frame.decode().split("\n\n") if e]
    assert json.loads(events[0].removeprefix("data: "))["error"]["message"] == "boom"
    assert events[-1] == "data: [DONE]"


def test_engine_errors_get_openai_types() -> None:
    vllm = json.dumps({"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}})
    out = json.loads(normalise_error(400, vllm.encode()))["error"]
    assert out == {"message": "too long", "type": "invalid_request_error", "param": None, "code": None}


def test_engine_html_or_garbage_never_leaks() -> None:
    out = json.loads(normalise_error(500, b"<html>Traceback (most recent call last)...</html>"))["error"]
    assert "Traceback" not in out["message"] and out["type"] == "server_error"


def test_usage_is_read_from_the_stream_tail() -> None:
    tail = (
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\ndata: [DONE]\n\n'
    )
    assert usage_from_tail(tail) == {"prompt_tokens": 3, "completion_tokens": 5}
    assert usage_from_tail(b'data: {"choices":[]}\n\ndata: [DONE]\n\n') is None
