"""Whether an address is free to listen on, asked before anything starts: a gateway's own listening sockets set
SO_REUSEPORT (`gateway.workers`), so a second gateway on the same port bound beside the first without an error and
the kernel split the clients between them; and a vLLM port held by another gateway's vLLM answered the health
checks of one that could not start."""

from __future__ import annotations

import errno
import socket


def url_host(host: str) -> str:
    """`host` as a URL names it: an IPv6 address in brackets (`http://::1:8100` is no URL)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def taken(host: str, port: int, v6only: bool = True) -> bool:
    """Whether something listens on `host`:`port` (or holds it): a socket bound there without SO_REUSEPORT cannot
    bind beside a listener, whatever that one set. `v6only`: an IPv6 address is bound for IPv6 alone, as uvicorn's
    one process binds it (its workers' sockets take IPv4 too: False). Port 0 (any free one) is never taken."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections closed lately do not count
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            probe.bind((host, port))
        except OSError as exc:  # anything else (a name that does not resolve): the server's own bind says it
            return exc.errno == errno.EADDRINUSE
    return False
