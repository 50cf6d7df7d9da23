"""`loragate tenants ...` and `loragate keys ...`: who may call loragate, with what role and limits.

They write to Redis directly, as the admin API does; every running gateway sees the change within
LORAGATE_STATE_POLL_S (a revoked key fails everywhere within a second).
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from gateway.cli.common import fail, plain_table, stdout_console, with_redis

tenants_app = typer.Typer(help="Tenants: the teams sharing this loragate.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants (stored as sha256 hashes only).", no_args_is_help=True)

Rpm = Annotated[int | None, typer.Option("--rpm", min=0, help="Requests per minute (0 or none: no limit).")]
Tpm = Annotated[int | None, typer.Option("--tpm", min=0, help="Tokens per minute (0 or none: no limit).")]


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits, '_' or '-'.")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    on_redis_down: Annotated[str, typer.Option(help="open: admit when quotas cannot be checked; closed: refuse.")] = (
        "open"
    ),
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Succeed if the tenant already exists.")] = False,
) -> None:
    """Create a tenant."""
    from gateway.erasure import tenant_deleted
    from gateway.tenants import Limits, TenantExists, TenantStore

    if on_redis_down not in ("open", "closed"):
        raise fail(f"--on-redis-down must be open or closed, not {on_redis_down!r}")

    deleted = with_redis(lambda redis: tenant_deleted(redis, name), records=True)

    async def create(redis: Any) -> str:
        try:  # created after the last deletion of a tenant of that name, whatever this host's clock says
            limits = Limits(rpm=rpm or None, tpm=tpm or None)
            return (
                await TenantStore(redis).create(name, limits, on_redis_down, not_before=deleted[0] if deleted else 0.0)
            ).name
        except TenantExists:
            if not exist_ok:
                raise
            return name

    typer.echo(with_redis(create))


@tenants_app.command("list")
def tenants_list() -> None:
    """Every tenant, with its limits and key count."""

    from gateway import keys
    from gateway.tenants import TenantStore

    async def rows(redis: Any) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        for tenant in await TenantStore(redis).all():
            count = await redis.scard(keys.tenant_keys(tenant.name))
            limits = tenant.limits
            out.append((tenant.name, str(limits.rpm or "-"), str(limits.tpm or "-"), tenant.on_redis_down, str(count)))
        return out

    table = plain_table("tenant", "rpm", "tpm", "on Redis down", "keys")
    for row in with_redis(rows):
        table.add_row(*row)
    stdout_console().print(table)


@tenants_app.command("show")
def tenants_show(name: str) -> None:
    """One tenant's settings, as JSON."""
    from gateway.tenants import TenantStore

    async def show(redis: Any) -> str:
        return (await TenantStore(redis).get(name)).model_dump_json(indent=2)

    typer.echo(with_redis(show))


@tenants_app.command("update")
def tenants_update(name: str, rpm: Rpm = None, tpm: Tpm = None, on_redis_down: str | None = None) -> None:
    """Change a tenant's limits (--rpm/--tpm 0: no limit) or what happens when Redis is down."""
    from gateway.tenants import Limits, TenantChanges, TenantStore

    async def update(redis: Any) -> str:
        store = TenantStore(redis)
        current = (await store.get(name)).limits
        limits = Limits(
            rpm=current.rpm if rpm is None else rpm or None, tpm=current.tpm if tpm is None else tpm or None
        )
        changes = TenantChanges.model_validate({"limits": limits, "on_redis_down": on_redis_down})
        return (await store.update(name, changes)).model_dump_json(indent=2)

    typer.echo(with_redis(update))


@tenants_app.command("logging")
def tenants_logging(
    name: str,
    content: Annotated[
        bool | None, typer.Option("--content/--no-content", help="Keep prompts and responses, or metadata only.")
    ] = None,
    redact: Annotated[str | None, typer.Option(help="PII to redact: email,phone,card,iban,ip (or none).")] = None,
    phone_region: Annotated[
        str | None, typer.Option(help="Region of phone numbers written without +country code (ISO 3166, e.g. GB).")
    ] = None,
    max_records: Annotated[int | None, typer.Option(min=100, help="Completion records kept.")] = None,
    max_age_days: Annotated[float | None, typer.Option(help="Completion records kept this long.")] = None,
    score_range: Annotated[str | None, typer.Option(help="Feedback scores accepted, as MIN,MAX (e.g. 1,5).")] = None,
) -> None:
    """What the completion log keeps for a tenant (options left out stay as they are)."""
    from pydantic import ValidationError

    from gateway.records import LogPolicy
    from gateway.tenants import LogPolicyChanges, TenantChanges, TenantStore

    changes: dict[str, Any] = {
        "content": content,
        "phone_region": phone_region,
        "max_records": max_records,
        "max_age_days": max_age_days,
    }
    if redact is not None:
        changes["redact"] = [] if redact == "none" else [kind.strip() for kind in redact.split(",") if kind.strip()]
    if score_range is not None:
        low, _, high = score_range.partition(",")
        try:
            changes["score_min"], changes["score_max"] = float(low), float(high)
        except ValueError as exc:
            raise fail(f"--score-range must be MIN,MAX, not {score_range!r}") from exc
    try:
        current = with_redis(lambda redis: TenantStore(redis).get(name)).logging
        policy = LogPolicy.model_validate(
            {**current.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        )
    except ValidationError as exc:
        raise fail(f"invalid logging policy: {exc.errors()[0]['msg']}") from exc

    async def update(redis: Any) -> str:
        tenant = await TenantStore(redis).update(name, TenantChanges(logging=LogPolicyChanges(**policy.model_dump())))
        return tenant.logging.model_dump_json(indent=2)

    typer.echo(with_redis(update))


@tenants_app.command("delete")
def tenants_delete(
    name: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False
) -> None:
    """Delete a tenant: its keys stop working everywhere within a second; its aliases, pins, shares and
    adapters are deleted."""
    from adapters.registry import Registry
    from gateway.erasure import mark_tenant_deleted, purge_tenant
    from gateway.settings import Settings
    from gateway.tenants import TenantStore, check_tenant_name

    try:
        check_tenant_name(name)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if not yes:
        typer.confirm(f"Delete tenant {name}, its keys and every adapter it owns?", abort=True)

    async def purge(redis: Any) -> int:  # the tombstone first: records still queued somewhere are refused
        await mark_tenant_deleted(redis, name, tenant.created, tenant.logging.max_age_s)
        return await purge_tenant(redis, name)

    async def delete(redis: Any) -> int:
        return len(await TenantStore(redis).delete(name))

    # The log is purged before the tenant goes, so that a failure on the way leaves a deletion to ask again.
    tenant = with_redis(lambda redis: TenantStore(redis).get(name))
    records = with_redis(purge, records=True)
    revoked = with_redis(delete)
    settings = Settings()
    Registry(settings.adapter_root).remove_tenant(name)
    shutil.rmtree(settings.training_root / name, ignore_errors=True)  # retraining runs copy its log
    typer.echo(f"deleted {name} ({revoked} keys revoked, {records} completion records erased)")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (it must exist).")],
    role: Annotated[str, typer.Option(help="inference (calls /v1) or manage (also manages the tenant).")] = (
        "inference"
    ),
    expires: Annotated[str | None, typer.Option(help="Lifetime, e.g. 30d, 12h, 90m (default: never).")] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
    rpm: Rpm = None,
    tpm: Tpm = None,
) -> None:
    """Create an API key; the key is printed once (the last line), only its hash is stored."""
    from gateway.apikeys import KeyStore, parse_duration
    from gateway.tenants import Limits

    async def create(redis: Any) -> str:
        lifetime = parse_duration(expires) if expires is not None else None
        key, info = await KeyStore(redis).create(tenant, role, name, lifetime, Limits(rpm=rpm or None, tpm=tpm or None))
        typer.echo(f"id {info.id}, role {info.role}, expires {_when(info.expires_at)}", err=True)
        return key

    typer.echo(with_redis(create))


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Whose keys.")]) -> None:
    """A tenant's keys: id, prefix, role, created, expiry, last use (never the key)."""

    from gateway.apikeys import KeyInfo, KeyStore

    async def infos(redis: Any) -> list[KeyInfo]:
        return await KeyStore(redis).list(tenant)

    table = plain_table("id", "prefix", "role", "name", "created", "expires", "last used", "rpm", "tpm")
    for info in with_redis(infos):
        limits = info.limits
        table.add_row(
            info.id,
            info.prefix + "_…",
            info.role,
            info.name,
            _when(info.created),
            _when(info.expires_at),
            _when(info.last_used),
            str(limits.rpm or "-"),
            str(limits.tpm or "-"),
        )
    stdout_console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (keys list shows it).")]) -> None:
    """Revoke a key: every running gateway refuses it within a second."""
    from gateway.apikeys import KeyStore

    async def revoke(redis: Any) -> str:
        return (await KeyStore(redis).revoke(key_id)).id

    typer.echo(f"revoked {with_redis(revoke)}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key to replace.")],
    grace: Annotated[str, typer.Option(help="How long the old key keeps working, e.g. 1h, 10m, 0s.")] = "1h",
) -> None:
    """A new key like the old one (tenant, role, limits); the old one works until the grace ends.
    The new key is printed last."""
    from gateway.apikeys import KeyStore, parse_duration

    async def rotate(redis: Any) -> str:
        key, info = await KeyStore(redis).rotate(key_id, parse_duration(grace, allow_zero=True))
        typer.echo(f"id {info.id} replaces {key_id}, which works for {grace} more", err=True)
        return key

    typer.echo(with_redis(rotate))


@keys_app.command("check")
def keys_check(key: Annotated[str, typer.Argument(help="The API key to check.")]) -> None:
    """Exit 0 if the key is valid, printing its tenant and role as JSON; exit 1 if not."""
    from gateway.apikeys import KeyStore
    from gateway.errors import APIError

    async def check(redis: Any) -> str:
        store = KeyStore(redis, cache_seconds=0)
        await store.measure_clock()  # its expiry, by Redis's clock as the gateways read it
        principal = await store.verify(key)
        return json.dumps({"tenant": principal.tenant, "role": principal.role, "key_id": principal.key_id})

    try:
        typer.echo(with_redis(check))
    except APIError as exc:
        raise fail(exc.message) from exc
