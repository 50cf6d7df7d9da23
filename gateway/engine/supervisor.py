"""Starts vLLM's OpenAI server as a child process, waits for its health and restarts it if it dies."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Literal

import aiohttp

from gateway.ports import url_host
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


def engine_command(settings: Settings, model_dir: Path, port: int, dtype: str | None = None) -> list[str]:
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
        *(["--dtype", dtype] if dtype else []),
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


def engine_env(settings: Settings, cores: str | None = None) -> dict[str, str]:
    """vLLM's environment; `cores` (VLLM_CPU_OMP_THREADS_BIND) are the CPUs its OpenMP threads run on."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=str(settings.engine_kv_cache_gib),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    return env


def cpu_shares(replicas: int, cpus: list[int]) -> list[str | None]:
    """The CPUs each of `replicas` vLLM servers on this host binds its OpenMP threads to (CPU vLLM only; GPU
    builds ignore it). Left to vLLM (None) for one replica: its `auto` binds a NUMA node's cores but the
    last, kept for its other processes. Several replicas would each pick those same cores, so they get
    disjoint shares instead, each but its last core, as `auto` does (a share of one core is used whole;
    more replicas than cores share them in turn)."""
    if replicas < 2 or not cpus:
        return [None] * replicas
    size = len(cpus) // replicas
    if size <= 1:
        return [str(cpus[i % len(cpus)]) for i in range(replicas)]
    return [",".join(map(str, cpus[i * size : (i + 1) * size - 1])) for i in range(replicas)]


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


async def wait_healthy(url: str, timeout_s: float, alive: asyncio.subprocess.Process | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if alive is not None and alive.returncode is not None:
                raise RuntimeError(f"vLLM exited with code {alive.returncode} before it became healthy")
            if await health(session, url) == "ok":
                return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"vLLM at {url} was not healthy after {timeout_s:.0f} s")


Health = Literal["ok", "dead", "silent"]


async def health(session: aiohttp.ClientSession, url: str, timeout_s: float = 2.0) -> Health:
    """vLLM answers /health 200 while its engine core lives and 503 once it has died; a refused
    connection is dead too. No answer in time is only "silent": a busy engine may be slow to answer."""
    try:
        async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return "ok" if resp.status == 200 else "dead"
    except TimeoutError:
        return "silent"
    except (aiohttp.ClientError, OSError):
        return "dead"


class EngineProcess:
    """One supervised vLLM server (behind `gateway.engine.guard`). `run()` keeps it serving until `stop()`:
    it is restarted when it exits and when it stops passing health checks (an engine core that died
    under a live API server), and a restart that fails is tried again, with a growing pause."""

    DEAD_CHECKS = 3
    """Consecutive health checks answered 503 (or refused) after which a running engine is taken for dead."""
    SILENT_CHECKS = 12
    """Consecutive health checks without an answer (5 s each) after which an engine is taken for hung."""
    RESTART_PAUSE_S = (1.0, 30.0)
    """The pause before a restart, doubled after each failed one up to the second value."""

    def __init__(self, command: list[str], env: dict[str, str], url: str, log_path: Path, settings: Settings) -> None:
        self.command = command
        self.env = env
        self.url = url
        self.log_path = log_path
        self.start_timeout_s = settings.engine_start_timeout_s
        self.check_interval_s = settings.health_interval_s
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._ending: set[asyncio.Future[None]] = set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _open_log(self) -> BinaryIO:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return self.log_path.open("ab")

    async def _spawn(self) -> asyncio.subprocess.Process:
        logfile = await asyncio.to_thread(self._open_log)
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.engine.guard",
                *self.command,
                env=self.env,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            logfile.close()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    async def start(self) -> None:
        """Spawn and wait until healthy; a process that cannot get there is killed and RuntimeError raised
        with its log's tail. Supervision (`run`) is not affected: it tries again."""
        spawning = asyncio.ensure_future(self._spawn())
        try:
            self._proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:  # the process may exist already, or soon: it is ended once it does
            spawning.add_done_callback(self._end_spawned)
            raise
        log.info("started vLLM pid %s on %s (log %s)", self._proc.pid, self.url, self.log_path)
        try:
            if self._stopping:  # stop() came while this process was being spawned
                raise RuntimeError("the gateway is stopping")
            await wait_healthy(self.url, self.start_timeout_s, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = await asyncio.to_thread(self._log_tail)
            await self._terminate()
            raise RuntimeError(f"{exc}\n--- last lines of {self.log_path} ---\n{tail}") from exc
        except BaseException:  # cancelled: leave nothing running (ended in a task a further cancel cannot reach)
            await asyncio.shield(self._end_in_background())
            raise

    def _end_spawned(self, spawning: asyncio.Future[asyncio.subprocess.Process]) -> None:
        """A start cancelled while its process was being spawned: that process, once there, is ended."""
        if not spawning.cancelled() and spawning.exception() is None:
            self._proc = spawning.result()
            self._end_in_background()

    def _end_in_background(self) -> asyncio.Future[None]:
        ending = asyncio.ensure_future(self._terminate())
        self._ending.add(ending)  # held until done: a task nothing refers to may be collected midway
        ending.add_done_callback(self._ending.discard)
        return ending

    async def _until_unfit(self) -> str:
        """Wait until the process exits, or its health checks say dead (or nothing) often enough in a row."""
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        streak: Counter[Health] = Counter()
        try:
            async with aiohttp.ClientSession() as session:
                while True:
                    await asyncio.wait({exited}, timeout=self.check_interval_s)
                    if exited.done():
                        return f"exited with code {exited.result()}"
                    answer = await health(session, self.url, timeout_s=5.0)
                    streak = Counter() if answer == "ok" else streak + Counter([answer])
                    if streak["dead"] >= self.DEAD_CHECKS:
                        return f"failed {streak['dead']} health checks in a row (its engine core is gone)"
                    if streak["silent"] >= self.SILENT_CHECKS:
                        return f"did not answer {streak['silent']} health checks in a row (hung)"
        finally:
            exited.cancel()

    async def run(self) -> None:
        """Restart vLLM whenever it exits or stops being healthy, until `stop()`; never gives up."""
        first, longest = self.RESTART_PAUSE_S
        backoff = first
        while not self._stopping:
            reason = await self._until_unfit()
            if self._stopping:
                return
            self.restarts += 1
            log.warning("vLLM on %s %s; restarting it (restart %d)", self.url, reason, self.restarts)
            await self._terminate()
            while not self._stopping:
                await asyncio.sleep(backoff)
                if self._stopping:
                    return
                try:
                    await self.start()
                    backoff = first
                    break
                except RuntimeError as exc:
                    backoff = min(backoff * 2, longest)
                    log.error("vLLM restart failed; trying again in %.0f s: %s", backoff, exc)

    async def _terminate(self) -> None:
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

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()


class EngineSupervisor:
    """Starts `engine_replicas` vLLM servers on consecutive ports and keeps them running."""

    def __init__(self, settings: Settings, model_dir: Path, dtype: str | None = None) -> None:
        if not is_internal_address(settings.engine_host):
            raise ValueError(f"vLLM must listen on loopback or a private address, not {settings.engine_host!r}")
        log_dir = settings.home / "logs"
        ports = [settings.engine_port + i for i in range(settings.engine_replicas)]
        chosen = "VLLM_CPU_OMP_THREADS_BIND" in os.environ  # the operator's binding is kept as it is
        shares = [None] * len(ports) if chosen else cpu_shares(len(ports), usable_cpus())
        self.engines = [
            EngineProcess(
                engine_command(settings, model_dir, port, dtype),
                engine_env(settings, cores),
                f"http://{url_host(settings.engine_host)}:{port}",
                log_dir / f"vllm-{port}.log",
                settings,
            )
            for port, cores in zip(ports, shares, strict=True)
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
