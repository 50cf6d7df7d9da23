"""Runs one vLLM server in its own process group and takes the whole group down with it.

vLLM's engine-core child outlives a killed API server, and vLLM ignores SIGTERM while starting up;
this small parent makes sure that when the gateway stops, crashes or is killed (it asks the kernel
for SIGTERM on the gateway's death), no vLLM process is left behind.

Usage: python -m gateway.engine.guard VLLM_COMMAND...
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

PR_SET_PDEATHSIG = 1
GRACE_S = 10.0


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return 1
    stop_requested: list[float] = []
    started: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only signal here: waiting on the child inside a handler can deadlock Popen's wait lock.
        if not stop_requested:
            stop_requested.append(time.monotonic())
        if started:
            _kill_group(started[0].pid, signal.SIGTERM)

    # Handlers first: a stop that comes while the child is being started must not kill this
    # process by default and leave the child (its own session) running.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(argv, start_new_session=True)
    started.append(child)
    if stop_requested:
        _kill_group(child.pid, signal.SIGTERM)
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if stop_requested and time.monotonic() - stop_requested[0] > GRACE_S:
                _kill_group(child.pid, signal.SIGKILL)
    _kill_group(child.pid, signal.SIGKILL)
    return 128 + signal.SIGTERM if stop_requested else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
