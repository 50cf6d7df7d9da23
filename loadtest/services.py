"""The processes a benchmark or a test runs against: redis-server, the mock upstream, loragate gateways, the
bare pass-through proxy and LiteLLM's proxy, on free loopback ports, started in order and stopped in reverse.

`Stack` is shared by every benchmark in loadtest/ (overhead, routing, records, adapters, compare);
`RedisServer`, `free_port`, `free_port_pair` and `wait_ready` are also what the test fixtures
(tests/conftest.py) start their Redis servers and gateways with.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MOCK_SCRIPT = HERE / "mock_upstream.py"
REDIS_SH = REPO / "scripts" / "redis.sh"
MODEL = "mock-model"
TENANCY_ALIAS = "prod"
START_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark could not run or got a wrong answer; the message says why."""


LISTEN_PORTS = (20000, 32768)
"""Where `free_port` draws from: below Linux's ephemeral range (`ip_local_port_range`, 32768-60999 by default), from
which the kernel takes the local port of every outgoing connection and of every bind to port 0. A port the kernel
picked was free when picked, and could be taken by any connection before its service bound it: the session's
gateway binds its port only once its vLLM replicas are up, a minute or more later, while the unit tests run
beside it (`make test` runs two pytest-xdist workers)."""
PORT_SHARES = 4
"""The range is cut in this many shares, one per pytest-xdist worker (`gw0`, `gw1`, ...; a run without workers
uses the first): two workers never draw the same port."""


def free_port() -> int:
    """A loopback port free now, for a service to bind soon: drawn at random from this worker's share of
    LISTEN_PORTS; picked by the kernel where the ephemeral range leaves no such share, or no draw of 100 was free."""
    low, high = _port_share()
    for _ in range(100 if high > low else 0):
        port = random.randrange(low, high - 1)  # free_port_pair may need the next one too
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A port p such that p and p+1 are both free (two supervised vLLM replicas count up)."""
    for _ in range(50):
        port = free_port()
        if _bindable(port + 1):
            return port
    raise BenchError("no two consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_share() -> tuple[int, int]:
    """This process's share of LISTEN_PORTS, as far as it lies below the kernel's ephemeral ports ((0, 0): none)."""
    low, high = LISTEN_PORTS
    try:
        high = min(high, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    share = (high - low) // PORT_SHARES
    if share < 100:
        return 0, 0
    start = low + share * (int(worker) % PORT_SHARES if worker.isdigit() else 0)
    return start, start + share


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def redis_sh(*args: str) -> None:
    """scripts/redis.sh (`start PORT DIR [persist|durable]`, `stop PORT`): a redis-server as `make run` starts it."""
    command = ["bash", str(REDIS_SH), *args]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


@dataclass
class RedisServer:
    """A real redis-server on a loopback port, started by scripts/redis.sh as `make run` starts it."""

    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.folder / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, mode: str = "durable") -> None:
        """Start (again) and wait until it answers. `durable`: AOF fsynced before every answer (records);
        `persist`: AOF and snapshots; `plain`: nothing on disk."""
        try:
            redis_sh("start", str(self.port), str(self.folder), *([mode] * (mode != "plain")))
        except subprocess.CalledProcessError as exc:
            why = (exc.stderr or b"").decode(errors="replace").strip()
            raise BenchError(
                f"redis-server did not start on port {self.port} ({why}):\n{tail(self.folder / 'redis.log')}"
            ) from exc

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no save."""
        if (pid := self.pid) is not None:
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """SHUTDOWN NOSAVE; a server still there after 5 s is ended by its own pid."""
        pid = self.pid
        try:
            redis_sh("stop", str(self.port))
        except (OSError, subprocess.SubprocessError):
            pass
        deadline = time.monotonic() + 5
        while pid is not None and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            if pid is not None and alive(pid) and b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (a daemonised server's exit waits for PID 1 to reap it)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def wait_ready(name: str, proc: subprocess.Popen[bytes], log: Path, url: str, timeout_s: float) -> None:
    """Wait until `url` answers 200; a process that exits first, or a timeout, raises with its log's tail."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{tail(log)}")
        last = http_status(url)
        if last == 200:
            return
        time.sleep(0.1)
    raise BenchError(f"{name} not ready after {timeout_s:.0f} s ({url} -> {last}):\n{tail(log)}")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int | None = None
    """Where it serves HTTP on 127.0.0.1, for services started with `Stack.start_http`."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Stack:
    """The processes under test, started in order and always stopped in reverse order."""

    def __init__(self, workdir: Path, gateway_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.extra_gateway_env = gateway_env
        self.services: list[Service] = []
        self.redis: RedisServer | None = None
        """The Redis the gateways keep their state in (`redis_port`, `gateway_env`)."""
        self.redis_servers: dict[str, RedisServer] = {}
        """Every redis-server started, by name (the state one is "state")."""
        self.mock_port: int | None = None
        self.gateway_port: int | None = None
        self.api_key: str | None = None
        self.tenancy_key: str | None = None
        self.gateway_command: list[str] = []

    # -- redis ------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis = self.start_redis_server("state", "plain")

    def start_redis_server(self, name: str, mode: str) -> RedisServer:
        """Another redis-server (scripts/redis.sh `mode`), known by `name` in `redis_servers`."""
        server = self.redis_servers[name] = RedisServer(free_port(), self.workdir / f"redis-{name}")
        server.start(mode)  # listed before starting: a half-started one is stopped too
        return server

    def stop_redis(self) -> None:
        """Stop every redis-server started, the last first."""
        for server in reversed(self.redis_servers.values()):
            server.stop()
        self.redis_servers.clear()
        self.redis = None

    @property
    def redis_port(self) -> int | None:
        return self.redis.port if self.redis is not None else None

    # -- subprocesses -----------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Service:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
            )
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def _wait_http(self, service: Service, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
        wait_ready(service.name, service.proc, service.log, url, timeout_s)

    def start_mock(self) -> None:
        self.mock_port = free_port()
        service = self._spawn("mock", [sys.executable, str(MOCK_SCRIPT), "--port", str(self.mock_port)])
        self._wait_http(service, f"http://127.0.0.1:{self.mock_port}/health")

    def gateway_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
        env.update(
            {
                "LORAGATE_ENGINE_URLS": f"http://127.0.0.1:{self.mock_port}",
                "LORAGATE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "LORAGATE_HOST": "127.0.0.1",
                "LORAGATE_HOME": str(self.workdir / "home"),
                "LORAGATE_SERVED_MODEL_NAME": MODEL,
                "LORAGATE_WORKERS": "1",  # one gateway process unless --gateway-env LORAGATE_WORKERS=N
            }
        )
        if self.gateway_port is not None:
            env["LORAGATE_PORT"] = str(self.gateway_port)
        env.update(self.extra_gateway_env)
        return env

    def start_http(
        self, name: str, command: list[str], port: int, ready_path: str, env: dict[str, str] | None = None
    ) -> Service:
        """Start a server that will listen on `port` and wait until `ready_path` answers 200."""
        service = self._spawn(name, command, env)
        service.port = port
        self._wait_http(service, f"{service.url}{ready_path}", timeout_s=START_TIMEOUT_S * 3)
        return service

    def loragate_command(self) -> list[str]:
        script = Path(sys.executable).with_name("loragate")
        self.gateway_command = [str(script), "serve"] if script.exists() else [sys.executable, "-m", "gateway", "serve"]
        return self.gateway_command

    def start_gateway(self) -> Service:
        self.gateway_port = free_port()
        service = self._spawn("gateway", self.loragate_command(), self.gateway_env())
        self._wait_http(service, f"http://127.0.0.1:{self.gateway_port}/readyz")
        return service

    def start_named_gateway(self, name: str, env: dict[str, str]) -> Service:
        """Another `loragate serve` on the same Redis and mock, with its own port, home and `env` on top."""
        port = free_port()
        full_env = {
            **self.gateway_env(),
            "LORAGATE_PORT": str(port),
            "LORAGATE_HOME": str(self.workdir / f"home-{name}"),
            **env,
        }
        return self.start_http(name, self.loragate_command(), port, "/readyz", full_env)

    def start_passthrough(self, name: str, workers: int) -> Service:
        """loadtest/passthrough.py under uvicorn (uvloop, httptools when installed, as the gateway runs)."""
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "loadtest.passthrough:app", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
        env = {**os.environ, "PASSTHROUGH_UPSTREAM": f"http://127.0.0.1:{self.mock_port}"}
        return self.start_http(name, command, port, "/health", env)

    def _loragate(self, *args: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            cwd=REPO,
            env=self.gateway_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or not lines:
            command = " ".join(args)
            raise BenchError(f"`loragate {command}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return lines

    def create_key(self, tenant: str = "loadtest") -> None:
        """A key of a tenant with no limits (the serving core: no quota check) calling the base model by name."""
        self._loragate("tenants", "create", tenant, "--exist-ok")
        self.api_key = self._loragate("keys", "create", "--tenant", tenant, "--name", "overhead")[-1]

    def create_tenancy_key(self, tenant: str = "loadtest-quotas") -> None:
        """A key of a tenant with request and token quotas (never reached) that calls the base through an
        alias: auth, namespace, alias and one quota check in Redis on every request."""
        self._loragate("tenants", "create", tenant, "--rpm", "1000000000", "--tpm", "1000000000000", "--exist-ok")
        self._loragate("aliases", "set", TENANCY_ALIAS, MODEL, "--tenant", tenant)
        self.tenancy_key = self._loragate("keys", "create", "--tenant", tenant)[-1]

    stop_timeout_s = 10.0
    """How long a started service may take to exit after SIGTERM before it is killed."""

    def stop_service(self, service: Service) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout_s`; then whatever is left of its process group (workers)."""
        proc = service.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
        except OSError:
            pass
        if service in self.services:
            self.services.remove(service)

    def stop_services(self) -> None:
        for service in reversed(list(self.services)):
            self.stop_service(service)

    def stop(self) -> None:
        self.stop_services()
        self.stop_redis()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ({s.log}) ---\n{tail(s.log)}" for s in self.services)
