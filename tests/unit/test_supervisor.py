"""The engine supervisor with a stand-in engine (a tiny HTTP server): it restarts an engine that
exits or stops passing health checks, and keeps supervising after a restart that fails.
The real vLLM case (its engine core killed) is tests/integration/test_zz_engine_restart.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from gateway.engine.supervisor import EngineProcess, EngineSupervisor, cpu_shares, engine_env, usable_cpus
from gateway.settings import Settings
from loadtest.services import alive
from tests.conftest import free_port

FAKE_ENGINE = """
import http.server, os, sys
port, state = int(sys.argv[1]), sys.argv[2]
with open(os.path.join(state, "starts"), "a") as f:
    f.write("start\\n")
if os.path.exists(os.path.join(state, "refuse")):
    sys.exit(3)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if os.path.exists(os.path.join(state, "sick")) else 200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def engine_child(engine: EngineProcess) -> psutil.Process:
    assert engine.pid is not None
    return psutil.Process(engine.pid).children()[0]


def fake_engine(tmp_path: Path) -> EngineProcess:
    port = free_port()
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    settings = Settings(health_interval_s=0.2, engine_start_timeout_s=30)  # starts are slow on a loaded machine
    proc = EngineProcess(
        [sys.executable, str(script), str(port), str(tmp_path)],
        dict(os.environ),
        f"http://127.0.0.1:{port}",
        tmp_path / "engine.log",
        settings,
    )
    proc.RESTART_PAUSE_S = (0.1, 0.4)
    return proc


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = fake_engine(tmp_path)
    await proc.start()
    runner = asyncio.create_task(proc.run())
    yield proc
    await proc.stop()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


def starts(engine: EngineProcess) -> int:
    return (engine.log_path.parent / "starts").read_text().count("start")


async def test_an_engine_that_exits_is_restarted(engine: EngineProcess) -> None:
    first = engine.pid
    engine_child(engine).send_signal(signal.SIGKILL)
    await until(lambda: engine.restarts == 1 and engine.pid != first and starts(engine) >= 2)


async def test_an_engine_alive_but_unhealthy_is_replaced(engine: EngineProcess, tmp_path: Path) -> None:
    """A live API server whose engine core died answers /health 503: it is killed and started again."""
    first = engine.pid
    (tmp_path / "sick").touch()
    await until(lambda: engine.restarts == 1)
    await until(lambda: not alive(first))  # restarts counts the restart before the old process is stopped
    (tmp_path / "sick").unlink()
    await until(lambda: engine.pid != first and starts(engine) >= 2)


async def test_supervision_survives_failed_restarts(engine: EngineProcess, tmp_path: Path) -> None:
    (tmp_path / "refuse").touch()
    engine_child(engine).send_signal(signal.SIGKILL)
    await until(lambda: starts(engine) >= 3)  # the first start, then two restarts that failed
    (tmp_path / "refuse").unlink()
    await until(lambda: starts(engine) >= 4 and engine.pid is not None and psutil.pid_exists(engine.pid))
    restarted = engine.pid
    engine_child(engine).send_signal(signal.SIGKILL)
    await until(lambda: engine.pid != restarted and starts(engine) >= 5)  # still supervising after the failures


def left_running(tmp_path: Path) -> list[psutil.Process]:
    """The live guard and engine processes of the stand-in engine in tmp_path."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(tmp_path) in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def kill_left(tmp_path: Path) -> list[psutil.Process]:
    left = left_running(tmp_path)
    for proc in left:
        proc.kill()
    return left


async def test_a_start_that_is_cancelled_leaves_nothing_running(tmp_path: Path) -> None:
    """The gateway stops while an engine is still starting: the half-started engine goes too."""
    (tmp_path / "sick").touch()  # it answers /health 503, so start() keeps waiting
    engine = fake_engine(tmp_path)
    starting = asyncio.create_task(engine.start())
    try:
        await until(lambda: (tmp_path / "starts").exists())
        guard = engine.pid
        assert guard is not None and psutil.pid_exists(guard)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await until(lambda: not left_running(tmp_path), timeout=15)
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        assert not kill_left(tmp_path)


@pytest.mark.parametrize("after_s", [0.0, 0.005, 0.02, 0.05, 0.1])
async def test_a_start_cancelled_at_any_moment_leaves_nothing_running(tmp_path: Path, after_s: float) -> None:
    """Cancelled while the guard process is being spawned or is starting its child: nothing stays."""
    (tmp_path / "sick").touch()
    engine = fake_engine(tmp_path)
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(after_s)
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    await until(lambda: not left_running(tmp_path), timeout=15)  # stopping them may take a while on a busy machine
    await asyncio.sleep(1.0)  # a child the guard started late would be up by now
    assert not kill_left(tmp_path)


async def test_a_start_cancelled_again_and_again_while_its_spawn_is_slow_returns_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each cancel was absorbed until the spawn was done (a spawn that hangs would hang the gateway's shutdown);
    now the start returns at once and the process, once spawned, is ended."""
    (tmp_path / "sick").touch()
    engine = fake_engine(tmp_path)
    spawn = engine._spawn  # noqa: SLF001

    async def slow_spawn() -> asyncio.subprocess.Process:
        await asyncio.sleep(0.5)
        return await spawn()

    monkeypatch.setattr(engine, "_spawn", slow_spawn)
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0.05)
    for _ in range(3):
        starting.cancel()
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(starting, return_exceptions=True), 0.3)
    assert starting.cancelled()
    await until(lambda: engine.pid is not None, timeout=15)  # spawned after all: it is to be ended
    await until(lambda: not left_running(tmp_path), timeout=15)
    await asyncio.sleep(1.0)  # a child its guard started late would be up by now
    assert not kill_left(tmp_path)


@pytest.mark.parametrize("after_s", [0.0, 0.01, 0.03, 0.06, 0.1])
def test_the_guard_stopped_while_starting_its_child_leaves_nothing(tmp_path: Path, after_s: float) -> None:
    marker = tmp_path / "child.pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    guard = psutil.Popen([sys.executable, "-m", "gateway.engine.guard", sys.executable, "-c", child, str(tmp_path)])
    time.sleep(after_s)
    guard.send_signal(signal.SIGTERM)
    guard.wait(timeout=20)
    time.sleep(1.0)
    assert not kill_left(tmp_path)


def test_replicas_get_disjoint_cores_and_one_replica_is_left_to_vllm() -> None:
    assert cpu_shares(1, [0, 1]) == [None], "one replica: vLLM's own auto binding"
    assert cpu_shares(2, [0, 1]) == ["0", "1"], "a core each, used whole"
    assert cpu_shares(3, [0, 1]) == ["0", "1", "0"], "more replicas than cores take turns"
    assert cpu_shares(2, [0, 1, 2, 3]) == ["0", "2"], "each share's last core is left for the server's other processes"
    assert cpu_shares(2, list(range(16))) == ["0,1,2,3,4,5,6", "8,9,10,11,12,13,14"]
    assert cpu_shares(2, [4, 5, 6, 7]) == ["4", "6"], "the CPUs this process may use, not 0..n"
    settings = Settings()
    assert engine_env(settings, "1")["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(settings, None) or "VLLM_CPU_OMP_THREADS_BIND" in os.environ


def test_the_supervisor_binds_replicas_unless_the_operator_did(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    two = EngineSupervisor(Settings(engine_replicas=2), Path("/model"))
    expected = cpu_shares(2, usable_cpus())
    assert [engine.env.get("VLLM_CPU_OMP_THREADS_BIND") for engine in two.engines] == expected
    one = EngineSupervisor(Settings(engine_replicas=1), Path("/model"))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in one.engines[0].env, "one replica: vLLM's auto"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    kept = EngineSupervisor(Settings(engine_replicas=2), Path("/model"))
    assert [engine.env["VLLM_CPU_OMP_THREADS_BIND"] for engine in kept.engines] == ["nobind", "nobind"]
