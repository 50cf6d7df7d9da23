"""The admin API for adapters, guarded by LORAGATE_ADMIN_KEY (tenant keys never pass here).

POST   /admin/adapters?name=N        body: a .tar.gz of a PEFT folder  -> 201 manifest of the new version
GET    /admin/adapters               every version of every adapter
GET    /admin/adapters/{ref}         `name` (default version) or `name@V`
DELETE /admin/adapters/{name@V}      unloads it from every replica, then deletes it
PUT    /admin/adapters/{name}/pin    {"version": V | null}: what the bare name resolves to
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest
from adapters.store import AdapterNotFound, AdapterStore
from gateway.auth import bearer_matches
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, PayloadTooLarge
from gateway.routes import services

router = APIRouter(prefix="/admin")

UPLOAD_WRITE_BYTES = 1 << 20


def require_admin(request: Request) -> None:
    settings = services(request).settings
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if not bearer_matches(request.headers.get("authorization"), admin_key):
        raise AuthenticationFailed("Admin routes need the admin key (LORAGATE_ADMIN_KEY) as a Bearer token.")


Admin = Annotated[None, Depends(require_admin)]


class PinRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    version: int | None


def _ref(text: str) -> AdapterRef:
    try:
        return AdapterRef.parse(text)
    except InvalidAdapter as exc:
        raise InvalidRequest(str(exc), param=exc.param or "ref", code="invalid_adapter") from exc


def _invalid(exc: InvalidAdapter) -> InvalidRequest:
    return InvalidRequest(str(exc), param=exc.param, code="invalid_adapter")


@router.get("/adapters")
async def list_adapters(request: Request, _: Admin) -> dict[str, Any]:
    manifests = await asyncio.to_thread(services(request).registry.store.list)
    return {"object": "list", "data": [m.model_dump(mode="json") for m in manifests]}


@router.get("/adapters/{ref}")
async def show_adapter(ref: str, request: Request, _: Admin) -> Manifest:
    try:
        return await asyncio.to_thread(services(request).registry.store.resolve, _ref(ref))
    except AdapterNotFound as exc:
        raise NotFound(str(exc), param="ref", code="adapter_not_found") from exc


async def _receive_archive(request: Request, into: Path, limit: int) -> int:
    """Stream the body to `into`, writing in worker threads a buffer of about 1 MiB at a time."""
    size = 0
    buffer = bytearray()
    with await asyncio.to_thread(into.open, "wb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Adapter archive exceeds the limit of {limit} bytes.")
            buffer += chunk
            if len(buffer) >= UPLOAD_WRITE_BYTES:
                await asyncio.to_thread(out.write, bytes(buffer))
                buffer.clear()
        await asyncio.to_thread(out.write, bytes(buffer))
    return size


@router.post("/adapters", status_code=201)
async def add_adapter(request: Request, _: Admin, name: Annotated[str, Query(min_length=1)]) -> JSONResponse:
    svc = services(request)
    base = await svc.base_spec()
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loragate-upload-"))
    try:
        archive = scratch / "adapter.tar.gz"
        if await _receive_archive(request, archive, svc.settings.max_adapter_upload_bytes) == 0:
            raise InvalidRequest("Send the adapter as a .tar.gz request body.", code="invalid_adapter")
        try:
            manifest = await asyncio.to_thread(
                svc.registry.store.add, archive, name, base, svc.settings.max_lora_rank, "upload"
            )
        except InvalidAdapter as exc:
            raise _invalid(exc) from exc
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    svc.registry.invalidate(manifest.name)
    return JSONResponse(manifest.model_dump(mode="json"), status_code=201)


@router.delete("/adapters/{ref}")
async def delete_adapter(ref: str, request: Request, _: Admin) -> dict[str, Any]:
    parsed = _ref(ref)
    if parsed.version is None:
        raise InvalidRequest("Delete one version at a time: name@version.", param="ref", code="invalid_adapter")
    svc = services(request)
    try:
        await asyncio.to_thread(svc.registry.store.manifest, parsed.name, parsed.version)
        await svc.placement.unload_everywhere(str(parsed))
        manifest = await asyncio.to_thread(svc.registry.store.remove, parsed.name, parsed.version)
    except AdapterNotFound as exc:  # never there, or another delete won the race
        raise NotFound(str(exc), param="ref", code="adapter_not_found") from exc
    finally:
        svc.registry.invalidate(parsed.name)
    return {"id": manifest.ref, "object": "adapter", "deleted": True}


def _pin(store: AdapterStore, name: str, version: int | None) -> str:
    store.pin(name, version)
    return store.resolve(AdapterRef(name)).ref


@router.put("/adapters/{name}/pin")
async def pin_adapter(name: str, body: PinRequest, request: Request, _: Admin) -> dict[str, Any]:
    parsed = _ref(name)
    registry = services(request).registry
    try:
        resolves_to = await asyncio.to_thread(_pin, registry.store, parsed.name, body.version)
    except AdapterNotFound as exc:
        raise NotFound(str(exc), param="version", code="adapter_not_found") from exc
    finally:
        registry.invalidate(parsed.name)
    return {"name": parsed.name, "pinned": body.version, "resolves_to": resolves_to}
