"""A replica dies: requests move to the other one (loading their adapter there), and the supervisor
brings the dead one back. Runs last: it costs one vLLM start-up."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from adapters.validate import BaseModelSpec
from tests.conftest import MODEL, Gateway
from tests.integration.conftest import add_synthetic, loaded_on

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi"}]


def engine_process(gateway: Gateway, port: int) -> psutil.Process:
    for child in psutil.Process(gateway.process.pid).children(recursive=True):
        cmdline = child.cmdline()
        if cmdline[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and str(port) in cmdline:
            return child
    raise AssertionError(f"the gateway is not supervising a vLLM process on port {port}")


def test_requests_survive_a_dead_replica_which_is_restarted(
    gateway: Gateway, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    ref = add_synthetic(admin, base_spec, tmp_path, "survivor", seed=91)
    first = client.chat.completions.create(model="survivor", messages=HI, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    holder = next(port for port in gateway.engine_ports if ref in loaded_on(port))
    other = next(port for port in gateway.engine_ports if port != holder)
    victim = engine_process(gateway, holder)
    os.killpg(os.getpgid(victim.pid), signal.SIGKILL)

    again = client.chat.completions.create(model="survivor", messages=HI, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert again.model == ref and again.choices[0].message.content == first.choices[0].message.content
    assert ref in loaded_on(other), "the adapter was loaded on the surviving replica"
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and list(ready.json()["engines"].values()).count("unreachable") == 1

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and set(httpx.get(f"{gateway.url}/readyz").json()["engines"].values()) != {"ok"}:
        time.sleep(1)
    assert set(httpx.get(f"{gateway.url}/readyz").json()["engines"].values()) == {"ok"}, gateway.log_tail()
    assert engine_process(gateway, holder).pid != victim.pid
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3).choices[0].message.content  # type: ignore[arg-type]
