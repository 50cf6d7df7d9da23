"""A stand-in vLLM replica on a thread of the test's process, for tests of the gateway in the same process (its
event loop runs elsewhere: an aiohttp stand-in on the test's own loop could not answer while a TestClient waits)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StandInEngine(BaseHTTPRequestHandler):
    """A replica that is up: `/health` 200, `/v1/models` listing MODELS, 404 elsewhere."""

    MODELS: tuple[dict[str, Any], ...] = ()

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"object": "list", "data": list(self.MODELS)}).encode() if self.path == "/v1/models" else b""
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # a client hanging up first (a gateway stopping) is no fault here
            self.wfile.write(body)


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port until the block ends; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
