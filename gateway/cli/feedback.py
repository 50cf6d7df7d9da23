"""`loragate feedback ...`: erase an end user's data, export rated completions for training.

Both read the completion log and feedback in the records Redis (LORAGATE_RECORDS_REDIS_URL, else
LORAGATE_REDIS_URL), as the admin API does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import console, fail, output_file, with_redis

feedback_app = typer.Typer(help="The completion log and its feedback.", no_args_is_help=True)

Tenant = Annotated[str, typer.Option("--tenant", help="The tenant.")]


@feedback_app.command("forget")
def forget(
    tenant: Tenant, user: Annotated[str, typer.Option("--user", help="The end user (OpenAI's `user`).")]
) -> None:
    """Delete every completion record of an end user and every rating they gave; prints what was removed."""
    import json

    from gateway.erasure import forget_user
    from gateway.tenants import TenantStore

    policy = with_redis(lambda redis: TenantStore(redis).get(tenant)).logging
    removed = with_redis(lambda redis: forget_user(redis, tenant, user, policy), records=True)
    typer.echo(json.dumps({"tenant": tenant, "user": user, "removed": removed}))


@feedback_app.command("export")
def export_cmd(
    tenant: Tenant,
    format: Annotated[str, typer.Option("--format", help="sft, dpo or kto (TRL's dataset formats).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSONL file (default: standard output).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only completions from then on: ISO date/time or unix time.")
    ] = None,
    alias: Annotated[str | None, typer.Option(help="Only completions asked for through this alias.")] = None,
    endpoint: Annotated[str, typer.Option(help="chat or completions records (TRL cannot mix them).")] = "chat",
) -> None:
    """Rated completions joined with their feedback, as JSON lines TRL trains on; a progress bar on stderr."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gateway.export import FORMATS, export
    from gateway.tenants import TenantStore

    if format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if endpoint not in ("chat", "completions"):
        raise fail(f"--endpoint must be chat or completions, not {endpoint!r}")
    start = _since(since)
    policy = with_redis(lambda redis: TenantStore(redis).get(tenant)).logging
    out = output_file(output) if output else sys.stdout
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rows]} rows"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=output is None) as bar:
            task = bar.add_task(f"exporting {tenant} ({format})", total=None, rows=0)

            def progress(read: int, written: int) -> None:
                bar.update(task, completed=read, rows=written, description=f"{read} records read")

            async def run(redis: Any) -> Any:
                kind: Any = format
                return await export(
                    redis, tenant, kind, out, policy, since=start, alias=alias, progress=progress, endpoint=endpoint
                )

            summary = with_redis(run, records=True)
    finally:
        if output:
            out.close()
    console.print(
        f"{summary.rows_written} rows from {summary.with_feedback} rated completions "
        f"({summary.records_read} records read, {summary.skipped} unusable)"
    )


def _since(value: str | None) -> float | None:
    """The Unix time `--since` says; a clear refusal for one no export can start from (inf, nan, 1e300, before 1970),
    rather than an OverflowError's traceback or Redis's complaint about a stream id."""
    from datetime import UTC, datetime

    from gateway.export import check_since

    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise fail(f"--since must be an ISO date/time or a unix time, not {value!r}") from exc
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    try:
        check_since(seconds)
    except ValueError as exc:
        raise fail(f"--since {value[:40]!r}: {exc}") from exc
    return seconds
