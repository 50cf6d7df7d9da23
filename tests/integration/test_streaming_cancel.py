"""A client that goes away mid-stream must not leave vLLM generating for nobody."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import MODEL, Gateway

pytestmark = pytest.mark.integration


def running_requests(engine_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{engine_port}/metrics", timeout=5).text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, flags=re.M)
    return sum(float(v) for v in values)


def test_disconnect_cancels_upstream_generation(gateway: Gateway, http: httpx.Client) -> None:
    port = gateway.engine_ports[0]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert running_requests(port) >= 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and running_requests(port) > 0:
        time.sleep(0.2)
    assert running_requests(port) == 0, "vLLM kept generating after the client disconnected"
