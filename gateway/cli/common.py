"""What every `loragate` command shares: the error and progress console, and a Redis client."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console

from gateway.ports import url_host
from gateway.settings import Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from rich.table import Table

    from gateway.tenants import Tenant

console = Console(stderr=True)
T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    """Print an error (unwrapped, so it can be searched) and return the exit to raise."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


def stdout_console() -> Console:
    """Standard output; piped, wide enough for the tables (at rich's default 80 columns they cut names short)."""
    found = Console()
    return found if found.is_terminal else Console(width=240)


def plain_table(*headers: str, title: str | None = None, caption: str | None = None) -> Table:
    """A table whose cells are shown as given, never read as rich markup (an arm or key named `a[/b]` failed the
    command, `[red]x` showed as `x`), and whose long values fold rather than end in `…` (piped, at 80 columns,
    `treatment-a` and `treatment-b` both read `treat…`)."""
    from rich.table import Table
    from rich.text import Text

    class PlainTable(Table):
        def add_row(self, *cells: Any, **options: Any) -> None:
            super().add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells), **options)

    table = PlainTable(
        *headers, title=None if title is None else Text(title), caption=None if caption is None else Text(caption)
    )
    for column in table.columns:
        column.overflow = "fold"
    return table


def _private(path: str, flags: int) -> int:
    """Created readable by its owner alone; a file of this user's written over is made so too (not a FIFO or a
    terminal: /dev/stdout is written to as it is)."""
    fd = os.open(path, flags, 0o600)
    try:
        found = os.fstat(fd)
        if stat.S_ISREG(found.st_mode) and found.st_uid == os.getuid() and found.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def output_file(path: Path) -> TextIO:
    """PATH opened for writing (text); the command ends with the reason where it cannot be (a folder, a folder that
    does not exist, no permission), rather than with a traceback. The file is its owner's alone (an export holds
    end users' conversations: the usual umask made it readable by every user of the host)."""
    try:
        return open(path, "w", encoding="utf-8", opener=_private)  # noqa: SIM115 (the caller closes it)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror or exc}") from exc


def who(fallback: str) -> str:
    """Who runs this command, for audit fields: `cli:<login>`, or `fallback` for an arbitrary uid with no
    passwd entry (some container platforms)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return fallback


@contextlib.contextmanager
def progress(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner for long one-off work, with each step also logged."""
    with console.status(title) as status:

        def step(message: str) -> None:
            console.log(message)
            status.update(message)

        yield step


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Refusals of the registry, tenants and keys (bad names, missing things) end the command with their
    message; Redis being unreachable too."""
    from redis.exceptions import RedisError

    from adapters.store import AdapterNotFound
    from gateway.apikeys import KeyNotFound
    from gateway.experiments import ExperimentNotFound
    from gateway.tenants import TenantNotFound
    from gateway.version_guard import AdapterBusy

    try:
        yield
    except (AdapterNotFound, KeyNotFound, TenantNotFound, ExperimentNotFound, AdapterBusy, ValueError) as exc:
        raise fail(said(exc)) from exc
    except (RedisError, OSError) as exc:
        raise fail(f"Redis cannot be reached ({exc}); this command uses {redis_servers(Settings())}") from exc


def said(exc: Exception) -> str:
    """An exception's message; a pydantic ValidationError's in one line a field each, without its links to
    pydantic's site (`--max-error-rate 2` printed pydantic's whole report)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where.replace('_', '-')}: {message}" if where else message)
    return "; ".join(parts)


def redis_servers(settings: Settings) -> str:
    """The Redis servers the settings name, without their credentials: which one failed is in Redis's error."""

    def shown(url: str) -> str:  # no user, password or query (`?password=` is one way to give it)
        parts = urlsplit(url)
        if not parts.netloc:  # unix:///path
            return url.partition("?")[0]
        netloc = url_host(parts.hostname or "")
        return parts._replace(netloc=f"{netloc}:{parts.port}" if parts.port else netloc, query="").geturl()

    named = f"LORAGATE_REDIS_URL={shown(settings.redis_url)}"
    if settings.records_redis_url and settings.records_redis_url != settings.redis_url:
        named += f", LORAGATE_RECORDS_REDIS_URL={shown(settings.records_redis_url)}"
    return named


def with_redis(work: Callable[..., Awaitable[T]], records: bool = False) -> T:
    """Run `work(redis)` with a Redis client of the settings' LORAGATE_REDIS_URL (with `records`: of
    LORAGATE_RECORDS_REDIS_URL, where the completion log and feedback live, if it is set)."""
    settings = Settings()
    url = (settings.records_redis_url or settings.redis_url) if records else settings.redis_url
    return with_redis_urls(work, [url])


def with_state_and_records(work: Callable[..., Awaitable[T]]) -> T:
    """Run `work(state, records)` with clients of LORAGATE_REDIS_URL and LORAGATE_RECORDS_REDIS_URL (the first
    again when the second is not set)."""
    settings = Settings()
    return with_redis_urls(work, [settings.redis_url, settings.records_redis_url or settings.redis_url])


JOB_REDIS_TIMEOUT_S = 30.0
"""How long a command waits for a Redis reply: an export's page from a Redis fsyncing on a busy disk may take
seconds (the gateway's own clients give up after 5 s, and so did redis-py 8's default)."""


def job_redis(url: str) -> aioredis.Redis:
    """A command's client of one Redis."""
    import redis.asyncio as aioredis

    return aioredis.from_url(url, decode_responses=True, socket_timeout=JOB_REDIS_TIMEOUT_S, socket_connect_timeout=5)


def with_redis_urls(work: Callable[..., Awaitable[T]], urls: list[str]) -> T:
    """Run `work(*clients)`, one Redis client per URL, closed after."""

    async def run() -> T:
        clients = [job_redis(url) for url in urls]
        try:
            return await work(*clients)
        finally:
            for client in clients:
                await client.aclose()

    with refusals():
        return asyncio.run(run())


def tenant_must_exist(tenant: str) -> Tenant:
    """The tenant; the command ends unless it exists."""
    from gateway.tenants import TenantStore

    async def get(redis: Any) -> Tenant:
        return await TenantStore(redis).get(tenant)

    return with_redis(get)


def alias_must_be_free(tenant: str, alias: str) -> None:
    """End the command unless ALIAS is a valid name that no model of the tenant has (as the admin API checks)."""
    from adapters.manifest import check_name
    from adapters.registry import Registry
    from gateway.version_guard import names_a_model

    settings = Settings()
    with refusals():
        check_name(alias)
        if names_a_model(Registry(settings.adapter_root).store(tenant), settings.served_model_name, alias):
            raise ValueError(f"`{alias}` is already the name of a model of tenant {tenant}")


def name_must_not_be_an_alias(tenant: str, name: str) -> None:
    """End the command if NAME is an alias of the tenant (an adapter of that name would be hidden behind it), as
    the admin API checks before an upload; `version_guard.publish_unaliased` checks again when it is listed."""
    from gateway.pointers import PointerStore

    async def aliases(redis: Any) -> dict[str, str]:
        return (await PointerStore(redis).of(tenant)).aliases

    with refusals():
        if name in with_redis(aliases):
            raise ValueError(f"`{name}` is already an alias of tenant {tenant}")
