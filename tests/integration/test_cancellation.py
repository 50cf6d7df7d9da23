"""A client that goes away must not leave vLLM generating for nobody, streaming or not; and no
request may hold an engine for minutes (the max_tokens cap)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway import keys
from tests.conftest import (
    MODEL,
    TENANT,
    Gateway,
    RedisServer,
    create_key,
    start_side_gateway,
    stop_gateway,
    sync_redis_client,
)
from tests.integration.conftest import eventually, metric

pytestmark = pytest.mark.integration

LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 2000,
    "ignore_eos": True,
}


def vllm_metric(gateway: Gateway, name: str) -> float:
    """A vLLM metric summed over the gateway's replicas, read from vLLM itself."""
    total = 0.0
    for port in gateway.engine_ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        total += sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, flags=re.M))
    return total


def running(gateway: Gateway) -> float:
    return vllm_metric(gateway, "vllm:num_requests_running")


def test_stream_disconnect_cancels_upstream_generation(gateway: Gateway, http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        # vLLM's gauge follows its engine's steps, not our reads: wait for it to show the request
        assert eventually(lambda: running(gateway) >= 1, timeout=10), "vLLM never showed the stream running"
    assert eventually(lambda: running(gateway) == 0), "vLLM kept generating after the client disconnected"


async def test_non_stream_disconnect_aborts_the_generation(
    gateway: Gateway, api_key: str, redis_server: RedisServer
) -> None:
    """The client gives up while vLLM is generating: the gateway closes its upstream connection, so
    vLLM aborts the request, as it does when called directly; the log says so. The client leaves only
    once vLLM shows the request running, so a slow first step cannot make it leave too early."""
    tokens_before = vllm_metric(gateway, "vllm:generation_tokens_total")
    gone_before = metric(gateway, "loragate_requests_total", model=MODEL, status="499")
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=120) as client:
        call = asyncio.create_task(
            client.post(
                f"{gateway.base_url}/chat/completions",
                json={**LONG, "user": "impatient"},
                headers={"Authorization": f"Bearer {api_key}"},
            )
        )
        generating, deadline = False, loop.time() + 60
        while not generating and not call.done() and loop.time() < deadline:
            generating = await asyncio.to_thread(running, gateway) >= 1
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert generating and not call.done(), "vLLM never showed the request running while the client waited"
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    assert eventually(lambda: running(gateway) == 0, timeout=10), "vLLM kept generating for a client that left"
    generated = vllm_metric(gateway, "vllm:generation_tokens_total") - tokens_before
    assert generated < LONG["max_tokens"], f"all {generated} tokens were generated: the request was not aborted"
    assert eventually(lambda: metric(gateway, "loragate_requests_total", model=MODEL, status="499") == gone_before + 1)
    store = sync_redis_client(redis_server.url, decode_responses=True)

    def logged() -> list[tuple[str, int, bool]]:
        records = [json.loads(fields["r"]) for _, fields in store.xrange(keys.completion_log(TENANT))]
        return [(r["outcome"], r["status"], r["stream"]) for r in records if r["user"] == "impatient"]

    assert eventually(lambda: bool(logged()), timeout=5)
    assert logged() == [("cancelled", 499, False)], "the log says the client left"
    store.close()


@pytest.fixture(scope="module")
def capped_gateway(gateway: Gateway, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    """A second gateway process on the same vLLM replicas, with a small max_tokens cap."""
    side = start_side_gateway(
        tmp_path_factory.mktemp("capped"), redis_server.url, gateway.engine_ports, LORAGATE_MAX_TOKENS_CAP="5"
    )
    yield side
    stop_gateway(side)


def test_max_tokens_cap_applies_when_none_or_too_many_are_asked(capped_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=capped_gateway.base_url, api_key=create_key(capped_gateway.env), max_retries=0)
    ask = {"model": MODEL, "messages": LONG["messages"], "extra_body": {"ignore_eos": True}}
    for limit in ({}, {"max_tokens": 50}, {"max_completion_tokens": 50}):
        answer = client.chat.completions.create(**ask, **limit)  # type: ignore[call-overload]
        assert answer.usage is not None and answer.usage.completion_tokens == 5, limit
        assert answer.choices[0].finish_reason == "length"
    under = client.chat.completions.create(**ask, max_tokens=3)  # type: ignore[call-overload]
    assert under.usage is not None and under.usage.completion_tokens == 3
    text = client.completions.create(model=MODEL, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert text.usage is not None and text.usage.completion_tokens == 5


def test_a_client_that_leaves_while_sending_its_body_is_a_cancellation(gateway: Gateway, api_key: str) -> None:
    """Headers announce 1,000 bytes, 20 arrive, the connection closes: a 499 in the metrics, like a client
    that leaves while its answer is generated, and no traceback in the gateway's log."""
    gone_before = metric(gateway, "loragate_requests_total", status="499")
    port = int(gateway.url.rsplit(":", 1)[1])
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    log_before = len(gateway.log_tail(10**9))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"model": "x", "mes')
        time.sleep(0.3)
    assert eventually(lambda: metric(gateway, "loragate_requests_total", status="499") == gone_before + 1)
    assert "Traceback" not in gateway.log_tail(10**9)[log_before:]
