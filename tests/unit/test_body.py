"""A request body's numbers must be finite: 1e400 parses to inf, which could not be sent on as JSON."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from gateway.body import IN_THREAD_BYTES, _maybe_huge, parse_json_beside, read_json_sized
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


async def test_a_large_body_is_parsed_beside_the_event_loop() -> None:
    """4 MiB of small numbers and one `1e000` (which sends the body through the walk over every value) held the event
    loop of every request 2 s, before the key of an admin route was even checked. From IN_THREAD_BYTES on, the
    parse runs in a worker thread: the loop keeps turning meanwhile."""
    raw = b'{"name": [' + b"0," * 1_000_000 + b"1e000, 1e400]}"
    assert len(raw) > IN_THREAD_BYTES
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = turns
    with pytest.raises(InvalidRequest, match="too large to represent"):
        await parse_json_beside(raw)
    ticker.cancel()
    assert turns - before > 10, "the loop turned while the body was parsed"
    assert await parse_json_beside(b'{"a": 1}') == {"a": 1}, "a small body: at once, on the loop"
