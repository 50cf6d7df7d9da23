"""The supervisor brings vLLM back after it dies. Runs last: it costs one vLLM start-up."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from tests.conftest import MODEL, Gateway

pytestmark = pytest.mark.integration


def engine_process(gateway: Gateway) -> psutil.Process:
    port = str(gateway.engine_ports[0])
    for child in psutil.Process(gateway.process.pid).children(recursive=True):
        cmdline = child.cmdline()
        if "vllm.entrypoints.openai.api_server" in cmdline and port in cmdline:
            return child
    raise AssertionError("the gateway is not supervising a vLLM process")


def test_killed_engine_is_restarted(gateway: Gateway, client: openai.OpenAI) -> None:
    victim = engine_process(gateway)
    os.killpg(os.getpgid(victim.pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and httpx.get(f"{gateway.url}/readyz").status_code == 200:
        time.sleep(0.2)
    assert httpx.get(f"{gateway.url}/readyz").status_code == 503
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 503

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and httpx.get(f"{gateway.url}/readyz").status_code != 200:
        time.sleep(1)
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200, gateway.log_tail()
    assert engine_process(gateway).pid != victim.pid
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.choices[0].message.content
