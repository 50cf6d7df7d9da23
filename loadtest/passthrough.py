"""The floor: a bare pass-through proxy (Starlette + aiohttp, no features), for the gateway comparison.

It forwards `POST /v1/chat/completions` to PASSTHROUGH_UPSTREAM with the body and content type as they
came, and answers with the upstream's status and body: whole for JSON, chunk by chunk for a stream. No
auth, no validation, no routing, no metrics: no Python gateway in front of the same upstream can add less.

    PASSTHROUGH_UPSTREAM=http://127.0.0.1:8199 .venv/bin/uvicorn loadtest.passthrough:app --port 8300
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app.state.session = session
        app.state.upstream = os.environ.get("PASSTHROUGH_UPSTREAM", "http://127.0.0.1:8199").rstrip("/")
        yield


async def chat_completions(request: Request) -> Response:
    session: aiohttp.ClientSession = request.app.state.session
    headers = {"Content-Type": request.headers.get("content-type", "application/json")}
    upstream = await session.post(
        request.app.state.upstream + "/v1/chat/completions", data=await request.body(), headers=headers
    )
    content_type = upstream.headers.get("Content-Type", "application/json")
    if not content_type.startswith("text/event-stream"):
        async with upstream:
            return Response(await upstream.read(), status_code=upstream.status, media_type=content_type)

    async def relay() -> AsyncIterator[bytes]:
        async with upstream:
            async for chunk in upstream.content.iter_any():
                yield chunk

    return StreamingResponse(relay(), status_code=upstream.status, media_type=content_type)


async def health(_: Request) -> Response:
    return Response(status_code=200)


app = Starlette(
    routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]), Route("/health", health)],
    lifespan=lifespan,
)
