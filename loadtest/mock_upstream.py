"""A fast stand-in for vLLM's OpenAI server, for measuring what the gateway itself costs.

It answers at once, with bodies shaped like vLLM's:

- `POST /v1/chat/completions`: a small `chat.completion` JSON, or with `"stream": true` an SSE
  stream (`transfer-encoding: chunked`) of 8 `chat.completion.chunk` events (role, 6 content pieces,
  finish; plus a usage chunk when `stream_options.include_usage` is set) and `data: [DONE]`, each
  event its own chunk, written separately; invalid JSON: 400 with an OpenAI-style error;
- `GET /health`: 200, empty, like vLLM;
- `GET /v1/models`: the one model it pretends to serve;
- anything else: 404.

Like vLLM, the response id is `chatcmpl-<X-Request-Id>` when that header is sent.

It is a raw `asyncio.Protocol` with httptools' parser (on uvloop when importable), not a web framework,
because it shares the benchmark machine's cores with the gateway under test: on 2 cores, as an aiohttp app
it cost 75-85 µs of CPU per request at saturation and 120-140 behind a gateway, this way 30-45 and 60-70
(HTTP/1.1 keep-alive, pipelined requests answered in order, `Connection: close` honoured, a request that
does not parse answered 400 and the connection closed). `ROUTES` maps (method, path) to a handler that
returns the writes of a whole response; loadtest.routing serves it with routes of its own added.

Self-contained (httptools only), so it can be started as a plain script:
`python loadtest/mock_upstream.py --port 8199`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools

CONTENT_PIECES = ["Hello", "!", " How", " can", " I", " help you today?"]
CONTENT = "".join(CONTENT_PIECES)
COMPLETION_TOKENS = 9
DEFAULT_MODEL = "mock-model"
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


@dataclass
class Request:
    method: bytes
    path: bytes
    """Without the query string."""
    request_id: str | None
    """The X-Request-Id header, if sent."""
    body: bytes


Handler = Callable[[Request], list[bytes]]
"""Answers a request with the writes of a whole response (status line and headers first)."""
Routes = dict[tuple[bytes, bytes], Handler]


def response(status: int, body: bytes = b"", content_type: str = JSON_TYPE) -> list[bytes]:
    """A response with a content-length, in one write."""
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\ncontent-length: {len(body)}\r\n"
    kind = f"content-type: {content_type}\r\n" if body else ""
    return [f"{head}{kind}\r\n".encode() + body]


def json_response(data: Any, status: int = 200) -> list[bytes]:
    return response(status, json.dumps(data, separators=(",", ":")).encode())


def _prompt_tokens(payload: dict[str, Any]) -> int:
    """A rough, deterministic token count: about 4 characters a token, plus a few per message."""
    chars = 0
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            chars += len(content) if isinstance(content, str) else 0
        return chars // 4 + 4 * len(messages) + 1
    return 1


def _usage(prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + COMPLETION_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "prompt_tokens_details": None,
    }


def completion_body(request_id: str, model: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "reasoning_content": None, "content": CONTENT, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": _usage(prompt_tokens),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def stream_events(request_id: str, model: str, prompt_tokens: int, include_usage: bool) -> list[bytes]:
    created = int(time.time())
    base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in CONTENT_PIECES]
    chunks.append(chunk({"content": ""}, "stop"))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": _usage(prompt_tokens)})
    events = [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks]
    events.append(b"data: [DONE]\n\n")
    return events


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
INVALID_JSON = {"error": {"message": "invalid JSON", "type": "BadRequestError", "param": None, "code": 400}}


def chat_completions(request: Request) -> list[bytes]:
    try:
        payload = json.loads(request.body)
    except ValueError:
        return json_response(INVALID_JSON, 400)
    if not isinstance(payload, dict):
        payload = {}
    request_id = request.request_id or uuid.uuid4().hex
    model = str(payload.get("model") or DEFAULT_MODEL)
    prompt_tokens = _prompt_tokens(payload)
    if not payload.get("stream"):
        return json_response(completion_body(request_id, model, prompt_tokens))
    options = payload.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    events = stream_events(request_id, model, prompt_tokens, include_usage)
    chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    return [STREAM_HEAD + chunks[0], *chunks[1:], b"0\r\n\r\n"]


NOT_FOUND = response(404, b"404: Not Found", TEXT_TYPE)


def health(_: Request) -> list[bytes]:
    return response(200)


def models(_: Request) -> list[bytes]:
    card = {"id": DEFAULT_MODEL, "object": "model", "created": int(time.time()), "owned_by": "vllm"}
    return json_response({"object": "list", "data": [card]})


ROUTES: Routes = {
    (b"POST", b"/v1/chat/completions"): chat_completions,
    (b"GET", b"/health"): health,
    (b"GET", b"/v1/models"): models,
}


class Connection(asyncio.Protocol):
    """One client connection: parses requests as they arrive and answers each as soon as it is complete."""

    transport: asyncio.Transport

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body, self.closing = b"", bytearray(), False
        self.request_id: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            if not self.closing:
                self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.finish(response(400, b"bad request", TEXT_TYPE), close=True)

    def on_message_begin(self) -> None:
        self.url, self.body, self.request_id = b"", bytearray(), None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self.request_id = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method, path = self.parser.get_method(), self.url.split(b"?", 1)[0]
        handler = self.routes.get((method, path))
        writes = handler(Request(method, path, self.request_id, bytes(self.body))) if handler else NOT_FOUND
        self.finish(writes, close=not self.parser.should_keep_alive())

    def finish(self, writes: list[bytes], close: bool) -> None:
        if self.closing:  # requests pipelined after a `Connection: close` go unanswered
            return
        if close:  # say so: a client would otherwise send its next request on this connection
            writes = [writes[0].replace(b"\r\n", b"\r\nconnection: close\r\n", 1), *writes[1:]]
        for data in writes:
            self.transport.write(data)
        if close:
            self.closing = True
            self.transport.close()


def serve(host: str, port: int, routes: Routes = ROUTES, uvloop: bool = True) -> None:
    """Serve `routes` until interrupted, on uvloop when it can be imported (and `uvloop`)."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if uvloop:
        try:
            import uvloop as uv

            factory = uv.new_event_loop
        except ImportError:
            pass

    async def forever() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: Connection(routes), host, port, backlog=2048)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(forever())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--no-uvloop", action="store_true", help="Use asyncio's default event loop.")
    args = parser.parse_args()
    serve(args.host, args.port, uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
