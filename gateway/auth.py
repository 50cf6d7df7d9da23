"""Who is calling, as one typed FastAPI dependency per kind of route.

- `Caller`: any valid key: the global admin key (LORAGATE_ADMIN_KEY) or a tenant's key;
- `TenantCaller`: a tenant's key of either role (the /v1 routes: the admin key belongs to no tenant);
- `Manager`: the admin key, or a `manage` key of the tenant named in the path;
- `Admin`: the admin key only.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.principal import ADMIN, Principal

if TYPE_CHECKING:
    from gateway.app import Services


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'."
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
    return token


def bearer_matches(authorization: str | None, secret: str | None) -> bool:
    """Whether the Bearer token is `secret` (a configured key: admin, metrics), compared in constant time."""
    if secret is None:
        return False
    try:
        token = bearer_token(authorization)
    except AuthenticationFailed:
        return False
    return hmac.compare_digest(token.encode(), secret.encode())


def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def authenticate(request: Request) -> Principal:
    svc = _services(request)
    token = bearer_token(request.headers.get("authorization"))
    admin_key = svc.settings.admin_key
    if admin_key is not None and hmac.compare_digest(token.encode(), admin_key.get_secret_value().encode()):
        return ADMIN
    principal = await svc.keys.verify(token)
    request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(authenticate)]


async def tenant_caller(caller: Caller) -> Principal:
    if caller.tenant is None:
        raise PermissionDenied("The admin key manages loragate; call the /v1 API with a tenant's key.")
    return caller


async def manager(tenant: str, caller: Caller) -> Principal:
    if not caller.can_manage(tenant):
        raise PermissionDenied("This key cannot manage that tenant: it needs the admin key or the tenant's manage key.")
    return caller


async def admin(caller: Caller) -> Principal:
    if not caller.is_admin:
        raise PermissionDenied("This needs the admin key (LORAGATE_ADMIN_KEY).")
    return caller


TenantCaller = Annotated[Principal, Depends(tenant_caller)]
Manager = Annotated[Principal, Depends(manager)]
Admin = Annotated[Principal, Depends(admin)]
