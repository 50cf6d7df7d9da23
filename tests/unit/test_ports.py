"""Ports for test and benchmark services (loadtest.services.free_port): drawn below the kernel's ephemeral range,
a share of it per pytest-xdist worker, free when drawn. And a gateway refuses to start where another listens: its
own sockets set SO_REUSEPORT, so a second gateway on the same port bound beside the first without an error, and
the kernel split the clients between the two."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.ports import taken
from gateway.workers import reuseport_sockets
from loadtest import services
from tests.conftest import ROOT


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_in_this_workers_share(monkeypatch: pytest.MonkeyPatch) -> None:
    shares = []
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        low, high = services._port_share()
        shares.append(range(low, high))
        ports = {services.free_port() for _ in range(20)}
        assert all(low <= port < high <= ephemeral_low() for port in ports), (worker, ports)
        pair = services.free_port_pair()
        assert low <= pair < pair + 1 < high
    for first, second in zip(shares, shares[1:], strict=False):
        assert first.stop <= second.start, "two workers never draw the same port"
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert services._port_share() == (shares[0].start, shares[0].stop), "a run without workers: the first share"


def test_a_port_in_use_is_never_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "LISTEN_PORTS", (20000, 20000 + 4 * 100))  # shares of 100: a few draws cover them
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    taken = []
    try:
        for port in range(20000, 20099):  # all of gw0's share that free_port may draw, but one
            if port == 20050:
                continue
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue  # already someone's: still not free
            sock.listen()
            taken.append(sock)
        drawn = {services.free_port() for _ in range(5)}
        assert drawn <= {20050} | set(range(32768, 65536)), f"the free one, or the kernel's past 100 draws: {drawn}"
    finally:
        for sock in taken:
            sock.close()


def test_without_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "LISTEN_PORTS", (20000, 20100))  # shares under 100 ports: not used
    assert services._port_share() == (0, 0)
    port = services.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free, and it came from the kernel
    assert port >= ephemeral_low()


def test_a_port_a_gateway_listens_on_is_taken_and_free_again_once_closed() -> None:
    sockets = reuseport_sockets("127.0.0.1", 0, 2)
    port = sockets[0].getsockname()[1]
    try:
        assert taken("127.0.0.1", port) and taken("0.0.0.0", port)
        assert not taken("127.0.0.1", 0), "any free port is never taken"
    finally:
        for sock in sockets:
            sock.close()
    assert not taken("127.0.0.1", port)


def test_serve_ends_at_once_where_another_gateway_listens(tmp_path: Path) -> None:
    sockets = reuseport_sockets("127.0.0.1", 0, 1)
    port = sockets[0].getsockname()[1]
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_ENGINE_URLS": "http://127.0.0.1:9"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        sockets[0].close()
    output = done.stdout + done.stderr
    assert done.returncode == 1 and f"127.0.0.1:{port}, the port the gateway listens on, is in use" in output, output
    assert "Traceback" not in output


def test_an_ipv6_address_is_probed_as_the_gateway_binds_it() -> None:
    """One process (uvicorn) binds `::` for IPv6 alone, beside an IPv4 listener of the port; workers' sockets take
    IPv4 too. The probe refused a one-process start on `::` that uvicorn made beside an IPv4 listener."""
    sockets = reuseport_sockets("127.0.0.1", 0, 1)
    port = sockets[0].getsockname()[1]
    try:
        assert not taken("::", port, v6only=True) and taken("::", port, v6only=False)
    finally:
        sockets[0].close()


def test_an_address_the_probe_cannot_bind_for_another_reason_is_left_to_the_server() -> None:
    """A host that does not resolve, or is not this machine's: the probe says nothing (no traceback), and the
    server's own bind refuses it in its words."""
    assert not taken("no-such-host.invalid", 8080) and not taken("192.0.2.1", 8080)
