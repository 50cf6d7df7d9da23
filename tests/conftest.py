"""Session-wide real parts: one redis-server, one gateway supervising one real vLLM, per test run. Redis servers
and gateway processes are started with loadtest.services, as the benchmarks start theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from gateway.settings import DEFAULT_HOME
from loadtest.services import BenchError, RedisServer, free_port, free_port_pair, wait_ready

if TYPE_CHECKING:
    from adapters.validate import BaseModelSpec

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key-0123456789"
METRICS_KEY = "test-metrics-key-0123456789"
MODEL = "SmolLM2-135M-Instruct"
MAX_LORAS = 2
CAPACITY = 3
"""Adapters each test vLLM replica holds (--max-cpu-loras): small, so eviction is cheap to reach."""
TENANT = "tests"
"""The tenant of the session's keys and adapters."""
HOT_ADAPTER = "hot"
REDIS_REPLY_TIMEOUT_S = 60.0
"""How long the tests' own Redis clients wait for a reply. redis-py 8 gives up after 5 s, which a loaded CI machine
(vLLM and training beside the unit tests, an fsync on a busy disk) has outlasted, failing a test in its set-up."""


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client of a test's redis-server (`redis.asyncio.from_url`'s options), slow replies allowed."""
    return aioredis.from_url(url, socket_timeout=REDIS_REPLY_TIMEOUT_S, **options)


def sync_redis_client(url: str, **options: Any) -> sync_redis.Redis:
    """A blocking client of a test's redis-server, slow replies allowed."""
    return sync_redis.Redis.from_url(url, socket_timeout=REDIS_REPLY_TIMEOUT_S, **options)


LAST = ("tests/integration/test_bnb_base.py", "tests/integration/test_quantized_base.py")
"""The modules that use none of the session's replicas: the NF4 tests (an engine of their own and a QLoRA training
run) and the W4A16 test (an engine of its own where the kernel exists, else probes and refusals: 42 s on the AVX2
kind). They run last, on the unit tests' worker once its tests are done: among the session's tests they were on
the critical path (the AVX2 kind: 21 minutes, the NF4 trainer alone 5 of them), and that worker is done minutes
before the other."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid.startswith(LAST))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (`make test` runs `-n 2`) every integration test goes to one worker, in the order
    collected: they share the session's vLLM replicas (started once, not once per worker), and the last of them
    kills those replicas (test_zz_engine_restart). The unit tests fill the other worker: the integration tests
    leave a core idle much of the time (most wait on one vLLM replica at a time), and the unit tests on their
    own use one; then the modules of `LAST`, kept in collection order rather than sorted by size, as xdist
    would sort them before the unit tests. (`--dist loadgroup` with an `xdist_group` mark would say the same,
    but pytest 9.2 broke it: pytest-xdist issue 1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class IntegrationTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(LAST):
                return "last"
            return "integration" if nodeid.startswith("tests/integration/") else nodeid

    return IntegrationTogether(config, log)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session, with AOF fsynced before answering: feedback is acknowledged from it."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass
class Gateway:
    url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    engine_ports: list[int]

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def gateway_env(home: Path, redis_url: str, port: int, **extra: str) -> dict[str, str]:
    # Not VLLM_LOGGING_LEVEL either: importing TRL (the unit tests do) sets it to ERROR in this process
    # (trl/_compat.py), and tests read the engines' INFO lines.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_") and k != "VLLM_LOGGING_LEVEL"}
    env.update(
        LORAGATE_HOME=str(home),
        LORAGATE_MODEL_CACHE=os.environ.get("LORAGATE_MODEL_CACHE", str(DEFAULT_HOME / "models")),
        LORAGATE_REDIS_URL=redis_url,
        LORAGATE_PORT=str(port),
        LORAGATE_ADMIN_KEY=ADMIN_KEY,
        LORAGATE_METRICS_KEY=METRICS_KEY,
        LORAGATE_HEALTH_INTERVAL_S="0.5",
        LORAGATE_WORKERS="1",  # one process per test gateway on these 2 cores; test_workers runs several
        # The suite's session gateway serves dozens of one tenant's adapters, and tests read their series by name
        # (the cap's `other` is tested in tests/unit/test_metrics.py)
        LORAGATE_METRICS_MAX_NAMES="1000",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_gateway(home: Path, env: dict[str, str], engine_ports: list[int], ready_timeout: float) -> Gateway:
    home.mkdir(parents=True, exist_ok=True)
    log = home / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    gateway = Gateway(f"http://127.0.0.1:{env['LORAGATE_PORT']}", env, process, log, engine_ports)
    try:
        wait_ready("gateway", process, log, f"{gateway.url}/healthz", ready_timeout)
    except BenchError:
        stop_gateway(gateway)
        raise
    return gateway


def start_one_engine_gateway(home: Path, redis_url: str, **settings: str) -> Gateway:
    """A gateway of its own with one supervised vLLM, for settings the session gateway does not have."""
    engine_port = free_port()
    env = gateway_env(home, redis_url, free_port(), LORAGATE_ENGINE_PORT=str(engine_port), **settings)
    return start_gateway(home, env, [engine_port], ready_timeout=900)


def start_side_gateway(home: Path, redis_url: str, engine_ports: list[int], **settings: str) -> Gateway:
    """Another gateway process in front of already-running vLLM replicas (seconds to start, no vLLM of its own)."""
    urls = ",".join(f"http://127.0.0.1:{port}" for port in engine_ports)
    env = gateway_env(home, redis_url, free_port(), LORAGATE_ENGINE_URLS=urls, **settings)
    return start_gateway(home, env, engine_ports, ready_timeout=180)  # while vLLM or training fills the CPU


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.process.kill()


def loragate(env: dict[str, str], *args: str) -> str:
    """Run the `loragate` CLI; its standard output."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout


def create_key(env: dict[str, str], tenant: str = TENANT, *options: str) -> str:
    """A new API key of `tenant` (created first if needed), through the CLI."""
    loragate(env, "tenants", "create", tenant, "--exist-ok")
    return loragate(env, "keys", "create", "--tenant", tenant, *options).strip().splitlines()[-1]


@pytest.fixture(scope="session")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`loragate serve` with no engine URLs: it prepares the model and supervises its own vLLM."""
    home = tmp_path_factory.mktemp("gateway-home")
    engine_port = free_port_pair()
    env = gateway_env(
        home,
        redis_server.url,
        free_port(),
        LORAGATE_ENGINE_PORT=str(engine_port),
        LORAGATE_ENGINE_REPLICAS="2",
        LORAGATE_MAX_LORAS=str(MAX_LORAS),
        LORAGATE_MAX_CPU_LORAS=str(CAPACITY),
        LORAGATE_GUARD_RAILS_S="1",
        LORAGATE_HOT_ADAPTERS=f"{TENANT}/{HOT_ADAPTER}",
    )
    gw = start_gateway(home, env, [engine_port, engine_port + 1], ready_timeout=900)
    yield gw
    stop_gateway(gw)
    if gw.process.returncode not in (0, -15):
        print(gw.log_tail())


@pytest.fixture(scope="session")
def api_key(gateway: Gateway) -> str:
    return create_key(gateway.env)


@pytest.fixture(scope="session")
def client(gateway: Gateway, api_key: str):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(gateway: Gateway, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def admin(gateway: Gateway, api_key: str) -> Iterator[httpx.Client]:
    """The admin API of the session tenant (`/admin/tenants/tests`), with the admin key."""
    with httpx.Client(
        base_url=f"{gateway.url}/admin/tenants/{TENANT}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared bf16 base folder (`loragate model prepare` is a no-op once done)."""
    env = gateway_env(tmp_path_factory.mktemp("prepare"), "redis://unused", 0)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "model", "prepare"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def base_spec(base_model_dir: Path) -> BaseModelSpec:
    from adapters.validate import BaseModelSpec

    return BaseModelSpec.from_folder(base_model_dir, MODEL)
