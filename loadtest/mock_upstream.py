"""A fast stand-in for vLLM's OpenAI server, for measuring what the gateway itself costs.

It answers at once, with bodies shaped like vLLM's:

- `POST /v1/chat/completions`: a small `chat.completion` JSON, or with `"stream": true` an SSE
  stream of 8 `chat.completion.chunk` events (role, 6 content pieces, finish; plus a usage chunk
  when `stream_options.include_usage` is set) and `data: [DONE]`, each written separately;
- `GET /health`: 200, empty, like vLLM;
- `GET /v1/models`: the one model it pretends to serve.

Like vLLM, the response id is `chatcmpl-<X-Request-Id>` when that header is sent.

Self-contained (aiohttp only), so it can be started as a plain script:
`python loadtest/mock_upstream.py --port 8199`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

CONTENT_PIECES = ["Hello", "!", " How", " can", " I", " help you today?"]
CONTENT = "".join(CONTENT_PIECES)
COMPLETION_TOKENS = 9
DEFAULT_MODEL = "mock-model"


def _request_id(request: web.Request) -> str:
    return request.headers.get("X-Request-Id") or uuid.uuid4().hex


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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        payload = json.loads(await request.read())
    except ValueError:
        return web.json_response(
            {"error": {"message": "invalid JSON", "type": "BadRequestError", "param": None, "code": 400}},
            status=400,
        )
    if not isinstance(payload, dict):
        payload = {}
    request_id = _request_id(request)
    model = str(payload.get("model") or DEFAULT_MODEL)
    prompt_tokens = _prompt_tokens(payload)
    if not payload.get("stream"):
        body = json.dumps(completion_body(request_id, model, prompt_tokens), separators=(",", ":")).encode()
        return web.Response(body=body, content_type="application/json")
    options = payload.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for event in stream_events(request_id, model, prompt_tokens, include_usage):
        await response.write(event)
    await response.write_eof()
    return response


async def health(_: web.Request) -> web.Response:
    return web.Response(status=200)


async def models(_: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": DEFAULT_MODEL, "object": "model", "created": int(time.time()), "owned_by": "vllm"},
            ],
        }
    )


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--no-uvloop", action="store_true", help="Use asyncio's default event loop.")
    args = parser.parse_args()
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
