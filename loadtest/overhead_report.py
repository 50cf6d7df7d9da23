"""The overhead benchmark's report (loadtest.overhead): latency, tenancy and throughput tables, a summary line."""

from __future__ import annotations

from typing import Any

from loadtest.reports import ms
from loadtest.runner import console


def header(report: dict[str, Any]) -> list[str]:
    """The title and the run's facts: when, on what machine, with which command, gateway and settings."""
    cfg, m, conc = report["config"], report["machine"], report["concurrent"]
    load = report["load_average_before"]
    return [
        "# Gateway overhead",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), {m['platform']}, Python {m['python']}; "
        f"load average before the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- Command: `{report['command']}`",
        f"- Gateway: `{' '.join(report['gateway_command'])}` (LORAGATE_ENGINE_URLS = the mock), "
        f"uvicorn {report['versions'].get('uvicorn', '?')}, fastapi {report['versions'].get('fastapi', '?')}",
        "- Upstream: `loadtest/mock_upstream.py` (a raw asyncio protocol, answers at once). Client: one aiohttp "
        "session, keep-alive (sequential); `loadtest/wire.py` (a raw asyncio protocol, keep-alive) for the "
        "concurrent load. Client, gateway, mock and redis share the same machine.",
        f"- Sequential: {cfg['repeats']} runs x {cfg['requests']} requests per target (after {cfg['warmup']} "
        "warm-up), direct and gateway alternating; each figure is the median of the runs.",
        f"- Concurrent: {cfg['concurrency']} clients, {cfg['duration_s']:g} s per target in "
        f"{cfg['segments'] * 2} alternating segments ({', '.join(conc['segments'])}).",
        "",
    ]


def latency_row(name: str, direct: dict[str, float], gateway: dict[str, float]) -> str:
    """A latency row whose added figures are the difference of the two medians shown."""
    return (
        f"| {name} | {ms(direct['p50_ms'])} | {ms(gateway['p50_ms'])} | "
        f"{ms(gateway['p50_ms'] - direct['p50_ms'], True)} | {ms(direct['p99_ms'])} | "
        f"{ms(gateway['p99_ms'])} | {ms(gateway['p99_ms'] - direct['p99_ms'], True)} |"
    )


def added_latency_row(name: str, section: dict[str, Any], direct: dict[str, float], gateway: dict[str, float]) -> str:
    """A latency row whose added figures are the section's own `added`."""
    # sequential: the median over runs of (gateway - direct), which can differ slightly from
    # the difference of the medians shown next to it
    added = section["added"]
    return (
        f"| {name} | {ms(direct['p50_ms'])} | {ms(gateway['p50_ms'])} | {ms(added['p50_ms'], True)} | "
        f"{ms(direct['p99_ms'])} | {ms(gateway['p99_ms'])} | {ms(added['p99_ms'], True)} |"
    )


def latency_section(report: dict[str, Any]) -> list[str]:
    """Direct against gateway latency: sequential non-stream and stream, and concurrent."""
    seq, stream, conc = report["sequential_nonstream"], report["sequential_stream"], report["concurrent"]
    return [
        "## Latency (ms)",
        "",
        "| Scenario | Direct p50 | Gateway p50 | Added p50 | Direct p99 | Gateway p99 | Added p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        added_latency_row("Sequential, non-stream", seq, seq["direct"], seq["gateway"]),
        latency_row("Sequential, stream: first byte", stream["direct"]["first_byte"], stream["gateway"]["first_byte"]),
        added_latency_row("Sequential, stream: last byte", stream, stream["direct"], stream["gateway"]),
        latency_row(f"Concurrent (C={conc['concurrency']}), non-stream", conc["direct"], conc["gateway"]),
        "",
    ]


def tenancy_section(report: dict[str, Any]) -> list[str]:
    """What tenancy and quotas add to the serving core, when the report has that measurement."""
    tenancy = report.get("tenancy_nonstream")
    if not tenancy:
        return []
    return [
        "## Tenancy and quotas (ms)",
        "",
        "The same gateway, two keys, alternating request by request: a tenant without limits calling the base "
        "model by name (the serving core: auth from the cache, no Redis call), and a tenant with request and "
        "token quotas calling it through an alias (auth, namespace, alias, and the quota: one Lua script per "
        "check, most requests admitted from a lease in-process; LORAGATE_QUOTA_LEASE_REQUESTS=0 checks each "
        "one in Redis).",
        "",
        "| Scenario | Core p50 | Tenancy + quotas p50 | Added p50 | Core p99 | Tenancy + quotas p99 | Added p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        added_latency_row("Sequential, non-stream", tenancy, tenancy["gateway"], tenancy["tenancy"]),
        "",
    ]


def throughput_row(name: str, section: dict[str, Any]) -> str:
    """Requests/s direct and through the gateway, their ratio, and the gateway's CPU time per request."""
    cpu = section.get("gateway_cpu_us_per_request")
    cpu_text = f"{cpu / 1000:.2f} ms" if cpu is not None else "n/a"
    return (
        f"| {name} | {section['direct']['requests_per_s']:.0f} | {section['gateway']['requests_per_s']:.0f} "
        f"| {section['ratio_requests_per_s']:.2f} | {cpu_text} |"
    )


def throughput_section(report: dict[str, Any]) -> list[str]:
    """Requests/s of each scenario, direct against gateway."""
    seq, stream, conc = report["sequential_nonstream"], report["sequential_stream"], report["concurrent"]
    return [
        "## Throughput (requests/s)",
        "",
        "| Scenario | Direct | Gateway | Gateway / direct | Gateway CPU per request |",
        "|---|---:|---:|---:|---:|",
        throughput_row("Sequential, non-stream", seq),
        throughput_row("Sequential, stream", stream),
        throughput_row(f"Concurrent (C={conc['concurrency']}), non-stream", conc),
        "",
    ]


def notes(report: dict[str, Any]) -> list[str]:
    """The added latency run by run, the concurrent errors, and how the figures are computed."""
    seq, stream, conc = report["sequential_nonstream"], report["sequential_stream"], report["concurrent"]
    per_run = ", ".join(ms(x, True) for x in seq["added"]["p50_ms_per_run"])
    per_run_stream = ", ".join(ms(x, True) for x in stream["added"]["p50_ms_per_run"])
    return [
        f"Added p50 in each run: non-stream {per_run} ms; stream {per_run_stream} ms. "
        f"Median of paired differences (same request index): non-stream "
        f"{ms(seq['added']['paired_p50_ms'], True)} ms, stream {ms(stream['added']['paired_p50_ms'], True)} ms.",
        f"Concurrent errors: direct {conc['direct']['errors']}, gateway {conc['gateway']['errors']}.",
        'Sequential "Added" is the median over runs of (gateway - direct), so it can differ slightly from '
        "the difference of the two medians next to it. Sequential requests/s is 1 / mean latency of one "
        "client. Gateway CPU per request is the gateway process's user+system CPU time during the phase "
        "divided by the requests it served.",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    sections = (header, latency_section, tenancy_section, throughput_section, notes)
    return "\n".join(line for section in sections for line in section(report))


def print_summary(report: dict[str, Any]) -> None:
    seq, stream, conc = report["sequential_nonstream"], report["sequential_stream"], report["concurrent"]
    console.print(
        f"[bold]added latency[/bold] non-stream p50 {ms(seq['added']['p50_ms'], True)} ms, "
        f"p99 {ms(seq['added']['p99_ms'], True)} ms; stream (last byte) p50 {ms(stream['added']['p50_ms'], True)} ms, "
        f"p99 {ms(stream['added']['p99_ms'], True)} ms"
    )
    console.print(
        f"[bold]concurrent C={conc['concurrency']}[/bold] direct {conc['direct']['requests_per_s']:.0f} req/s, "
        f"gateway {conc['gateway']['requests_per_s']:.0f} req/s (x{conc['ratio_requests_per_s']:.2f}); "
        f"p50 {ms(conc['direct']['p50_ms'])} -> {ms(conc['gateway']['p50_ms'])} ms"
    )
