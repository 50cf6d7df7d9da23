"""The soak benchmark's figures: requests by kind, the memory verdict, the Markdown table and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.metrics import summarise
from loadtest.runner import console

WINDOW_S = 10.0
"""Width of the windows of the timeline (request rate and latency over time)."""
MIB = 2**20
MIN_VERDICT_S = 300.0
"""A shorter run gives no verdict on memory: over a half of under 2.5 minutes, one allocator step of 1 MiB is
a slope of 24 MiB/h (the `--quick` smoke run's 1.5 minutes judge nothing)."""


def summarise_requests(samples: Sequence[tuple[float, str, float, bool]], duration_s: float) -> dict[str, Any]:
    """Requests by kind (answered, failed, latency of the answered ones) and a timeline in windows."""
    by_kind: dict[str, Any] = {}
    for kind in sorted({s[1] for s in samples}):
        mine = [s for s in samples if s[1] == kind]
        ok = [s[2] for s in mine if s[3]]
        by_kind[kind] = {"requests": len(mine), "answered": len(ok), "failed": len(mine) - len(ok), **summarise(ok)}
    windows = []
    for k in range(max(int(duration_s // WINDOW_S), 1)):
        inside = [s for s in samples if k * WINDOW_S <= s[0] < (k + 1) * WINDOW_S and s[3] and s[1] != "feedback"]
        inside = [s for s in inside if s[1] not in ("upload", "delete")]
        stats = summarise([s[2] for s in inside])
        windows.append({"t_s": (k + 0.5) * WINDOW_S, "per_s": len(inside) / WINDOW_S, **stats})
    return {"by_kind": by_kind, "timeline": windows}


def slope_mib_per_h(times_s: Sequence[float], values: Sequence[float]) -> dict[str, float] | None:
    """The least-squares slope of `values` (bytes) over time, in MiB per hour, with its standard error."""
    from scipy.stats import linregress

    if len(times_s) < 3 or len(set(times_s)) < 2:
        return None
    fit = linregress([t / 3600 for t in times_s], [v / MIB for v in values])
    return {"slope": float(fit.slope), "stderr": float(fit.stderr), "intercept_mib": float(fit.intercept)}


def memory_verdict(samples: Sequence[dict[str, Any]], flat_mib_per_h: float) -> dict[str, Any]:
    """Start, end and slope of the gateway's and vLLM's RSS; "flat" when the gateway's slope over the second
    half of the run (after warm-up: caches filled, adapters loaded) is below `flat_mib_per_h`."""
    out: dict[str, Any] = {
        "criterion": f"flat when the least-squares slope of the gateway tree's RSS over the second half of the run "
        f"is below {flat_mib_per_h:g} MiB/h",
        "flat_mib_per_h": flat_mib_per_h,
        "samples": len(samples),
    }
    if not samples:
        return {**out, "flat": None}
    middle = (samples[0]["t_s"] + samples[-1]["t_s"]) / 2
    second = [s for s in samples if s["t_s"] >= middle]
    for part in ("gateway", "vllm"):
        values = [s[part] for s in samples]
        out[part] = {
            "start_mib": values[0] / MIB,
            "end_mib": values[-1] / MIB,
            "max_mib": max(values) / MIB,
            "whole": slope_mib_per_h([s["t_s"] for s in samples], values),
            "second_half": slope_mib_per_h([s["t_s"] for s in second], [s[part] for s in second]),
        }
    half = out["gateway"]["second_half"]
    long_enough = samples[-1]["t_s"] - samples[0]["t_s"] >= MIN_VERDICT_S
    out["flat"] = None if half is None or not long_enough else half["slope"] < flat_mib_per_h
    return out


def _slope(fit: dict[str, float] | None) -> str:
    return "n/a" if fit is None else f"{fit['slope']:+.1f} ± {fit['stderr']:.1f}"


def _memory_rows(mem: dict[str, Any]) -> list[str]:
    rows = []
    for part, label in (("gateway", "gateway + record worker"), ("vllm", "vLLM (its guard, API server, engine core)")):
        m = mem.get(part)
        if m:
            rows.append(
                f"| {label} | {m['start_mib']:.0f} | {m['end_mib']:.0f} | {m['max_mib']:.0f} | "
                f"{_slope(m['whole'])} | {_slope(m['second_half'])} |"
            )
    return rows


def _verdict(mem: dict[str, Any]) -> str:
    if mem.get("flat") is None:
        return f"no verdict (a run of at least {MIN_VERDICT_S / 60:g} minutes gives one)"
    return "**flat**" if mem["flat"] else "**growing**"


def markdown(report: dict[str, Any]) -> str:
    cfg, req, checks, mem = report["config"], report["requests"], report["checks"], report["memory"]
    load = ", ".join(f"{x:.1f}" for x in report["load_average_before"])
    lines = [
        "# Soak: mixed traffic against one gateway and one real vLLM",
        "",
        f"{report['date']}; `{report['command']}`; {report['machine']['cores']} cores "
        f"({report['machine']['cpu_model']}); load average before {load}; other vLLM servers on the machine: "
        f"{report['other_vllm_servers_at_start']} at the start, {report['other_vllm_servers_at_end']} at the end; "
        f"vLLM restarts during the run: {report['vllm_restarts']}.",
        "",
        f"{cfg['minutes']:g} minutes at {cfg['rate']:g} completion requests/s (open loop, at most "
        f"{cfg['max_in_flight']} in flight: {report['skipped']} due requests skipped), {cfg['tenants']} tenants with "
        f"{cfg['adapters_per_tenant']} rank-{cfg['rank']} adapters each (soak-0 with request and token quotas it "
        "never reaches), an alias running a 50/50 experiment, "
        f"max_tokens={cfg['max_tokens']}, {cfg['stream_share']:.0%} streamed, {cfg['completion_share']:.0%} text "
        f"completions, feedback on {cfg['feedback_share']:.0%} of the answers, a new adapter version uploaded "
        f"every {cfg['churn_every_s']:g} s and an older one deleted half a cycle later. OpenAI SDK, no retries.",
        "",
        "| Kind | Requests | Answered | Errors | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, k in req["by_kind"].items():
        lines.append(
            f"| {kind} | {k['requests']} | {k['answered']} | {k['failed']} | {k['p50_ms']:.0f} | {k['p99_ms']:.0f} |"
        )
    lines += _stream_rows(report.get("streams") or {})
    errors = report["errors"]
    lines += ["", "Errors by type: " + (", ".join(f"{n} x {e}" for e, n in errors.items()) if errors else "none.")]
    lines += [
        "",
        "| Check | Expected | Found |",
        "|---|---:|---:|",
        f"| answered completions with a record in Redis | {checks['answered']} | {checks['answered_with_record']} |",
        f"| completion records in the tenants' logs (answered or not) | {checks['completion_requests']} | "
        f"{checks['log_records']} |",
        f"| acknowledged ratings stored in Redis ({_statuses(checks)}) | {checks['feedback_acknowledged']} | "
        f"{checks['feedback_stored']} |",
        "",
        "| RSS, MiB | Start | End | Max | Slope MiB/h, whole run | Slope MiB/h, second half |",
        "|---|---:|---:|---:|---:|---:|",
        *_memory_rows(mem),
        "",
        f"Memory: {_verdict(mem)} ({mem['criterion']}; slopes by least squares over {mem['samples']} samples every "
        f"{cfg['sample_every_s']:g} s, ± one standard error). RSS counts pages shared between processes in each.",
        "",
    ]
    return "\n".join(lines)


def _stream_rows(streams: dict[str, Any]) -> list[str]:
    """Time to first token and inter-token latency of the streamed kinds (loadtest.scenarios.summary)."""
    rows = [(kind, row) for kind, row in streams.items() if "ttft" in row]
    if not rows:
        return []
    lines = ["", "| Stream | TTFT p50 / p95 / p99 ms | inter-token p50 / p95 / p99 ms |", "|---|---:|---:|"]
    for kind, row in rows:
        ttft, gap = row["ttft"], row["inter_token"]
        cells = [f"{d['p50_ms']:.0f} / {d['p95_ms']:.0f} / {d['p99_ms']:.0f}" for d in (ttft, gap)]
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} |")
    return lines


def _statuses(checks: dict[str, Any]) -> str:
    return ", ".join(f"{n} x {s}" for s, n in sorted(checks["feedback_acknowledged_by_status"].items())) or "none"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rss, mem, timeline = report["rss_samples"], report["memory"], report["requests"]["timeline"]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    minutes = [s["t_s"] / 60 for s in rss]
    a.plot(minutes, [s["gateway"] / MIB for s in rss], ".-", label="gateway + record worker")
    fit = (mem.get("gateway") or {}).get("second_half")
    if fit:
        middle = (rss[0]["t_s"] + rss[-1]["t_s"]) / 2
        xs = [middle, rss[-1]["t_s"]]
        ys = [fit["intercept_mib"] + fit["slope"] * x / 3600 for x in xs]
        a.plot([x / 60 for x in xs], ys, "r--", label=f"second-half fit, {fit['slope']:+.1f} MiB/h")
    a.set(ylabel="RSS MiB", title=f"Gateway memory: {_verdict(mem).strip('*')}")
    a.legend(fontsize=8)
    b.plot(minutes, [s["vllm"] / MIB for s in rss], ".-", color="C2")
    b.set(ylabel="RSS MiB", title="vLLM memory")
    t = [w["t_s"] / 60 for w in timeline]
    c.bar(t, [w["per_s"] for w in timeline], width=WINDOW_S / 60 * 0.9, color="lightgrey", label="answered/s")
    c.set(ylabel="completions/s", xlabel="minutes")
    lat = c.twinx()
    lat.plot(t, [w["p50_ms"] / 1000 for w in timeline], "C0.-", label="p50")
    lat.plot(t, [w["p99_ms"] / 1000 for w in timeline], "C3.-", label="p99")
    lat.set(ylabel="latency s")
    lat.legend(fontsize=8, loc="upper right")
    c.set_title(f"Completions answered per second and their latency, {WINDOW_S:g}-s windows")
    fig.suptitle(f"loragate soak: {report['machine']['cores']} cores, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    checks, mem = report["checks"], report["memory"]
    errors = sum(report["errors"].values())
    console.print(
        f"[bold]soak[/bold] {sum(k['requests'] for k in report['requests']['by_kind'].values())} requests, "
        f"{errors} errors; records {checks['answered_with_record']}/{checks['answered']}, "
        f"feedback stored {checks['feedback_stored']}/{checks['feedback_acknowledged']}; "
        f"gateway memory {_verdict(mem).strip('*')}"
    )
