"""A tenant's adapters and aliases, for the admin key or that tenant's `manage` key.

POST   /admin/tenants/{tenant}/adapters?name=N        body: a .tar.gz of a PEFT folder -> 201 manifest
GET    /admin/tenants/{tenant}/adapters               every version of the tenant's adapters
GET    /admin/tenants/{tenant}/adapters/{ref}         `name` (default version) or `name@V`
DELETE /admin/tenants/{tenant}/adapters/{name@V}      deletes it (409 while in use), then unloads it everywhere
PUT    /admin/tenants/{tenant}/adapters/{name}/pin    {"version": V | null}: what the bare name resolves to
PUT    /admin/tenants/{tenant}/adapters/{name}/share  {"tenants": [...]}: admin key only
GET    /admin/tenants/{tenant}/aliases                every alias and its target
PUT    /admin/tenants/{tenant}/aliases/{alias}        {"target": "name@V" | "owner/name@V" | base}: atomic repoint
DELETE /admin/tenants/{tenant}/aliases/{alias}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from adapters.manifest import MAX_VERSION, AdapterRef, Manifest, check_name
from adapters.store import AdapterNotFound, AdapterStore
from gateway import admin_protocol as answers
from gateway import version_guard
from gateway.auth import Admin, Manager
from gateway.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, RateLimited, RequestTimeout
from gateway.experiments import ExperimentConflict
from gateway.openapi import answer, binary_body, errors
from gateway.routes import domain_errors, existing_tenant, services
from gateway.routes.strict_json import StrictJSONRoute
from gateway.settings import UPLOAD_WAIT_S, Settings
from gateway.tenants import Tenant

log = logging.getLogger("loragate")

router = APIRouter(prefix="/admin/tenants/{tenant}", route_class=StrictJSONRoute)

UPLOAD_PREFIX = "loragate-upload-"
"""An upload's body is received into a folder of this name in the temporary folder (`sweep_uploads`)."""
UPLOAD_WRITE_BYTES = 1 << 20


class Pin(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    version: Annotated[int, Field(ge=1, le=MAX_VERSION)] | None
    """null unpins. Bounded as `name@N` is (AdapterRef.parse): a number past it names no version that can be
    stored, and its folder name may be too long to look up."""


class Share(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    tenants: list[str]


class AliasTarget(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    target: str


def _require(store: AdapterStore, name: str, version: int | None = None) -> None:
    """AdapterNotFound unless the adapter (or that published version of it) is stored."""
    if version is not None and not store.manifest(name, version).listed:
        raise AdapterNotFound(f"{name}@{version}")  # an unpublished candidate cannot be pinned
    elif not store.versions(name):
        raise AdapterNotFound(name)


@contextmanager
def _in_experiment() -> Iterator[None]:
    """An alias that runs an experiment moves only with it: 409."""
    try:
        yield
    except ExperimentConflict as exc:
        raise Conflict(str(exc), param="alias", code="alias_in_experiment") from exc


def _ref(text: str) -> AdapterRef:
    with domain_errors("ref"):
        return AdapterRef.parse(text)


def _name(text: str) -> str:
    """An adapter's name, where a route acts on the adapter, not on one version (a version was ignored: pinning
    `bot@5` to version 1 pinned `bot`)."""
    parsed = _ref(text)
    if parsed.version is not None:
        raise InvalidRequest(
            f"`{text}` names a version; this takes the adapter's name (`{parsed.name}`).", param="name"
        )
    return parsed.name


@router.get(
    "/adapters",
    response_model=None,
    responses=answer(answers.AdapterList, "Every version of the tenant's adapters.") | errors(400, 404),
)
async def list_adapters(tenant: str, request: Request, _: Manager) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    svc = services(request)
    manifests = await asyncio.to_thread(svc.registry.store(tenant).list)
    return {"object": "list", "data": [shown(m, svc.settings.home) for m in manifests]}


@router.get("/adapters/{ref}", responses=errors(400, 404))
async def show_adapter(tenant: str, ref: str, request: Request, _: Manager) -> Manifest:
    await existing_tenant(request, tenant)
    svc = services(request)
    parsed = _ref(ref)
    pinned = (await svc.pointers.of(tenant)).pins.get(parsed.name)
    with domain_errors():
        found = await asyncio.to_thread(svc.registry.store(tenant).resolve, parsed, pinned)
    return Manifest.model_validate(shown(found, svc.settings.home))


HOST_PATHS = frozenset({"origin", "adapter_dir", "resumed_from", "jsonl_path", "regression_jsonl", "json_schema_path"})
"""The manifest's fields (its source's, and in its provenance a training run's and its config's) that name a path on
the gateway's host."""
HIDDEN = frozenset({"endpoint"})
"""Fields shown only as whether they were set: the address a training run reached the gateway at."""


def shown(manifest: Manifest, home: Path) -> dict[str, Any]:
    """A manifest as the admin API shows it: a path on the gateway's host (where a version was added from, a
    training run's folders and files) relative to LORAGATE_HOME, or its last part where it lies elsewhere, and no
    internal address. A tenant's manage key is shown its adapters, not the host's layout (absolute paths and the
    training job's gateway URL before 2026-12-07). `home` as configured, not resolved: the paths under it were built
    from it so (and resolving it would be file I/O on the event loop at every request)."""
    return _without_host_paths(manifest.model_dump(mode="json"), home)


def _without_host_paths(value: Any, home: Path) -> Any:
    if isinstance(value, list):
        return [_without_host_paths(item, home) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in HOST_PATHS and isinstance(item, str) and item.startswith("/"):
            path = Path(item)
            out[key] = str(path.relative_to(home)) if path.is_relative_to(home) else path.name
        elif key in HIDDEN and item is not None:
            out[key] = "(set)"
        else:
            out[key] = _without_host_paths(item, home)
    return out


@asynccontextmanager
async def _upload_turn(request: Request) -> AsyncIterator[None]:
    """One of this process's turns to store an upload (`upload_concurrency`): waited for `UPLOAD_WAIT_S` at most,
    else 429. Taken once the body is in, for the worker threads that unpack, check and hash it: a client sending
    slowly holds none."""
    uploads = services(request).uploads
    try:
        await asyncio.wait_for(uploads.acquire(), UPLOAD_WAIT_S)
    except TimeoutError:
        busy = RateLimited("This gateway is storing other adapter uploads; try again shortly.", kind="requests")
        busy.code = "too_many_uploads"
        busy.headers = {"retry-after": str(math.ceil(UPLOAD_WAIT_S))}
        raise busy from None
    try:
        yield
    finally:
        uploads.release()


async def _receive_archive(request: Request, into: Path, settings: Settings) -> int:
    """Stream the body to `into`, writing in worker threads a buffer of about 1 MiB at a time; a body that pauses
    longer than `upload_idle_timeout_s` is given up (408), its scratch copy removed."""
    idle = settings.upload_idle_timeout_s
    try:
        async with asyncio.timeout(idle) as deadline:
            return await _write_body(request, into, settings.max_adapter_upload_bytes, lambda: deadline.reschedule(
                asyncio.get_running_loop().time() + idle))  # fmt: skip
    except TimeoutError:
        raise RequestTimeout(f"The adapter archive stopped arriving for {idle:g} s; it was given up.") from None


async def _write_body(request: Request, into: Path, limit: int, arrived: Callable[[], None]) -> int:
    size = 0
    buffer = bytearray()
    with await asyncio.to_thread(into.open, "wb") as out:
        async for chunk in request.stream():
            arrived()
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Adapter archive exceeds the limit of {limit} bytes.")
            buffer += chunk
            if len(buffer) >= UPLOAD_WRITE_BYTES:
                await asyncio.to_thread(out.write, bytes(buffer))
                buffer.clear()
        await asyncio.to_thread(out.write, bytes(buffer))
    return size


@router.post(
    "/adapters",
    status_code=201,
    response_model=None,
    responses=answer(Manifest, "The new version's manifest.", 201) | errors(404, 408, 409, 413, 429),
    openapi_extra=binary_body("application/gzip", "A .tar.gz of a PEFT LoRA folder (adapter_config.json, weights)."),
)
async def add_adapter(
    tenant: str, request: Request, _: Manager, name: Annotated[str, Query(min_length=1)]
) -> JSONResponse:
    owner = await existing_tenant(request, tenant)
    svc = services(request)
    with domain_errors("name"):
        check_name(name)
    if name in (await svc.pointers.of(tenant)).aliases:
        raise _alias_named(name)
    base = await svc.base_spec()
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=UPLOAD_PREFIX))
    try:
        archive, settings = scratch / "adapter.tar.gz", svc.settings
        if await _receive_archive(request, archive, settings) == 0:
            raise InvalidRequest("Send the adapter as a .tar.gz request body.", code="invalid_adapter")
        with domain_errors():  # what is wrong is in the archive (a name the base has says `name` itself)
            async with _upload_turn(request):
                stored = await asyncio.to_thread(
                    svc.registry.store(tenant).add, archive, name, base, settings.max_lora_rank, "upload", listed=False
                )
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    manifest = await _still_owned(request, owner, stored)
    return JSONResponse(shown(manifest, svc.settings.home), status_code=201)


async def _still_owned(request: Request, owner: Tenant, stored: Manifest) -> Manifest:
    """An upload takes a while (streaming, unpacking, hashing): a version whose tenant was deleted meanwhile is
    removed (gateway.version_guard.keep_if_still_owned), and the upload answered 404; one whose name became an
    alias meanwhile is removed too (409); otherwise it is listed."""
    svc = services(request)
    store = svc.registry.store(owner.name)
    try:
        with domain_errors():
            return await version_guard.publish_unaliased(svc.redis, svc.tenants, store, owner, stored)
    except version_guard.NameTaken as exc:
        raise _alias_named(stored.name) from exc
    finally:
        svc.registry.invalidate(owner.name, stored.name)


def sweep_uploads(older_than_s: float) -> list[str]:
    """Remove the bodies of uploads (UPLOAD_PREFIX folders in the temporary folder) untouched for `older_than_s`: a
    process that died while it received or checked one left it (up to a gibibyte each). Blocking."""
    before, swept = time.time() - older_than_s, list[str]()
    for folder in Path(tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile (its upload ended)
            if folder.is_dir() and not folder.is_symlink() and folder.lstat().st_mtime < before:
                shutil.rmtree(folder, ignore_errors=True)
                swept.append(str(folder))
    return swept


def _alias_named(name: str) -> Conflict:
    return Conflict(f"`{name}` is already an alias of this tenant.", param="name", code="name_taken")


def _model_named(alias: str) -> Conflict:
    return Conflict(f"`{alias}` is already the name of a model of this tenant.", param="alias", code="name_taken")


@router.delete(
    "/adapters/{ref}",
    response_model=None,
    responses=answer(answers.AdapterDeleted, "Deleted, then unloaded everywhere.") | errors(400, 404, 409),
)
async def delete_adapter(tenant: str, ref: str, request: Request, caller: Manager) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    parsed = _ref(ref)
    svc = services(request)
    store = svc.registry.store(tenant)
    try:
        with domain_errors("ref"):  # a name without a version is refused too: one version at a time
            deleted = await version_guard.delete_version(
                svc.redis, svc.experiments, store, tenant, parsed, name_others=caller.role == "admin"
            )
    except version_guard.VersionInUse as exc:
        raise Conflict(str(exc), param="ref", code="version_in_use") from exc
    finally:
        svc.registry.invalidate(tenant, parsed.name)
    await svc.placement.unload_deleted([f"{tenant}.{deleted}"])
    return {"id": deleted, "object": "adapter", "deleted": True}


@router.put(
    "/adapters/{name}/pin",
    response_model=None,
    responses=answer(answers.Pinned, "What the bare name now serves.") | errors(404),
)
async def pin_adapter(tenant: str, name: str, body: Pin, request: Request, _: Manager) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    svc = services(request)
    adapter = _name(name)
    store = svc.registry.store(tenant)
    with domain_errors("version"):  # under the adapter's lock: a delete of the version cannot come in between
        async with version_guard.holding(svc.redis, [(tenant, adapter)], tenant):
            await asyncio.to_thread(_require, store, adapter, body.version)
            await svc.pointers.pin(tenant, adapter, body.version)
    with domain_errors():
        resolves_to = await asyncio.to_thread(store.resolve, AdapterRef(adapter), body.version)
    return {"name": adapter, "pinned": body.version, "resolves_to": resolves_to.ref}


@router.put(
    "/adapters/{name}/share",
    response_model=None,
    responses=answer(answers.Shared, "Who may now use it.") | errors(404),
)
async def share_adapter(tenant: str, name: str, body: Share, request: Request, _: Admin) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    svc = services(request)
    adapter = _name(name)
    with domain_errors("tenants"):
        await asyncio.to_thread(_require, svc.registry.store(tenant), adapter)
        for other in body.tenants:
            await svc.tenants.get(other)
        await svc.pointers.share(tenant, adapter, [t for t in body.tenants if t != tenant])  # one gone: 404
    return {"adapter": f"{tenant}/{adapter}", "shared_with": sorted(set(body.tenants) - {tenant})}


@router.get(
    "/aliases",
    response_model=None,
    responses=answer(answers.AliasList, "Every alias and its target.") | errors(400, 404),
)
async def list_aliases(tenant: str, request: Request, _: Manager) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    aliases = (await services(request).pointers.of(tenant)).aliases
    return {"object": "list", "data": [{"alias": a, "target": t} for a, t in sorted(aliases.items())]}


@router.put(
    "/aliases/{alias}",
    response_model=None,
    responses=answer(answers.AliasSet, "The alias, repointed.") | errors(404, 409),
)
async def set_alias(tenant: str, alias: str, body: AliasTarget, request: Request, _: Manager) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    svc = services(request)
    with domain_errors("alias"):
        check_name(alias)
    store, base = svc.registry.store(tenant), svc.settings.served_model_name
    if await asyncio.to_thread(version_guard.names_a_model, store, base, alias):
        raise _model_named(alias)
    try:
        with domain_errors("target"):
            async with version_guard.pointing_at(svc.redis, svc.router, [body.target], tenant, alias) as (route,):
                with _in_experiment():
                    await svc.experiments.set_alias(tenant, alias, body.target)
    except version_guard.NameTaken as exc:  # an upload of that name came first, its body in while we checked
        raise _model_named(alias) from exc
    except version_guard.TargetMissing as exc:
        raise InvalidRequest(
            f"An alias points at the base model or at one adapter version (name@V); `{body.target}` is neither.",
            param="target",
            code="invalid_alias_target",
        ) from exc
    svc.pointers.forget_cached()
    return {"alias": alias, "target": body.target, "serves": route.served_model}


@router.delete(
    "/aliases/{alias}",
    response_model=None,
    responses=answer(answers.AliasDeleted, "Deleted.") | errors(400, 404, 409),
)
async def delete_alias(tenant: str, alias: str, request: Request, _: Manager) -> dict[str, Any]:
    await existing_tenant(request, tenant)
    svc = services(request)
    with domain_errors(), _in_experiment():  # its tenant deleted meanwhile (by another process): 404
        existed = await svc.experiments.set_alias(tenant, alias, None)
    svc.pointers.forget_cached()
    if not existed:
        raise NotFound(f"Alias `{alias}` does not exist.", param="alias", code="alias_not_found")
    return {"alias": alias, "object": "alias", "deleted": True}
