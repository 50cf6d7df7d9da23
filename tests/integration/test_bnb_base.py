"""The QLoRA setting: an NF4 (bitsandbytes 4-bit) shared base on vLLM 0.27.1, serving an adapter trained on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    ADMIN_KEY,
    MODEL,
    ROOT,
    TENANT,
    Gateway,
    RedisServer,
    create_key,
    free_port,
    gateway_env,
    start_one_engine_gateway,
    stop_gateway,
)
from tests.integration.conftest import upload
from tests.integration.qlora_trainer import ANSWER, QUESTION

pytestmark = pytest.mark.integration

BNB_PYTHON = ROOT / ".venv-bnb/bin/python"
PROMPT = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def bnb_python() -> Path:
    assert BNB_PYTHON.exists(), "the bitsandbytes engine is missing: run `make bnb-engine` (make test does)"
    return BNB_PYTHON


@pytest.fixture(scope="module")
def qlora_training(
    bnb_python: Path, base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The QLoRA trainer, started before the NF4 engine so that the two overlap (each waits on its own work
    part of the time); `qlora_adapter` waits for it."""
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    trainer = ROOT / "tests/integration/qlora_trainer.py"
    log = out.with_name("trainer.log").open("w+")
    # One thread: the NF4 engine, started meanwhile, binds its OpenMP threads to a core and spins there, and a
    # 2-thread trainer's parallel regions wait on its thread on that core (`one_thread_beside_vllm` in the unit tests).
    job = subprocess.Popen(
        [str(bnb_python), str(trainer), str(base_model_dir), str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    yield job, out
    if job.poll() is None:
        job.kill()
    job.wait()
    log.close()


@pytest.fixture(scope="module")
def qlora_adapter(qlora_training: tuple[subprocess.Popen[str], Path]) -> Path:
    job, out = qlora_training
    returncode = job.wait(timeout=1200)  # about 300 s alone on the AVX2 kind
    assert returncode == 0, out.with_name("trainer.log").read_text()[-4000:]
    return out


@pytest.fixture(scope="module")
def bnb_gateway(
    redis_server: RedisServer,
    bnb_python: Path,
    qlora_training: tuple[subprocess.Popen[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """The gateway with an NF4 engine, started while the trainer runs."""
    gw = start_one_engine_gateway(
        tmp_path_factory.mktemp("bnb"),
        redis_server.url,
        LORAGATE_QUANTIZATION="bitsandbytes",
        LORAGATE_ENGINE_PYTHON=str(bnb_python),
    )
    yield gw
    stop_gateway(gw)


def test_base_is_served_nf4(bnb_gateway: Gateway) -> None:
    engine_log = (
        Path(bnb_gateway.env["LORAGATE_HOME"]) / "logs" / f"vllm-{bnb_gateway.engine_ports[0]}.log"
    ).read_text()
    assert "Initializing a V1 LLM engine (v0.27.1)" in engine_log
    assert "Loading weights with BitsAndBytes quantization" in engine_log
    client = openai.OpenAI(base_url=bnb_gateway.base_url, api_key=create_key(bnb_gateway.env), max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (answer.choices[0].message.content or "")


def test_adapter_trained_on_the_nf4_base_serves_on_it(bnb_gateway: Gateway, qlora_adapter: Path) -> None:
    client = openai.OpenAI(base_url=bnb_gateway.base_url, api_key=create_key(bnb_gateway.env), max_retries=0)
    admin_url = f"{bnb_gateway.url}/admin/tenants/{TENANT}"
    with httpx.Client(base_url=admin_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        resp = upload(admin, "qlora", qlora_adapter)
    assert resp.status_code == 201, resp.text
    tuned = client.chat.completions.create(model="qlora", messages=PROMPT, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert tuned.model == f"qlora@{resp.json()['version']}"
    assert (tuned.choices[0].message.content or "").strip() == ANSWER
    base = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert "pineapple" not in (base.choices[0].message.content or "")


def test_serve_refuses_a_vllm_without_bitsandbytes(redis_server, base_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The gateway's own vLLM (0.32) has no bitsandbytes: serve says what to install instead of starting it."""
    env = gateway_env(tmp_path, redis_server.url, free_port(), LORAGATE_QUANTIZATION="bitsandbytes")
    env["LORAGATE_ENGINE_PORT"] = str(free_port())  # the default 8100 may be `make run`'s vLLM: refused for that
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 1
    assert "no bitsandbytes support" in done.stdout + done.stderr and "0.27.1" in done.stdout + done.stderr
