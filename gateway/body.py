"""Reading a request body: size-capped, parsed once, errors in OpenAI's words."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pydantic_core
from starlette.requests import ClientDisconnect, Request

from gateway.errors import ClientClosed, InvalidRequest, PayloadTooLarge

_NUMBER_SHAPES = bytes.maketrans(b"123456789E", b"000000000e")
"""Every digit read as 0 and every exponent as `e`, with `+` deleted (`_maybe_huge`)."""
_LONG_RUN = b"0" * 200
IN_THREAD_BYTES = 262_144
"""From this size on, a body is parsed in a worker thread (`parse_json_beside`): pydantic's parser alone took 0.33 s
for 4 MiB on the AVX2 kind, so about 20 ms at this size. A chat request is rarely larger."""


def _maybe_huge(raw: bytes) -> bool:
    """Whether the body holds somewhere what a number needs to parse to an infinite float: an exponent of 3 digits or
    more, or 200 digits in a row (below both, a number is under 10^299, and floats reach 1.8 x 10^308). Most bodies
    hold neither, and skip the walk over every value; one that does (a prompt saying "e100" too) is walked. Two byte
    searches over a translated copy: about 1.5 µs for a short chat request (a regular expression took 13)."""
    shapes = raw.translate(_NUMBER_SHAPES, b"+")
    return b"e000" in shapes or _LONG_RUN in shapes


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    return (await read_json_sized(request, max_bytes))[0]


async def read_json_sized(request: Request, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The body's JSON object and its size in bytes (as read: a chunked body declares no length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {max_bytes} bytes.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"Request body exceeds the limit of {max_bytes} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosed("The client closed the connection before its request body was read.") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    payload = await parse_json_beside(raw)
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload, size


async def parse_json_beside(raw: bytes) -> Any:
    """`parse_json`, in a worker thread for a body of IN_THREAD_BYTES or more: 4 MiB of small numbers took the event
    loop every request of the process waits on 2 s to parse and check (an admin route's body is parsed before its
    key is checked, and a completion's before its quota is)."""
    if len(raw) < IN_THREAD_BYTES:
        return parse_json(raw)
    return await asyncio.to_thread(parse_json, raw)


def parse_json(raw: bytes) -> Any:
    """A body's JSON, as every route reads it (gateway.routes.strict_json too): by pydantic's parser, which refuses
    what could be neither stored nor answered (a lone surrogate), and with finite numbers only (no NaN, Infinity or
    1e400). InvalidRequest, in OpenAI's words, for anything else."""
    try:
        payload = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). The OpenAI API expects a JSON payload."
        ) from exc
    if _maybe_huge(raw) and not _finite(payload):
        raise InvalidRequest("The request body holds a number too large to represent; JSON numbers must be finite.")
    return payload


def _finite(value: object) -> bool:
    """JSON allows 1e400, which parses to inf and could not be sent on as valid JSON."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True
