"""The OpenAI surface: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from gateway.body import read_json
from gateway.errors import InvalidRequest, from_validation_error
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingParams
from gateway.routes import services

router = APIRouter()


def cap_max_tokens(payload: dict[str, Any], request: SamplingParams, cap: int) -> None:
    """No request generates more than `cap` tokens: one that names no limit gets `cap`, one that asks
    for more is lowered to it (its answer then ends with finish_reason "length"). vLLM's `min_tokens`
    above the cap could never be met: refused here, naming the cap."""
    least = payload.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool) and least > cap:
        raise InvalidRequest(
            f"min_tokens is {least}, above the most tokens this gateway lets one request generate ({cap}).",
            param="min_tokens",
        )
    named = [field for field in request.token_limits if getattr(request, field) is not None]
    if not named:
        payload["max_tokens"] = cap
    for field in named:
        payload[field] = min(getattr(request, field), cap)


async def _complete(request: Request, route_name: str, path: str, schema: type[SamplingParams]) -> Response:
    svc = services(request)
    principal = await svc.keys.verify(request.headers.get("authorization"))
    payload = await read_json(request, svc.settings.max_body_bytes)
    try:
        validated = schema.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    cap_max_tokens(payload, validated, svc.settings.max_tokens_cap)
    route = await svc.router.resolve(validated.model, principal)
    request_id: str = request.state.request_id
    return await svc.forwarder.forward(
        route_name, path, payload, route, request_id, stream=validated.stream, receive=request.receive
    )


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _complete(request, "chat", "/v1/chat/completions", ChatCompletionRequest)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _complete(request, "completions", "/v1/completions", CompletionRequest)


async def _cards(request: Request) -> list[ModelCard]:
    svc = services(request)
    base = svc.settings.served_model_name
    cards = [ModelCard(id=base, created=int(time.time()), root=base)]
    for name, manifest in await asyncio.to_thread(svc.registry.listing):
        cards.append(ModelCard(id=name, created=int(manifest.created.timestamp()), root=manifest.ref, parent=base))
    return cards


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    await services(request).keys.verify(request.headers.get("authorization"))
    return ModelList(data=await _cards(request))


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    svc = services(request)
    principal = await svc.keys.verify(request.headers.get("authorization"))
    route = await svc.router.resolve(model_id, principal)
    base = svc.settings.served_model_name
    if route.adapter is None:
        return ModelCard(id=base, created=int(time.time()), root=base)
    return ModelCard(
        id=model_id, created=int(route.adapter.created.timestamp()), root=route.upstream_model, parent=base
    )
