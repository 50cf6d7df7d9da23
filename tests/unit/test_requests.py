"""Shaping a request before it is forwarded: the max_tokens cap, and cancelling work when the client leaves."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingParams
from gateway.routes.openai import cap_max_tokens
from gateway.streaming import ClientGone, unless_disconnected

MSG = [{"role": "user", "content": "hi"}]


def capped(schema: type[SamplingParams], cap: int, **fields: Any) -> dict[str, Any]:
    payload = {"model": "m", **fields}
    cap_max_tokens(payload, schema.model_validate(payload), cap)
    return payload


def test_a_request_without_a_limit_gets_the_cap() -> None:
    assert capped(ChatCompletionRequest, 64, messages=MSG)["max_tokens"] == 64
    assert capped(CompletionRequest, 64, prompt="x")["max_tokens"] == 64


def test_a_request_over_the_cap_is_lowered_and_one_under_it_kept() -> None:
    assert capped(CompletionRequest, 64, prompt="x", max_tokens=1000)["max_tokens"] == 64
    assert capped(CompletionRequest, 64, prompt="x", max_tokens=10)["max_tokens"] == 10
    chat = capped(ChatCompletionRequest, 64, messages=MSG, max_completion_tokens=500, max_tokens=20)
    assert (chat["max_completion_tokens"], chat["max_tokens"]) == (64, 20)
    assert "max_tokens" not in capped(ChatCompletionRequest, 64, messages=MSG, max_completion_tokens=5)


def test_an_unvalidated_extra_named_like_a_limit_is_left_to_the_engine() -> None:
    """Completions have no max_completion_tokens: an extra of that name is not compared (it may be anything)."""
    payload = capped(CompletionRequest, 64, prompt="x", max_completion_tokens="lots")
    assert payload["max_completion_tokens"] == "lots" and payload["max_tokens"] == 64


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


async def test_errors_of_the_work_reach_the_caller() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await unless_disconnected(fail(), Connection().receive)
