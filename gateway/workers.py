"""Several gateway processes on one port (`LORAGATE_WORKERS` > 1), each accepting on a listening socket of its own.

With one shared listening socket, every worker races to accept, and the one that wins takes every connection
waiting: a client that opens its pool of keep-alive connections at once (an SDK under load, a benchmark) can put
all of them on one worker while the others idle, for as long as the connections live. Here each worker slot has
its own socket, bound to the same address with SO_REUSEPORT, and the kernel spreads new connections over the
sockets by their addresses' hash: evenly, whatever the workers are doing when they arrive (as nginx's
`reuseport`). The sockets are made and put to listen here, in the supervising process, which keeps them open: a
worker that dies is replaced on the same socket, and the connections that arrive for it meanwhile wait in its
queue (the replacement starting up) rather than being refused.

Supervision is uvicorn's own (`Multiprocess`: a worker that dies or stops answering its pings is replaced, and
SIGINT/SIGTERM end every worker); only which socket a worker is given differs.
"""

from __future__ import annotations

import logging
import socket

from uvicorn.config import Config
from uvicorn.supervisors.multiprocess import STARTUP_FAILURE, Multiprocess, Process

log = logging.getLogger("uvicorn.error")  # where uvicorn's supervisor says the same

BACKLOG = 2048
"""Each socket's accept queue (uvicorn's default backlog)."""


def reuseport_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on one address, SO_REUSEPORT set on each before it is bound (port 0: the port
    the first is given, for all)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Workers(Multiprocess):
    """uvicorn's supervisor, worker slot i (and whoever replaces its worker) serving `sockets[i]` alone."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        if len(sockets) != config.workers:
            raise ValueError(f"{config.workers} workers need as many sockets, not {len(sockets)}")
        super().__init__(config, sockets)

    def _process(self, slot: int) -> Process:
        return Process(self.config, [self.sockets[slot]])

    def init_processes(self) -> None:
        for slot in range(self.processes_num):
            process = self._process(slot)
            process.start()
            self.processes.append(process)

    def restart_all(self) -> None:
        """Each worker replaced in turn, its replacement serving before the old one is retired (SIGHUP)."""
        for slot, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._process(slot)
            new.start()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                return  # the old worker keeps its slot
            old.terminate()
            old.join()
            self.processes[slot] = new

    def handle_ttin(self) -> None:
        """uvicorn's SIGTTIN adds a worker on every socket (one slot each here: a later replacement of it failed the
        supervisor); the number of workers is set at start (`LORAGATE_WORKERS`)."""
        log.warning(
            "Received SIGTTIN: the number of workers is fixed (LORAGATE_WORKERS=%d); ignored", self.processes_num
        )

    def handle_ttou(self) -> None:
        """uvicorn's SIGTTOU retires the last worker while its socket stays open: the kernel would keep handing it
        connections that nobody answers."""
        log.warning(
            "Received SIGTTOU: the number of workers is fixed (LORAGATE_WORKERS=%d); ignored", self.processes_num
        )

    def keep_subprocess_alive(self) -> None:
        """A worker that died or hangs is replaced on its socket; one that failed to start stops the gateway
        (its app or settings are broken: every replacement would fail alike)."""
        if self.should_exit.is_set():
            return
        for slot, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("Child process [%s] died", process.pid)
            self.processes[slot] = self._process(slot)
            self.processes[slot].start()
