"""Unit tests that need Redis use the session's real redis-server, flushed for each test; adapter tests
share a tiny Llama-shaped base."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis
from safetensors.numpy import save_file

from adapters.validate import BaseModelSpec
from tests.conftest import RedisServer


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseModelSpec:
    """A tiny Llama-shaped base: two layers, hidden 32, with the module names a real one has."""
    folder = tmp_path_factory.mktemp("base")
    hidden, inter, kv = 32, 64, 16
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    tensors = {"model.embed_tokens.weight": np.zeros((100, hidden), np.float32)}
    for layer in range(2):
        for module, shape in shapes.items():
            block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            tensors[f"model.layers.{layer}.{block}.{module}.weight"] = np.zeros(shape, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "_name_or_path": "Tiny-Llama"})
    )
    return BaseModelSpec.from_folder(folder, "tiny-base")
