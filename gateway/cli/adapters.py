"""`loragate adapters ...` and `loragate aliases ...`: a tenant's adapter versions and the names
pointing at them. Files go to the store on disk; pins, aliases and shares go to Redis, where every
running gateway sees them within LORAGATE_STATE_POLL_S."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adapters.manifest import AdapterRef, Manifest
from adapters.store import AdapterNotFound
from gateway.cli.common import (
    alias_must_be_free,
    fail,
    name_must_not_be_an_alias,
    plain_table,
    refusals,
    stdout_console,
    tenant_must_exist,
    with_redis,
)
from gateway.settings import Settings

if TYPE_CHECKING:
    from adapters.store import AdapterStore

adapters_app = typer.Typer(help="A tenant's adapters (versions are immutable).", no_args_is_help=True)
aliases_app = typer.Typer(help="A tenant's aliases: names that point at an adapter version or the base.")
Tenant = Annotated[str, typer.Option("--tenant", help="The tenant that owns them.")]


def _store(tenant: str) -> AdapterStore:
    """The tenant's adapters; the command ends unless the tenant exists (a tenant never created listed no
    adapters, and `rm bot@1` of it said the adapter did not exist)."""
    from adapters.registry import Registry

    tenant_must_exist(tenant)
    with refusals():
        return Registry(Settings().adapter_root).store(tenant)


def _pins(tenant: str) -> dict[str, int]:
    from gateway.pointers import PointerStore

    async def pins(redis: Any) -> dict[str, int]:
        return (await PointerStore(redis).of(tenant)).pins

    return with_redis(pins)


@adapters_app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter folder or a .tar.gz of one.")],
    name: Annotated[str, typer.Option(help="Adapter name; each add makes its next version.")],
    tenant: Tenant,
) -> None:
    """Validate an adapter against the base model and store it as the tenant's next version of NAME."""
    from adapters.validate import BaseModelSpec
    from gateway import version_guard
    from gateway.cli.serve import base_folder
    from gateway.tenants import TenantStore

    settings = Settings()
    owner = tenant_must_exist(tenant)
    name_must_not_be_an_alias(tenant, name)
    if not path.exists():  # said before the base model is converted (seconds)
        raise fail(f"{path} does not exist")
    base = BaseModelSpec.from_folder(base_folder(settings), settings.served_model_name)
    store = _store(tenant)
    with refusals():
        stored = store.add(path, name, base, settings.max_lora_rank, origin=str(path.resolve()), listed=False)

    async def publish(redis: Any) -> Manifest:
        """Listed unless its tenant was deleted meanwhile (perhaps created again: it goes, not to a later namesake),
        or its name became an alias meanwhile (it goes too)."""
        try:
            return await version_guard.publish_unaliased(redis, TenantStore(redis), store, owner, stored)
        except version_guard.NameTaken as exc:
            raise ValueError(f"`{name}` is already an alias of tenant {tenant}") from exc

    with refusals():
        manifest = with_redis(publish)
    typer.echo(manifest.ref)


@adapters_app.command("list")
def adapters_list(tenant: Tenant) -> None:
    """Every version of the tenant's adapters."""

    store, pins = _store(tenant), _pins(tenant)
    table = plain_table("adapter", "rank", "alpha", "targets", "size", "sha256 (weights)", "created", "default")
    for m in store.list():
        default = "yes" if store.resolve(AdapterRef(m.name), pins.get(m.name)).version == m.version else ""
        table.add_row(
            m.ref,
            str(m.rank),
            f"{m.alpha:g}",
            ",".join(m.target_modules),
            f"{m.size_bytes / 1e6:.1f} MB",
            m.files.get("adapter_model.safetensors", "")[:12],
            m.created.strftime("%Y-%m-%d %H:%M"),
            default,
        )
    stdout_console().print(table)


@adapters_app.command("show")
def adapters_show(
    ref: Annotated[str, typer.Argument(help="name (default version) or name@version")], tenant: Tenant
) -> None:
    """Print one version's manifest as JSON."""
    with refusals():
        parsed = AdapterRef.parse(ref)
        typer.echo(_store(tenant).resolve(parsed, _pins(tenant).get(parsed.name)).model_dump_json(indent=2))


@adapters_app.command("rm")
def adapters_rm(ref: Annotated[str, typer.Argument(help="name@version to delete")], tenant: Tenant) -> None:
    """Delete one version, unless an alias or a live experiment serves it; running gateways unload it within
    a health interval."""
    from gateway import version_guard
    from gateway.experiments import ExperimentStore

    store = _store(tenant)
    with refusals():
        parsed = AdapterRef.parse(ref)

    async def remove(redis: Any) -> str:
        try:
            deleted = await version_guard.delete_version(
                redis, ExperimentStore(redis), store, tenant, parsed, name_others=True
            )
        except version_guard.VersionInUse as exc:
            raise ValueError(str(exc)) from exc
        return deleted

    typer.echo(f"deleted {with_redis(remove)}")


@adapters_app.command("pin")
def adapters_pin(
    ref: Annotated[str, typer.Argument(help="name@version the bare name should resolve to, or name to unpin")],
    tenant: Tenant,
) -> None:
    """Make `name` resolve to a fixed version instead of the latest (no version: unpin)."""
    from gateway.pointers import PointerStore

    store = _store(tenant)
    with refusals():
        parsed = AdapterRef.parse(ref)
        resolved = store.resolve(parsed)
        if not resolved.listed:  # as the admin API: a candidate is nobody's default until published
            raise AdapterNotFound(resolved.ref)

    async def pin(redis: Any) -> None:
        from gateway import version_guard

        async with version_guard.holding(redis, [(tenant, parsed.name)], tenant):  # no delete in between
            versions = await asyncio.to_thread(store.versions, parsed.name)
            if parsed.version is not None and parsed.version not in versions:
                raise AdapterNotFound(resolved.ref)
            await PointerStore(redis).pin(tenant, parsed.name, parsed.version)

    with refusals():
        with_redis(pin)
    typer.echo(f"{parsed.name} -> {resolved.ref}")


@adapters_app.command("share")
def adapters_share(
    name: Annotated[str, typer.Argument(help="The adapter (every version of it).")],
    tenant: Tenant,
    with_: Annotated[str, typer.Option("--with", help="Comma-separated tenants; empty: share with no one.")],
) -> None:
    """Let other tenants call this tenant's adapter as `OWNER/NAME[@V]` (the global admin's decision)."""
    from gateway.pointers import PointerStore
    from gateway.tenants import TenantStore

    consumers = [t.strip() for t in with_.split(",") if t.strip() and t.strip() != tenant]
    with refusals():
        ref = AdapterRef.parse(name)
        if ref.version is not None:  # shared as `acme/bot@5`, which no request looks up: nothing was shared
            raise fail(f"`{name}` names a version; this takes the adapter's name (`{ref.name}`).")
        _store(tenant).resolve(ref)

    async def share(redis: Any) -> None:
        for other in consumers:
            await TenantStore(redis).get(other)
        await PointerStore(redis).share(tenant, name, consumers)

    with_redis(share)
    typer.echo(f"{tenant}/{name} shared with {', '.join(consumers) or 'no one'}")


@aliases_app.command("set")
def aliases_set(
    alias: str,
    target: Annotated[str, typer.Argument(help="name@version, owner/name@version, or the base model.")],
    tenant: Tenant,
) -> None:
    """Point ALIAS at TARGET (an atomic repoint when it exists); requests for ALIAS get TARGET."""
    from adapters.registry import Registry
    from gateway import version_guard
    from gateway.experiments import ExperimentStore
    from gateway.pointers import PointerStore
    from gateway.routing import Router

    settings = Settings()
    tenant_must_exist(tenant)
    alias_must_be_free(tenant, alias)

    async def point(redis: Any) -> str:
        experiments, registry = ExperimentStore(redis), Registry(settings.adapter_root)
        router = Router(settings.served_model_name, registry, PointerStore(redis), experiments)
        try:
            async with version_guard.pointing_at(redis, router, [target], tenant, alias) as (route,):
                await experiments.set_alias(tenant, alias, target)  # refused while the alias runs an experiment
        except version_guard.NameTaken as exc:
            raise ValueError(f"`{alias}` is already the name of a model of tenant {tenant}") from exc
        except version_guard.TargetMissing as exc:
            raise ValueError(f"`{target}` is neither the base model nor a version this tenant can use") from exc
        return route.served_model

    typer.echo(f"{alias} -> {with_redis(point)}")


@aliases_app.command("list")
def aliases_list(tenant: Tenant) -> None:
    """The tenant's aliases and what they point at."""
    from gateway.pointers import PointerStore

    tenant_must_exist(tenant)

    async def aliases(redis: Any) -> dict[str, str]:
        return (await PointerStore(redis).of(tenant)).aliases

    for alias, target in sorted(with_redis(aliases).items()):
        typer.echo(f"{alias} -> {target}")


@aliases_app.command("rm")
def aliases_rm(alias: str, tenant: Tenant) -> None:
    """Delete an alias (requests for it then get 404); refused while it runs an experiment."""
    from gateway.experiments import ExperimentStore

    tenant_must_exist(tenant)

    async def delete(redis: Any) -> bool:
        return await ExperimentStore(redis).set_alias(tenant, alias, None)

    if not with_redis(delete):
        raise fail(f"alias {alias} does not exist")
    typer.echo(f"deleted {alias}")
