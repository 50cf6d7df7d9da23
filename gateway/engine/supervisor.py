"""Starts vLLM's OpenAI server as a child process, waits for its health and restarts it if it dies."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from gateway.settings import Settings

log = logging.getLogger("loragate.engine")


def is_internal_address(host: str) -> bool:
    """vLLM never faces clients: only loopback or private addresses are allowed for it."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (address.is_loopback or address.is_private) and not address.is_unspecified


def engine_command(settings: Settings, model_dir: Path, port: int) -> list[str]:
    return [
        str(settings.engine_python or sys.executable),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        settings.served_model_name,
        "--host",
        settings.engine_host,
        "--port",
        str(port),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--disable-uvicorn-access-log",
        *(
            ["--enable-auto-tool-choice", "--tool-call-parser", settings.engine_tool_parser]
            if settings.engine_tool_parser
            else []
        ),
        *(
            ["--quantization", "bitsandbytes", "--load-format", "bitsandbytes"]
            if settings.quantization == "bitsandbytes"
            else []
        ),
        *settings.engine_extra_args,
    ]


BNB_VLLM = "vLLM 0.27.1, the last release with bitsandbytes: `pip install loragate[cuda]`, or on CPU `make bnb-engine`"
# Looks for the files without importing vLLM (and torch): seconds saved on every start.
_FIND_BNB = """
import importlib.util as u, os, sys
vllm = u.find_spec("vllm")
if vllm is None:
    sys.exit("no vLLM installed")
quant = [os.path.join(p, "model_executor", "layers", "quantization") for p in vllm.submodule_search_locations]
if not any(os.path.exists(os.path.join(q, "bitsandbytes.py")) for q in quant):
    sys.exit("its vLLM has no bitsandbytes support (vLLM 0.28 removed it)")
if u.find_spec("bitsandbytes") is None:
    sys.exit("the bitsandbytes package is not installed")
"""


def bitsandbytes_problem(settings: Settings) -> str | None:
    """Why the engine's Python cannot serve a bitsandbytes base, or None when it can."""
    python = str(settings.engine_python or sys.executable)
    try:
        done = subprocess.run([python, "-c", _FIND_BNB], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run the engine's Python {python}: {exc}"
    if done.returncode == 0:
        return None
    reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
    return f"the engine's Python {python} cannot serve bitsandbytes: {reason}; use {BNB_VLLM}"


def engine_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=str(settings.engine_kv_cache_gib),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


async def wait_healthy(url: str, timeout_s: float, alive: asyncio.subprocess.Process | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if alive is not None and alive.returncode is not None:
                raise RuntimeError(f"vLLM exited with code {alive.returncode} before it became healthy")
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"vLLM at {url} was not healthy after {timeout_s:.0f} s")


class EngineProcess:
    """One supervised vLLM server (behind `gateway.engine.guard`). `run()` keeps it alive until `stop()`."""

    def __init__(self, settings: Settings, model_dir: Path, port: int, log_dir: Path) -> None:
        if not is_internal_address(settings.engine_host):
            raise ValueError(f"vLLM must listen on loopback or a private address, not {settings.engine_host!r}")
        self.settings = settings
        self.model_dir = model_dir
        self.port = port
        self.url = f"http://{settings.engine_host}:{port}"
        self.log_path = log_dir / f"vllm-{port}.log"
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._ready = asyncio.Event()

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = self.log_path.open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.engine.guard",
                *engine_command(self.settings, self.model_dir, self.port),
                env=engine_env(self.settings),
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            logfile.close()

    async def start(self) -> None:
        """Spawn and wait until healthy; raises with the log's tail if vLLM cannot start."""
        self._proc = await self._spawn()
        log.info("started vLLM pid %s on %s (log %s)", self._proc.pid, self.url, self.log_path)
        try:
            await wait_healthy(self.url, self.settings.engine_start_timeout_s, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            await self.stop()
            raise RuntimeError(f"{exc}\n--- last lines of {self.log_path} ---\n{tail}") from exc
        self._ready.set()

    async def run(self) -> None:
        """Restart vLLM whenever it exits unexpectedly, with a growing pause between tries."""
        backoff = 1.0
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self._ready.clear()
            self.restarts += 1
            log.warning("vLLM on %s exited with code %s; restarting (restart %d)", self.url, code, self.restarts)
            await asyncio.sleep(backoff)
            try:
                await self.start()
                backoff = 1.0
            except RuntimeError as exc:
                log.error("vLLM restart failed: %s", exc)
                backoff = min(backoff * 2, 30.0)
                self._proc = await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class EngineSupervisor:
    """Starts `engine_replicas` vLLM servers on consecutive ports and keeps them running."""

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        log_dir = settings.home / "logs"
        self.engines = [
            EngineProcess(settings, model_dir, settings.engine_port + i, log_dir)
            for i in range(settings.engine_replicas)
        ]
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def urls(self) -> list[str]:
        return [engine.url for engine in self.engines]

    async def start(self) -> None:
        try:
            await asyncio.gather(*(engine.start() for engine in self.engines))
        except BaseException:
            await self.stop()
            raise
        self._watchers = [asyncio.create_task(engine.run()) for engine in self.engines]

    async def stop(self) -> None:
        await asyncio.gather(*(engine.stop() for engine in self.engines), return_exceptions=True)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
