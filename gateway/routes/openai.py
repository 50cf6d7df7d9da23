"""The OpenAI surface: /v1/chat/completions, /v1/completions, /v1/models, for a tenant's key.

request → principal (auth) → quota → route (alias or adapter → version) → replica → response → recorder.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from gateway.auth import TenantCaller
from gateway.body import read_json_sized
from gateway.context import CLIENT_CLOSED, USER_HEADER, RequestContext, user_from_header
from gateway.errors import APIError, InvalidRequest, from_validation_error
from gateway.openapi import answer, errors, event_stream, json_body
from gateway.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingParams,
)
from gateway.quotas import Admission
from gateway.routes import callers_tenant, services
from gateway.routes.direct import TenantRoute
from gateway.routing import ArmUnavailable
from gateway.serving import Call

router = APIRouter()
completion_router = APIRouter(route_class=TenantRoute)
"""The completion routes: the hot path, served by `TenantRoute`."""


PROMPT_LOGPROBS_REFUSED = (
    "Prompt logprobs (`prompt_logprobs`; `echo` on chat; `echo` with `logprobs` on text completions) are not served "
    "here: with LoRA adapters on, the engine stops when it computes them beside a request for several completions "
    "(vLLM issue 16668), for every caller of this gateway. Send the request without them."
)
BEST_OF_REFUSED = (
    "best_of above 1 is not served here: the engine (vLLM's V1) does not generate several completions to return "
    "the best, and would answer with one as if it had. Ask for `n` completions and choose among them."
)


def cap_max_tokens(payload: dict[str, Any], request: SamplingParams, cap: int) -> int | None:
    """No request generates more than `cap` tokens: one that names no limit gets its endpoint's default
    (OpenAI's 16 for text completions) or else `cap`; one that asks for more is lowered to it (its answer
    then ends with finish_reason "length"). vLLM's `min_tokens` above the cap could never be met: refused
    here, naming the cap. Returns the request's limit (capped), or None when it is only the cap (sent again
    without it if the context cannot hold it: `Forwarder._sent`)."""
    least = payload.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool) and least > cap:
        raise InvalidRequest(
            f"min_tokens is {least}, above the most tokens this gateway lets one request generate ({cap}).",
            param="min_tokens",
        )
    named = [field for field in request.token_limits if getattr(request, field) is not None]
    if not named:
        payload["max_tokens"] = min(request.default_max_tokens or cap, cap)
        return payload["max_tokens"] if request.default_max_tokens else None
    for field in named:
        payload[field] = min(getattr(request, field), cap)
    return int(payload[named[0]])  # what vLLM applies: max_completion_tokens over max_tokens when both are named


def ask_for_usage(payload: dict[str, Any], request: SamplingParams) -> bool:
    """Every stream's usage settles its quota and is logged, so a stream whose client did not ask for it asks vLLM
    for it (True: the usage chunk is then not passed on). Without continuous usage either: vLLM sends that only with
    `include_usage`, so a client that asked for it alone gets none."""
    if not request.stream or (request.stream_options and request.stream_options.include_usage):
        return False
    options = {"include_usage": True, "continuous_usage_stats": False}
    payload["stream_options"] = {**(payload.get("stream_options") or {}), **options}
    return True


def salt_prefix_cache(payload: dict[str, Any], tenant: str, created: float | None = None) -> None:
    """vLLM's prefix cache is shared by every request of a base (or of one shared adapter): a cached prompt
    answers faster, so one tenant could time another's prompts. A per-tenant `cache_salt` keeps each
    tenant's blocks its own. A client's own salt (per end user, say) is mixed in, never used alone: no
    client can name another tenant's salt. vLLM takes at most 128 characters, without '@', '/' or '\\'."""
    given = payload.get("cache_salt")
    if given is not None and (not isinstance(given, str) or not given):
        raise InvalidRequest("cache_salt must be a non-empty string.", param="cache_salt")
    if created is not None:  # a tenant deleted and created again under its name is another: not its cache
        tenant = f"{tenant}\x00{created!r}"
    mixed = tenant if given is None else f"{tenant}\x00{given}"
    payload["cache_salt"] = hashlib.sha256(mixed.encode("utf-8", "surrogatepass")).hexdigest()


def _failure(exc: Exception) -> tuple[int, str]:
    """The status and error type a request that failed before forwarding is recorded with: the ones its
    answer has (gateway.error_handlers answers a Redis failure 503, anything unexpected 500)."""
    if isinstance(exc, APIError):
        return exc.status, exc.code or exc.type
    if isinstance(exc, RedisError):
        return 503, "state_unavailable"
    return 500, "server_error"


def _tokens_used(done: RequestContext) -> int | None:
    """What a request used, to settle its reservation: the engine's usage; 0 for one that failed before any
    token came (vLLM refused it, or the engine failed): its reservation is given back; None (the reservation
    stands) when it is not known, e.g. a stream whose client left."""
    total = (done.answer.usage or {}).get("total_tokens")
    if isinstance(total, int):
        return total
    return 0 if done.outcome == "error" and done.first_token_s is None else None


async def _complete(
    request: Request, caller: TenantCaller, endpoint: str, path: str, schema: type[SamplingParams]
) -> Response:
    """One completion request, from its caller to its recorded outcome: every request that has a tenant
    reaches the recorder, answered, refused (4xx before forwarding), failed or cancelled."""
    svc = services(request)
    tenant = await callers_tenant(svc, caller)
    if caller.sees_candidates and tenant.logging.content:  # a retraining job's eval: prompts copied from the log
        tenant = tenant.model_copy(update={"logging": tenant.logging.model_copy(update={"content": False})})
    context = RequestContext(request.state.request_id, endpoint, tenant, caller.key_id, payload={})
    admission: Admission | None = None
    handed_over = False

    def finished(done: RequestContext) -> None:
        nonlocal handed_over
        handed_over = True
        if admission is not None:
            svc.quotas.settle(admission, _tokens_used(done))
        svc.metrics.request_finished(done)
        svc.recorder.record(done)

    try:
        context.header_user = user_from_header(request.headers.get(USER_HEADER))  # a refused body has its user too
        payload, size = await read_json_sized(request, svc.settings.max_body_bytes)
        context.payload = payload
        try:
            validated = schema.model_validate(payload)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        _refuse_unserved(validated, svc.settings.allow_prompt_logprobs)
        asked = cap_max_tokens(payload, validated, svc.settings.max_tokens_cap)
        if svc.settings.isolate_prefix_cache:
            salt_prefix_cache(payload, tenant.name, tenant.created)
        hide_usage = ask_for_usage(payload, validated)
        cost = svc.quotas.cost(asked, validated.answers(), size)  # the bytes read: a chunked body has no length
        admission = await svc.quotas.admit(caller, tenant, context.request_id, cost)
        context.validated = True  # recorded with its request from here on: what quotas refuse, as metadata only
        request.state.response_headers = admission.headers
        svc.keys.note_use(caller.key_id)
        context.route = await svc.router.resolve(
            validated.model, tenant.name, context.user, candidates=caller.sees_candidates
        )
        if context.route.arm is not None:
            request.state.response_headers = {**admission.headers, "x-loragate-arm": context.route.arm}
        call = Call(
            endpoint, path, payload, context.route, context.request_id, validated.stream is True, request.receive,
            context, finished, hide_usage, capped_by_default=asked is None,
        )  # fmt: skip
        return await svc.forwarder.forward(call)
    except asyncio.CancelledError:  # from outside (a stopping server past LORAGATE_SHUTDOWN_TIMEOUT_S), client there
        if not handed_over:  # recorded, its reservation kept (tokens may have been generated), as a client that left
            context.finish(CLIENT_CLOSED)
            finished(context)
        raise
    except Exception as exc:
        if isinstance(exc, ArmUnavailable):
            context.route = exc.route  # assigned to an arm that cannot serve: recorded as that arm's error
        if not handed_over:
            if admission is not None:
                svc.quotas.settle(admission, 0)  # nothing was generated: the reservation is given back
            status, kind = _failure(exc)
            context.finish(status, kind)
            svc.metrics.request_finished(context)
            svc.recorder.record(context)
        raise


def _refuse_unserved(validated: SamplingParams, allow_prompt_logprobs: bool) -> None:
    """400 for what a valid body may ask that this gateway does not serve."""
    if not allow_prompt_logprobs and (field := validated.asks_prompt_logprobs()):
        raise InvalidRequest(PROMPT_LOGPROBS_REFUSED, param=field, code="unsupported_parameter")
    if validated.asks_best_of():
        raise InvalidRequest(BEST_OF_REFUSED, param="best_of", code="unsupported_parameter")


def _described(answered: type[BaseModel], chunk: type[BaseModel], body: type[SamplingParams]) -> dict[str, Any]:
    """The OpenAPI description of a completion route: the body it reads itself, its answer (JSON, or a
    stream of events), and what it may meet besides its key's errors: its model, the engine, its quota."""
    return {
        "response_model": None,
        "responses": answer(answered, "The answer, or with `stream: true` its events.", content=event_stream(chunk))
        | errors(400, 404, 413, 422, 429, 502, 503, 504),
        "openapi_extra": json_body(body),
    }


@completion_router.post(
    "/v1/chat/completions", **_described(ChatCompletion, ChatCompletionChunk, ChatCompletionRequest)
)
async def chat_completions(request: Request, caller: TenantCaller) -> Response:
    return await _complete(request, caller, "chat", "/v1/chat/completions", ChatCompletionRequest)


@completion_router.post("/v1/completions", **_described(Completion, Completion, CompletionRequest))
async def completions(request: Request, caller: TenantCaller) -> Response:
    return await _complete(request, caller, "completions", "/v1/completions", CompletionRequest)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, caller: TenantCaller) -> Response:
    """The base, the tenant's aliases and adapters, and the adapters shared with it: nothing else."""
    svc = services(request)
    tenant = await callers_tenant(svc, caller)
    return Response(await svc.model_lists.body(tenant.name), media_type="application/json")


@router.get("/v1/models/{model_id:path}", responses=errors(404))
async def retrieve_model(model_id: str, request: Request, caller: TenantCaller) -> ModelCard:
    if not model_id or model_id.endswith("/"):  # `/v1/models/`, `/v1/models/x/`: an unknown URL, as elsewhere
        raise HTTPException(404)
    svc = services(request)
    tenant = await callers_tenant(svc, caller)
    listed = await svc.model_lists.alias_card(tenant.name, model_id)
    if listed is not None:  # as the list shows it: what it points at, an experiment's alias drawing no arm
        return listed
    # an alias the list leaves out: its 404; a candidate (`name@V` unlisted): what a training key may call, it may read
    route = await svc.router.resolve(model_id, tenant.name, candidates=caller.sees_candidates)
    base = svc.settings.served_model_name
    if route.adapter is None:
        return ModelCard(id=base, created=int(time.time()), root=base)
    return ModelCard(id=model_id, created=int(route.adapter.created.timestamp()), root=route.served_model, parent=base)
