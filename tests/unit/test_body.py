"""A request body's numbers must be finite: 1e400 parses to inf, which could not be sent on as JSON."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from gateway.body import _maybe_huge, read_json_sized
from gateway.errors import InvalidRequest


def _read(raw: bytes) -> dict[str, object]:
    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    return asyncio.run(read_json_sized(request, 1 << 20))[0]


@pytest.mark.parametrize(
    "number", [b"1e400", b"1E+0400", b"-2.5e309", b"1" + b"0" * 400 + b".0", b"9" * 210 + b".5e99", b"1.8e308"]
)
def test_a_number_too_large_for_a_float_is_refused(number: bytes) -> None:
    with pytest.raises(InvalidRequest, match="too large to represent"):
        _read(b'{"prompt": "hi", "n": [1, {"x": %s}]}' % number)


@pytest.mark.parametrize("number", [b"1e308", b"1e-400", b"1" + b"0" * 400, b"9" * 199 + b".5e99", b"1.7e0308"])
def test_large_but_finite_numbers_and_big_integers_pass(number: bytes) -> None:
    assert _read(b'{"prompt": "e100 e999", "n": %s}' % number)["prompt"] == "e100 e999"


def test_an_ordinary_body_is_read_whole() -> None:
    assert _read(b'{"prompt": "hi", "temperature": 0.7, "max_tokens": 16}') == {
        "prompt": "hi",
        "temperature": 0.7,
        "max_tokens": 16,
    }


@pytest.mark.parametrize("number", [b"1e400", b"1E+0400", b"2.5E+309", b"1e0000100", b"7" * 200])
def test_the_cheap_check_finds_every_shape_that_could_overflow(number: bytes) -> None:
    assert _maybe_huge(b'{"n": %s}' % number)


def test_an_ordinary_chat_request_skips_the_walk() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "3 jokes, e.g. 100"}], "temperature": 1e-5}'
    assert not _maybe_huge(body)
