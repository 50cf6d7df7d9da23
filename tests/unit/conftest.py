"""Unit tests that need Redis use the session's real redis-server, flushed for each test; adapter tests
share a tiny Llama-shaped base; `api` is the admin API in process, with no engine behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from safetensors.numpy import save_file
from starlette.testclient import TestClient

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.tenants import TenantStore
from tests.conftest import RedisServer, free_port, redis_client, sync_redis_client
from tests.unit.admin_api import ADMIN, BASE


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop it or change its settings."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def recorder(redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Recorder]:
    """A completion log recorder running on the session's Redis (records built in a thread), its spool in tmp_path."""
    spool = Spool(tmp_path / "records", fsync=False)
    spool.open()
    found = Recorder(redis, spool, Metrics())
    task = asyncio.create_task(found.run())
    yield found
    await found.stop()
    await task
    await found.close()


@asynccontextmanager
async def emptied(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of `server`'s database, emptied first, closed after. Redis frees the old keys in the background
    (FLUSHDB ASYNC): a flush after a test's 80 MB log once outlasted redis-py's 5 s default in CI."""
    client = redis_client(server.url, decode_responses=True)
    await client.flushdb(asynchronous=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with emptied(redis_server) as client:
        yield client


@pytest.fixture
async def experiment_tenants(redis: aioredis.Redis) -> None:
    """Tenants `t` and `acme`, whose experiments unit tests make (one is created only for a tenant that exists)."""
    for name in ("t", "acme"):
        await TenantStore(redis).create(name)


@pytest.fixture(scope="module")
def base(tiny_base_dir: Path) -> BaseModelSpec:
    return BaseModelSpec.from_folder(tiny_base_dir, "tiny-base")


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    return folder


@pytest.fixture
def api(redis_server: RedisServer, tmp_path: Path, base: BaseModelSpec) -> Iterator[TestClient]:
    """The admin API of a gateway in this process, on a flushed Redis: tenant `acme` with `bot@1..3`."""
    with sync_redis_client(redis_server.url) as state:
        state.flushdb(asynchronous=True)
    settings = Settings(
        home=tmp_path,
        redis_url=redis_server.url,
        served_model_name=BASE,
        admin_key=SecretStr(ADMIN["Authorization"].removeprefix("Bearer ")),
    )
    with TestClient(create_app(settings, engine_urls=["http://127.0.0.1:9"]), headers=ADMIN) as client:
        assert client.post("/admin/tenants", json={"name": "acme"}).status_code == 201
        svc = client.app.state.services  # type: ignore[attr-defined]
        for seed in (1, 2, 3):
            folder = make_adapter(tmp_path / f"adapter{seed}", base, seed=seed)
            svc.registry.store("acme").add(folder, "bot", base, 16)
        svc.registry.invalidate("acme", "bot")
        yield client


@pytest.fixture
def good(tmp_path: Path, base: BaseModelSpec) -> Path:
    """A valid adapter of the tiny base (rank 4)."""
    return make_adapter(tmp_path / "good", base, seed=1, rank=4)


def edit_config(folder: Path, **changes: object) -> None:
    """Change fields of the adapter's `adapter_config.json`."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
