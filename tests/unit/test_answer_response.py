"""A whole answer's request is finished (quota, metrics, log) once it is sent: exactly once, whether sending
works, fails, or never happens; a failure to finish never replaces the answer or its sending's own error."""

from __future__ import annotations

import gc
from collections.abc import MutableMapping
from typing import Any

import pytest

from gateway.serving import AnswerResponse

pytestmark = pytest.mark.asyncio
SCOPE: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_finished_after_the_answer_is_sent_and_once() -> None:
    events: list[str] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        events.append(message["type"])

    response = AnswerResponse(b'{"id": "chatcmpl-1"}', 200, lambda status: events.append(f"finish {status}"))
    await response(SCOPE, receive, send)
    del response
    gc.collect()
    assert events == ["http.response.start", "http.response.body", "finish 200"]


async def test_finished_when_sending_fails_and_the_sending_error_is_raised() -> None:
    statuses: list[int] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        raise OSError("connection reset")

    def finish(status: int) -> None:
        statuses.append(status)
        raise RuntimeError("a bug in finishing")

    with pytest.raises(OSError, match="connection reset"):
        await AnswerResponse(b"{}", 200, finish)(SCOPE, receive, send)
    assert statuses == [200]


async def test_finished_when_dropped_unsent() -> None:
    statuses: list[int] = []
    AnswerResponse(b"{}", 201, statuses.append)
    gc.collect()
    assert statuses == [201]
