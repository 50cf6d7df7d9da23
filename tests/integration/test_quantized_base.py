"""The shared base served 4-bit (W4A16), with adapters on top, where this machine's vLLM has the
kernel (AVX-512 CPUs, GPUs); refused before any engine starts where it has not (AVX2-only CPUs).
One test, both branches: which one runs is decided by probing the machine, the way `serve` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from adapters.validate import BaseModelSpec
from gateway.engine.capabilities import probe
from tests.conftest import (
    ADMIN_KEY,
    MODEL,
    ROOT,
    TENANT,
    RedisServer,
    create_key,
    free_port,
    gateway_env,
    start_one_engine_gateway,
    stop_gateway,
)
from tests.integration.conftest import add_synthetic

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def serve_w4a16(redis: RedisServer, home: Path, base_spec: BaseModelSpec) -> None:
    gw = start_one_engine_gateway(home, redis.url, LORAGATE_QUANTIZATION="w4a16")
    try:
        models = httpx.get(f"http://127.0.0.1:{gw.engine_ports[0]}/v1/models").json()["data"]
        assert models[0]["root"].endswith(f"{MODEL}-w4a16"), "vLLM serves the 4-bit copy"
        client = openai.OpenAI(base_url=gw.base_url, api_key=create_key(gw.env), max_retries=0)
        base = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        assert "Paris" in (base.choices[0].message.content or "")
        admin_url = f"{gw.url}/admin/tenants/{TENANT}"
        with httpx.Client(base_url=admin_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            ref = add_synthetic(admin, base_spec, home, "on-4bit", seed=5)
        tuned = client.chat.completions.create(model="on-4bit", messages=PROMPT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        assert tuned.model == ref
        assert tuned.choices[0].message.content != base.choices[0].message.content
    finally:
        stop_gateway(gw)


def refuse_w4a16(redis: RedisServer, home: Path) -> None:
    env = gateway_env(
        home, redis.url, free_port(), LORAGATE_QUANTIZATION="w4a16", LORAGATE_ENGINE_PORT=str(free_port())
    )
    copy = Path(env["LORAGATE_MODEL_CACHE"]) / f"{MODEL}-w4a16"
    had_copy = copy.exists()
    for command in (["serve"], ["model", "prepare"]):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *command], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        said = done.stdout + done.stderr
        assert done.returncode == 1, said
        assert "cpu_gemm_wna16" in said and "AVX2 only" in said, said
        assert "LORAGATE_QUANTIZATION=none" in said, "the refusal says what to use instead"
    assert not (home / "logs").exists(), "no engine was started"
    assert copy.exists() == had_copy, "no 4-bit copy was built for nothing"


def test_w4a16_serves_adapters_where_the_kernel_exists_and_is_refused_elsewhere(
    redis_server: RedisServer, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    if probe(sys.executable, kernels=True).wna16_kernel:
        serve_w4a16(redis_server, tmp_path, base_spec)
    else:
        refuse_w4a16(redis_server, tmp_path)
