"""Feedback: `POST /v1/feedback` and `GET /v1/feedback?completion_id=` with a tenant's key; erasure
and exports of a tenant's log under `/admin/tenants/{tenant}/...` (its manage key or the admin key)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import admin_protocol as answers
from gateway.auth import Manager, TenantCaller
from gateway.body import read_json
from gateway.context import MAX_USER_CHARS, USER_HEADER, user_from_header
from gateway.erasure import NoUserNamed, forget_user
from gateway.errors import InvalidRequest, from_validation_error
from gateway.export import MAX_SINCE, ExportFormat, export
from gateway.openapi import JSONLines, answer, errors, json_body
from gateway.records import FeedbackIn
from gateway.routes import callers_tenant, existing_tenant, services
from gateway.routes.strict_json import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)

MAX_FEEDBACK_BYTES = 2 * 1024 * 1024
"""Room for every field of a rating at its longest (`FeedbackIn`: a correction of 100,000 characters, a comment of
10,000, 32 labels of 64) in JSON's longest spelling of a character, an escaped surrogate pair (12 bytes): 1.35 MB
(a correction message's 32 calls add about 3 kB of their own keys).
At 256 KiB, a correction of 100,000 "é" as `json.dumps` sends them (600 KB) was refused."""


@router.post(
    "/v1/feedback",
    response_model=None,
    responses=answer(answers.FeedbackStored, "Stored in Redis, on its disk.")
    | answer(answers.FeedbackStored, "Stored in this gateway's fsynced spool; replayed into Redis shortly.", 202)
    | errors(404, 409, 413, 429),
    openapi_extra=json_body(FeedbackIn),
)
async def post_feedback(request: Request, caller: TenantCaller) -> JSONResponse:
    """200: stored in Redis (on its disk). 202: stored in this gateway's fsynced spool, replayed into
    Redis shortly (Redis down, or not fsyncing). 409: a new end user's rating of a completion rated by
    gateway.feedback.MAX_RATERS end users already. 429: the tenant's (or key's) requests per minute are used
    up: a rating counts as one request, with no tokens."""
    svc = services(request)
    payload = await read_json(request, MAX_FEEDBACK_BYTES)
    try:
        given = FeedbackIn.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    if not given.user and (header_user := user_from_header(request.headers.get(USER_HEADER))):  # "" names no one
        given.user = header_user[:MAX_USER_CHARS]  # as a completion names its end user where its body does not
    tenant = await callers_tenant(svc, caller)
    admission = await svc.quotas.admit_request(caller, tenant, request.state.request_id, given.tokens())
    request.state.response_headers = admission.headers
    feedback, in_redis = await svc.feedback.submit(tenant, given)
    svc.metrics.feedback.labels(svc.metrics.tenant(tenant.name), "redis" if in_redis else "spool").inc()
    body: dict[str, Any] = {**feedback.model_dump(mode="json"), "status": "stored" if in_redis else "queued"}
    return JSONResponse(body, status_code=200 if in_redis else 202)


@router.get(
    "/v1/feedback",
    response_model=None,
    responses=answer(answers.FeedbackList, "The feedback on that completion.") | errors(404, 429, 503),
)
async def get_feedback(
    request: Request, caller: TenantCaller, completion_id: str = Query(min_length=1, max_length=200)
) -> dict[str, Any]:
    """404 for a completion that is not the caller's (unknown or another tenant's, alike); 503 while that
    cannot be told (Redis down, or the completion log spooling). 429: the tenant's (or key's) requests per minute
    are used up: a read counts as one request, with no tokens."""
    svc = services(request)
    tenant = await callers_tenant(svc, caller)
    admission = await svc.quotas.admit_request(caller, tenant, request.state.request_id, 0)
    request.state.response_headers = admission.headers
    found = await svc.feedback.of_completion(tenant, completion_id)
    return {"object": "list", "data": [feedback.model_dump(mode="json") for feedback in found]}


@router.post(
    "/admin/tenants/{tenant}/users/{user:path}/forget",
    response_model=None,
    responses=answer(answers.Erasure, "What was removed.") | errors(400, 404),
)
async def forget_end_user(tenant: str, user: str, request: Request, _: Manager) -> dict[str, Any]:
    """Delete everything stored for one end user of the tenant; says what was removed."""
    svc = services(request)
    found = await existing_tenant(request, tenant)
    await svc.recorder.written()  # what this process still holds for the user is written, then erased
    try:
        removed = await forget_user(svc.records_redis, tenant, user, found.logging)
    except NoUserNamed as exc:
        raise InvalidRequest(str(exc), param="user", code="invalid_user") from exc
    return {"object": "erasure", "tenant": tenant, "user": user, "removed": removed}


@router.get(
    "/admin/tenants/{tenant}/feedback/export",
    response_class=JSONLines,
    response_description="One JSON object a line, in the TRL format asked for.",
    responses=errors(404),
)
async def export_feedback(
    tenant: str,
    request: Request,
    _: Manager,
    format: Literal["sft", "dpo", "kto"] = Query(...),
    since: float | None = Query(None, ge=0, le=MAX_SINCE, description="Unix time: only completions from then on."),
    alias: str | None = Query(None, max_length=200),
    endpoint: Literal["chat", "completions"] = Query("chat", description="Chat or text-completion records."),
) -> Response:
    """The tenant's rated completions as JSON lines in one of TRL's formats."""
    svc = services(request)
    found = await existing_tenant(request, tenant)
    if getattr(request.state, "head", False):  # HEAD: the headers GET would send, without running the export
        return StreamingResponse(iter(()), media_type="application/x-ndjson")
    fmt: ExportFormat = format
    out = tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8")  # noqa: SIM115
    try:
        await export(svc.records_redis, tenant, fmt, out, found.logging, since=since, alias=alias, endpoint=endpoint)
        await asyncio.to_thread(out.seek, 0)
    except BaseException as exc:
        out.close()
        if isinstance(exc, ValueError):
            raise InvalidRequest(str(exc)) from exc
        raise

    async def chunks() -> AsyncIterator[str]:
        try:
            while data := await asyncio.to_thread(out.read, 1 << 16):
                yield data
        finally:
            out.close()

    return StreamingResponse(chunks(), media_type="application/x-ndjson")
