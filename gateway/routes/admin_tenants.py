"""Tenants and their API keys, for the global admin key only (LORAGATE_ADMIN_KEY).

POST   /admin/tenants                                 {"name", "limits"?, "on_redis_down"?}  -> 201 tenant
GET    /admin/tenants                                 every tenant
GET    /admin/tenants/{tenant}                        one tenant
PATCH  /admin/tenants/{tenant}                        {"limits"?, "on_redis_down"?}
DELETE /admin/tenants/{tenant}                        its keys, aliases, pins, shares, adapters, log and feedback
POST   /admin/tenants/{tenant}/keys                   {"role"?, "name"?, "expires"?, "limits"?} -> 201, the key once
GET    /admin/tenants/{tenant}/keys                   id, prefix, role, created, expiry, last use; never the key
DELETE /admin/tenants/{tenant}/keys/{key_id}          revoke: refused by every gateway within a second
POST   /admin/tenants/{tenant}/keys/{key_id}/rotate   {"grace"}: a new key; the old one works until the grace ends
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from gateway import admin_protocol as answers
from gateway.apikeys import KeyInfo, parse_duration
from gateway.auth import Admin
from gateway.erasure import mark_tenant_deleted, purge_tenant, tenant_deleted
from gateway.errors import NotFound, StateUnavailable
from gateway.openapi import answer, errors
from gateway.routes import domain_errors, existing_tenant, services
from gateway.routes.strict_json import StrictJSONRoute
from gateway.tenants import Limits, Tenant, TenantChanges, check_tenant_name

router = APIRouter(prefix="/admin/tenants", route_class=StrictJSONRoute)
log = logging.getLogger("loragate.admin")


class NewTenant(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    limits: Limits = Limits()
    on_redis_down: Literal["open", "closed"] = "open"


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str = "inference"
    name: str = "default"
    expires: str | int | None = None
    """Seconds, or a duration such as 30d or 12h; None: never."""
    limits: Limits = Limits()


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    grace: str | int = "1h"


@router.post("", status_code=201, responses=errors(409, 503))
async def create_tenant(body: NewTenant, request: Request, _: Admin) -> Tenant:
    svc = services(request)
    with domain_errors("name"):
        name = check_tenant_name(body.name)
        try:  # a tenant deleted under this name: the new one is created after it, whatever the clocks say
            deleted = await tenant_deleted(svc.records_redis, name)
        except (RedisError, OSError) as exc:  # not created by this host's clock alone: the deleted one's records
            log.warning("tenant %s not created: its last deletion could not be read (%r)", name, exc)
            raise StateUnavailable(
                f"Tenant `{name}` cannot be created right now: the records Redis, which keeps when a tenant of that "
                "name was last deleted, cannot be reached. Try again."
            ) from exc
        return await svc.tenants.create(
            name, body.limits, body.on_redis_down, not_before=deleted[0] if deleted else 0.0
        )


@router.get("", response_model=None, responses=answer(answers.TenantList, "Every tenant."))
async def list_tenants(request: Request, _: Admin) -> dict[str, Any]:
    tenants = await services(request).tenants.all()
    return {"object": "list", "data": [t.model_dump() for t in tenants]}


@router.get("/{tenant}", responses=errors(400, 404))
async def show_tenant(tenant: str, request: Request, _: Admin) -> Tenant:
    return await existing_tenant(request, tenant)


@router.patch("/{tenant}", responses=errors(404))
async def update_tenant(tenant: str, body: TenantChanges, request: Request, _: Admin) -> Tenant:
    with domain_errors():
        return await services(request).tenants.update(tenant, body)


@router.delete(
    "/{tenant}",
    response_model=None,
    responses=answer(answers.TenantDeleted, "Deleted, with what went with it.") | errors(400, 404),
)
async def delete_tenant(tenant: str, request: Request, _: Admin) -> dict[str, Any]:
    svc = services(request)
    with domain_errors():
        found = await svc.tenants.get(check_tenant_name(tenant))
    # The tombstone first: what any gateway still has queued or spooled of this tenant (records, ratings) is
    # refused when it comes. Then this process's queue is written (and refused), and the log purged; only then is
    # the tenant deleted, so that a failure on the way (Redis) leaves a tenant whose deletion can be asked again.
    await mark_tenant_deleted(svc.records_redis, tenant, found.created, found.logging.max_age_s)
    await svc.recorder.written()
    records = await purge_tenant(svc.records_redis, tenant)
    with domain_errors():
        revoked = await svc.tenants.delete(tenant)
    svc.keys.forget_cached()
    svc.tenants.forget_cached()
    removed = await asyncio.to_thread(svc.registry.remove_tenant, tenant)
    await asyncio.to_thread(shutil.rmtree, svc.settings.training_root / tenant, True)  # runs copy its log
    await svc.placement.unload_deleted(removed)
    return {
        "id": tenant,
        "object": "tenant",
        "deleted": True,
        "keys_revoked": len(revoked),
        "adapters": len(removed),
        "records": records,
    }


@router.post(
    "/{tenant}/keys",
    status_code=201,
    response_model=None,
    responses=answer(answers.CreatedKey, "The key, shown this once.", 201) | errors(404),
)
async def create_key(tenant: str, body: NewKey, request: Request, _: Admin) -> JSONResponse:
    with domain_errors():
        check_tenant_name(tenant)  # a malformed name in the path is refused as the tenant (param), not as `expires`
    with domain_errors("expires"):
        expires = parse_duration(body.expires) if body.expires is not None else None
        key, info = await services(request).keys.create(tenant, body.role, body.name, expires, body.limits)
    return JSONResponse({"key": key, **info.model_dump()}, status_code=201)


@router.get(
    "/{tenant}/keys",
    response_model=None,
    responses=answer(answers.KeyList, "The tenant's keys, never the keys themselves.") | errors(404),
)
async def list_keys(tenant: str, request: Request, _: Admin) -> dict[str, Any]:
    with domain_errors():
        infos = await services(request).keys.list(tenant)
    return {"object": "list", "data": [info.model_dump() for info in infos]}


async def _own_key(request: Request, tenant: str, key_id: str) -> KeyInfo:
    with domain_errors():
        info = await services(request).keys.get(key_id)
    if info.tenant != tenant:
        raise NotFound(f"API key `{key_id}` does not exist.", param="key_id", code="key_not_found")
    return info


@router.delete(
    "/{tenant}/keys/{key_id}",
    response_model=None,
    responses=answer(answers.KeyRevoked, "Revoked.") | errors(404),
)
async def revoke_key(tenant: str, key_id: str, request: Request, _: Admin) -> dict[str, Any]:
    await _own_key(request, tenant, key_id)
    with domain_errors():
        info = await services(request).keys.revoke(key_id)
    return {"id": info.id, "object": "api_key", "revoked": True}


@router.post(
    "/{tenant}/keys/{key_id}/rotate",
    status_code=201,
    response_model=None,
    responses=answer(answers.RotatedKey, "The new key, shown this once.", 201) | errors(404),
)
async def rotate_key(tenant: str, key_id: str, body: Rotation, request: Request, _: Admin) -> JSONResponse:
    await _own_key(request, tenant, key_id)
    with domain_errors("grace"):
        key, info = await services(request).keys.rotate(key_id, parse_duration(body.grace, allow_zero=True))
    return JSONResponse({"key": key, **info.model_dump(), "replaces": key_id}, status_code=201)
