"""A tenant's experiments, for the admin key or that tenant's `manage` key (its own experiments only).

POST   /admin/tenants/{tenant}/experiments                   {"name", "alias", "control", "arms": [...]}
       (each arm {"name", "target", "weight"}: an adapter version or the base)
GET    /admin/tenants/{tenant}/experiments                   every experiment
GET    /admin/tenants/{tenant}/experiments/{name}            one, with its audit log (who changed what, when)
GET    /admin/tenants/{tenant}/experiments/{name}/results    per arm figures, SRM, differences, the verdict
GET    /admin/tenants/{tenant}/experiments/{name}/page       an HTML page: the chart over time, figures, changes
PUT    /admin/tenants/{tenant}/experiments/{name}/weights    {"weights": {"arm": weight}}: moves only whom it must
POST   /admin/tenants/{tenant}/experiments/{name}/pause      every request to control; /resume splits again
POST   /admin/tenants/{tenant}/experiments/{name}/stop       ends it; the alias serves control
POST   /admin/tenants/{tenant}/experiments/{name}/promote    {"arm"}: the alias points at that arm's version
POST   /admin/tenants/{tenant}/experiments/{name}/rollback   the alias points at what it served before
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.manifest import check_name
from gateway import admin_protocol as answers
from gateway import experiment_history, experiment_page, version_guard
from gateway.assignment import MAX_ARMS
from gateway.auth import Manager
from gateway.errors import Conflict, InvalidRequest, NotFound, from_validation_error
from gateway.experiment_results import results
from gateway.experiments import (
    Arm,
    Experiment,
    ExperimentConflict,
    ExperimentNotFound,
    InvalidExperiment,
    Status,
    Weight,
)
from gateway.openapi import answer, errors
from gateway.principal import Principal
from gateway.routes import domain_errors, existing_tenant, services
from gateway.routes.strict_json import StrictJSONRoute
from gateway.tenants import TenantNotFound

router = APIRouter(prefix="/admin/tenants/{tenant}/experiments", route_class=StrictJSONRoute)


async def _tenants_manager(tenant: str, request: Request, caller: Manager) -> Principal:
    """The caller, who may manage `tenant`, which exists: checked in that order (a 401 or 403 before a 404), so that
    every route of an unknown tenant is its 404 and an invalid name its 400, as on the other admin routes."""
    await existing_tenant(request, tenant)
    return caller


TenantsManager = Annotated[Principal, Depends(_tenants_manager)]

CHANGE: dict[str, Any] = {
    "response_model": None,
    "responses": answer(answers.ExperimentView, "The experiment, changed.") | errors(400, 404, 409),
}
"""What a change of an experiment answers, in the OpenAPI schema."""


class NewExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str
    alias: str
    control: str
    arms: list[Arm] = Field(max_length=MAX_ARMS)  # refused before a lock is taken for each arm's target
    alpha: float = 0.05
    min_samples: int = 100
    mixture_sd: float = 0.1
    smallest_effect: float = Field(0.02, le=1)  # a rate's difference; not on Experiment: those stored stay readable
    auto_promote: bool = False
    max_error_rate: float | None = None
    max_negative_rate: float | None = None
    guard_min_requests: int = 20


class Weights(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    weights: dict[str, Weight]


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    arm: str


def _who(caller: Principal) -> str:
    return "admin" if caller.is_admin else f"key:{caller.key_id}"


def _shown(experiment: Experiment) -> dict[str, Any]:
    return {"object": "experiment", **experiment.model_dump(exclude={"allocation"})}


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except ExperimentNotFound as exc:
        raise NotFound(str(exc), param="name", code="experiment_not_found") from exc
    except TenantNotFound as exc:  # deleted while the change was made
        raise NotFound(str(exc), param="tenant", code="tenant_not_found") from exc
    except ExperimentConflict as exc:
        raise Conflict(str(exc), code="experiment_conflict") from exc
    except InvalidExperiment as exc:
        raise InvalidRequest(str(exc), code="invalid_experiment") from exc
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


@router.post(
    "",
    status_code=201,
    response_model=None,
    responses=answer(answers.ExperimentView, "Running: the alias now splits its requests.", 201) | errors(404, 409),
)
async def create_experiment(
    tenant: str, body: NewExperiment, request: Request, caller: TenantsManager
) -> dict[str, Any]:
    svc = services(request)
    with domain_errors("alias"):
        check_name(body.alias)
    store, base = svc.registry.store(tenant), svc.settings.served_model_name
    name_taken = Conflict(
        f"`{body.alias}` is already the name of a model of this tenant.", param="alias", code="name_taken"
    )
    if await asyncio.to_thread(version_guard.names_a_model, store, base, body.alias):
        raise name_taken
    targets = [a.target for a in body.arms]
    try:
        with domain_errors("arms"):
            async with version_guard.pointing_at(svc.redis, svc.router, targets, tenant, body.alias):
                with _refusals():
                    experiment = Experiment(tenant=tenant, **body.model_dump())
                    created = await svc.experiments.create(experiment, _who(caller))
    except version_guard.NameTaken as exc:  # an upload of that name came first
        raise name_taken from exc
    except version_guard.TargetMissing as exc:
        arm = body.arms[exc.index]
        raise InvalidRequest(
            f"Arm `{arm.name}`: `{arm.target}` is neither the base model nor a version this tenant can use.",
            param="arms",
            code="invalid_arm",
        ) from exc
    svc.pointers.forget_cached()  # the alias moved: this process sees it at once (others within a poll)
    return _shown(created)


@router.get(
    "", response_model=None, responses=answer(answers.ExperimentList, "The tenant's experiments.") | errors(400, 404)
)
async def list_experiments(tenant: str, request: Request, _: TenantsManager) -> dict[str, Any]:
    return {"object": "list", "data": [_shown(e) for e in await services(request).experiments.all(tenant)]}


@router.get(
    "/{name}",
    response_model=None,
    responses=answer(answers.ExperimentDetail, "The experiment and its audit log.") | errors(400, 404),
)
async def show_experiment(tenant: str, name: str, request: Request, _: TenantsManager) -> dict[str, Any]:
    store = services(request).experiments
    with _refusals():
        found = await store.get(tenant, name)
    return {**_shown(found), "audit": [change.model_dump() for change in await store.audit(tenant, name)]}


@router.get(
    "/{name}/results",
    response_model=None,
    responses=answer(answers.ExperimentResults, "What it has shown so far.") | errors(400, 404),
)
async def experiment_results(tenant: str, name: str, request: Request, _: TenantsManager) -> dict[str, Any]:
    """Per arm exposures, errors, latency, tokens and feedback; SRM, differences from control, the verdict."""
    svc = services(request)
    with _refusals():
        found = await svc.experiments.get(tenant, name)
    return await results(svc.records_redis, found)


@router.get(
    "/{name}/page",
    response_class=HTMLResponse,
    response_description="An HTML page: the chart over time, figures, changes.",
    responses=errors(400, 404),
)
async def experiment_page_html(tenant: str, name: str, request: Request, _: TenantsManager) -> HTMLResponse:
    """The experiment's page: its metric and intervals per arm over time, its figures and its changes."""
    svc = services(request)
    with _refusals():
        found = await svc.experiments.get(tenant, name)
    shown = await results(svc.records_redis, found)
    history = await experiment_history.read(svc.records_redis, found)
    audit = await svc.experiments.audit(tenant, name)
    page = await asyncio.to_thread(experiment_page.render, found, shown, history, audit)
    return HTMLResponse(page)


@router.put("/{name}/weights", **CHANGE)
async def set_weights(
    tenant: str, name: str, body: Weights, request: Request, caller: TenantsManager
) -> dict[str, Any]:
    with _refusals():
        return _shown(await services(request).experiments.set_weights(tenant, name, body.weights, _who(caller)))


async def _status(
    request: Request, tenant: str, name: str, status: Status, caller: Principal, arm: str | None = None
) -> dict[str, Any]:
    svc = services(request)
    try:
        with _refusals():
            changed = await version_guard.set_status(svc.router, tenant, name, status, _who(caller), arm)
    except version_guard.TargetMissing as exc:
        raise Conflict(
            f"`{exc.target}` does not exist any more, so the alias cannot point at it: promote an arm whose "
            "version exists, or stop the experiment (the alias then serves control).",
            param="arm" if status == "promoted" else None,
            code="target_missing",
        ) from exc
    svc.pointers.forget_cached()
    return _shown(changed)


@router.post("/{name}/pause", **CHANGE)
async def pause(tenant: str, name: str, request: Request, caller: TenantsManager) -> dict[str, Any]:
    return await _status(request, tenant, name, "paused", caller)


@router.post("/{name}/resume", **CHANGE)
async def resume(tenant: str, name: str, request: Request, caller: TenantsManager) -> dict[str, Any]:
    return await _status(request, tenant, name, "running", caller)


@router.post("/{name}/stop", **CHANGE)
async def stop(tenant: str, name: str, request: Request, caller: TenantsManager) -> dict[str, Any]:
    return await _status(request, tenant, name, "stopped", caller)


@router.post("/{name}/promote", **CHANGE)
async def promote(tenant: str, name: str, body: Promotion, request: Request, caller: TenantsManager) -> dict[str, Any]:
    return await _status(request, tenant, name, "promoted", caller, body.arm)


@router.post("/{name}/rollback", **CHANGE)
async def rollback(tenant: str, name: str, request: Request, caller: TenantsManager) -> dict[str, Any]:
    return await _status(request, tenant, name, "rolled back", caller)
