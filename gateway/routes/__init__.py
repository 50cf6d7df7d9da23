"""Thin HTTP handlers: authenticate (gateway.auth), validate, hand on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from starlette.requests import Request

from adapters.manifest import InvalidAdapter
from adapters.store import AdapterNotFound
from gateway.apikeys import InvalidKeyRequest, KeyNotFound
from gateway.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from gateway.principal import Principal
from gateway.tenants import InvalidTenant, Tenant, TenantExists, TenantNotFound
from gateway.version_guard import AdapterBusy

if TYPE_CHECKING:
    from gateway.app import Services


def services(request: Request) -> Services:
    """The app's services, built in its lifespan."""
    return request.app.state.services  # type: ignore[no-any-return]


async def callers_tenant(svc: Services, caller: Principal) -> Tenant:
    """A tenant key's tenant. 401 where it was deleted after the key was verified (a verified key is cached for up
    to a state poll): the key is as good as revoked."""
    assert caller.tenant is not None
    try:
        return await svc.tenants.cached(caller.tenant)
    except TenantNotFound as exc:
        raise AuthenticationFailed("This API key's tenant no longer exists.") from exc


@contextmanager
def domain_errors(param: str | None = None) -> Iterator[None]:
    """The registry's, tenants' and keys' refusals, as OpenAI-style HTTP errors."""
    try:
        yield
    except InvalidTenant as exc:
        raise InvalidRequest(str(exc), param=param or "tenant", code="invalid_tenant") from exc
    except InvalidAdapter as exc:
        raise InvalidRequest(str(exc), param=exc.param or param, code="invalid_adapter") from exc
    except InvalidKeyRequest as exc:
        raise InvalidRequest(str(exc), param=exc.param or param, code="invalid_key_request") from exc
    except TenantExists as exc:
        raise Conflict(str(exc), param=param or "name", code="tenant_exists") from exc
    except TenantNotFound as exc:
        raise NotFound(str(exc), param="tenant", code="tenant_not_found") from exc
    except KeyNotFound as exc:
        raise NotFound(str(exc), param="key_id", code="key_not_found") from exc
    except AdapterNotFound as exc:
        raise NotFound(str(exc), param=param or "ref", code="adapter_not_found") from exc
    except AdapterBusy as exc:
        raise Conflict(str(exc), param=param, code="adapter_busy") from exc


async def existing_tenant(request: Request, tenant: str) -> Tenant:
    """The tenant an admin route names: 400 `invalid_tenant` for a name no tenant can have, 404 `tenant_not_found`."""
    with domain_errors():
        return await services(request).tenants.get(tenant)
