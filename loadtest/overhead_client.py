"""The overhead benchmark's client (loadtest.overhead): request bodies, one request timed to its first and last
byte, the checks before timing (aiohttp), and a closed-loop segment of C clients (loadtest.wire: a raw
asyncio protocol, for the client's CPU per request; loadtest.records uses it too)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest import wire
from loadtest.load import MESSAGES
from loadtest.services import MODEL, BenchError


def request_body(stream: bool, model: str = MODEL) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 64, "temperature": 0.7}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]
    model: str = MODEL
    """The `model` its requests name (an alias, for the tenancy target)."""


async def call(session: aiohttp.ClientSession, target: Target, body: bytes, stream: bool) -> tuple[float, float]:
    """One request read to its end: (time to first body byte, time to last byte), in seconds."""
    started = time.perf_counter()
    async with session.post(target.url, data=body, headers=target.headers) as resp:
        if stream:
            first = 0.0
            end = b""
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.perf_counter()
                end = (end + chunk)[-32:]
            done = time.perf_counter()
            if resp.status == 200 and not end.endswith(b"data: [DONE]\n\n"):
                raise BenchError(f"{target.name}: stream did not end with [DONE]: {end!r}")
        else:
            raw = await resp.read()
            done = first = time.perf_counter()
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace") if stream else raw.decode(errors="replace")
            raise BenchError(f"{target.name} answered HTTP {resp.status}: {text[:300]}")
    return first - started, done - started


async def checks(session: aiohttp.ClientSession, direct: Target, gateway: Target) -> dict[str, Any]:
    """Make sure both targets answer as expected before timing them."""
    out: dict[str, Any] = {}
    sent_id = "loadtest-check"
    body = request_body(False)
    async with session.post(direct.url, data=body, headers={**direct.headers, "X-Request-Id": sent_id}) as resp:
        data = await resp.json()
        if resp.status != 200 or data.get("id") != f"chatcmpl-{sent_id}":
            raise BenchError(f"mock upstream answered {resp.status}: {data}")
    async with session.post(gateway.url, data=body, headers={**gateway.headers, "X-Request-Id": sent_id}) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise BenchError(f"gateway answered HTTP {resp.status}: {data}")
        header_id = resp.headers.get("x-request-id")
        out["gateway_response_id_matches_x_request_id"] = data.get("id") == f"chatcmpl-{header_id}"
        out["gateway_propagates_client_x_request_id"] = data.get("id") == f"chatcmpl-{sent_id}"
        if not out["gateway_response_id_matches_x_request_id"]:
            raise BenchError(f"gateway id {data.get('id')!r} does not match its x-request-id {header_id!r}")
    async with session.post(gateway.url, data=body, headers={"Content-Type": "application/json"}) as resp:
        out["gateway_without_key_status"] = resp.status
        await resp.read()
        if resp.status != 401:
            raise BenchError(f"gateway without a key answered HTTP {resp.status}, expected 401")
    async with session.post(gateway.url, data=request_body(True), headers=gateway.headers) as resp:
        raw = await resp.read()
        events = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
        out["gateway_stream_events"] = len(events)
        if resp.status != 200 or events[-1:] != [b"data: [DONE]"]:
            raise BenchError(f"gateway stream answered {resp.status}: {raw[-300:]!r}")
    return out


async def load_segment(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    concurrency: int,
    duration_s: float | None,
    count: int | None = None,
) -> tuple[list[float], int, float]:
    """`concurrency` connections of loadtest.wire in a closed loop until the time is up (or `count` requests
    each); `session` is not used. Returns the latencies of the 200s, the errors and the seconds from the
    first request sent (the connections open) to the last answer."""
    address, requests = wire.build("POST", target.url, target.headers, [body])
    result = await wire.closed_loop(address, requests, concurrency, duration_s or None, count)
    return result.latencies_s, result.errors, result.elapsed_s
