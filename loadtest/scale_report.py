"""The scale benchmark's report: flatness by registry size (PASS/FAIL), saturation by processes, the tables,
a summary line and the curves."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.metrics import paired_bootstrap, stats
from loadtest.runner import console

SHARE, FIXED = "scale-000", "scale-001"
"""The measured tenants: its even share of the versions, and always one version."""
ENDPOINTS = {"chat": "chat completion (bare adapter name)", "models": "GET /v1/models"}
TARGET_FLAT_MS = 0.05
"""p50 at the largest registry minus p50 at the smallest, at most."""


def target_name(endpoint: str, tenant: str, size: int) -> str:
    return f"{endpoint} {tenant} {size}"


def _pooled(runs: list[list[float]]) -> np.ndarray:
    return np.array([x for run in runs for x in run])


def flatness(small: list[list[float]], large: list[list[float]], resamples: int, seed: int) -> dict[str, Any]:
    """p50(large) - p50(small): pooled, per round, and a paired bootstrap interval (request slots side by side)."""
    a, b = _pooled(small), _pooled(large)
    per_round = [float(np.median(y) - np.median(x)) for x, y in zip(small, large, strict=True)]
    delta = float(np.median(b) - np.median(a))
    interval = paired_bootstrap(a, b, resamples, seed)
    return {
        "p50_delta_ms": delta,
        "p50_delta_interval_95": interval,
        "p50_delta_per_round": per_round,
        "p50_delta_median_of_rounds": statistics.median(per_round),
        "target_ms": TARGET_FLAT_MS,
        "pass": delta <= TARGET_FLAT_MS,
        "pass_with_95_confidence": interval[1] <= TARGET_FLAT_MS,
    }


def analyse_versions(
    latencies: dict[str, list[list[float]]], sizes: tuple[int, ...], resamples: int, seed: int
) -> dict:
    """Per endpoint and tenant: latency statistics at each size and the flatness from smallest to largest."""
    out: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        for tenant in (SHARE, FIXED):
            runs = {size: latencies[target_name(endpoint, tenant, size)] for size in sizes}
            curve = {
                str(size): {**stats(_pooled(r)), "p50_ms_per_round": [float(np.median(x)) for x in r]}
                for size, r in runs.items()
            }
            flat = flatness(runs[min(sizes)], runs[max(sizes)], resamples, seed)
            out.setdefault(endpoint, {})[tenant] = {"sizes": curve, "flat": flat}
    return out


def analyse_processes(runs: dict[str, list[dict[str, Any]]], seen: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Medians over the repeats per target, and each gateway's scaling over the first (fewest processes)."""
    out: dict[str, Any] = {}
    for name, summaries in runs.items():
        keys = ("requests_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")
        out[name] = {key: statistics.median(s[key] for s in summaries) for key in keys}
        out[name]["runs"] = [{key: s[key] for key in keys} for s in summaries]
        if name in seen:
            out[name]["processes"] = int(name[1:])
            out[name]["metrics"] = seen[name]
    first = next(name for name in runs if name in seen)
    for name in seen:
        out[name]["scaling"] = out[name]["requests_per_s"] / out[first]["requests_per_s"]
    return out


# -- Markdown ---------------------------------------------------------------------------------------


def _verdict(flat: dict[str, Any]) -> str:
    verdict = "**PASS**" if flat["pass"] else "**FAIL**"
    if flat["pass"] != flat["pass_with_95_confidence"]:
        verdict += " (the interval straddles the target)"
    return verdict


def _version_tables(report: dict[str, Any]) -> list[str]:
    res, sizes = report["results"], report["config"]["sizes"]
    lines = [
        "| endpoint | tenant | versions in the store | the tenant's versions | its /v1/models cards | p50 ms | p95 ms "
        "| p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for endpoint, label in ENDPOINTS.items():
        for tenant, curve in res["versions"][endpoint].items():
            for size in sizes:
                s = curve["sizes"][str(size)]
                cards = res["cards"][target_name("models", tenant, size)]
                held = res["held"][tenant][str(size)]
                figures = f"{s['p50_ms']:.3f} | {s['p95_ms']:.3f} | {s['p99_ms']:.3f}"
                lines.append(f"| {label} | `{tenant}` | {size:,} | {held:,} | {cards} | {figures} |")
    lines += [
        "",
        f"| endpoint | tenant | p50 at {max(sizes):,} minus at {min(sizes):,} | 95% paired bootstrap | median of "
        f"rounds | target | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for endpoint, label in ENDPOINTS.items():
        for tenant, curve in res["versions"][endpoint].items():
            f = curve["flat"]
            low, high = f["p50_delta_interval_95"]
            lines.append(
                f"| {label} | `{tenant}` | {f['p50_delta_ms']:+.3f} ms | [{low:+.3f}, {high:+.3f}] | "
                f"{f['p50_delta_median_of_rounds']:+.3f} ms | +{TARGET_FLAT_MS} ms | {_verdict(f)} |"
            )
    return lines


def _process_table(report: dict[str, Any]) -> list[str]:
    proc = report["results"]["processes"]
    lines = [
        "| gateway processes | requests/s | x the first | p50 ms | p99 ms | CPU ms per request | records written "
        "| quota refusals |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in proc.items():
        label = "(mock alone: the client's ceiling)" if name == "direct" else str(p["processes"])
        scaling = f"{p['scaling']:.2f}x" if "scaling" in p else ""
        m = p.get("metrics", {})
        tail = f"{m['records_written']:,.0f} | {m['quota_refusals']:,.0f}" if m else " | "
        lines.append(
            f"| {label} | {p['requests_per_s']:,.0f} | {scaling} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | "
            f"{p['cpu_ms_per_request']:.3f} | {tail} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    m, cfg, load = report["machine"], report["config"], report["load_average_before"]
    regs = ", ".join(f"{int(k):,} in {v:.1f} s" for k, v in report["results"]["register_s"].items())
    oversubscribed = [n for n in cfg["workers"] if n > m["cores"]]
    lines = [
        "# Scale curves: registry size and gateway processes",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), Python {m['python']}; load average before "
        f"{load[0]:.2f}, after {report['load_average_after'][0]:.2f}; wall time {report['wall_s']:.0f} s",
        f"- Versions spread across {cfg['tenants']} tenants, {cfg['per_name']} per adapter name, registered with "
        f"`AdapterStore.add` ({cfg['jobs']} processes): {regs}. One gateway and one mock vLLM per size, one Redis.",
        f"- Sequential: {cfg['rounds']} rounds x {cfg['requests']} requests per target (after {cfg['warmup']} "
        "warm-up), every size, tenant and endpoint in a new random order for each request slot.",
        "",
        "## Routing and /v1/models by registry size",
        "",
        *_version_tables(report),
        "",
        "## Saturation by gateway processes",
        "",
        f"Closed loop, {cfg['concurrency']} clients for {cfg['saturation_s']:g} s, {cfg['repeats']} repeats in "
        "alternating order (medians); a tenant with request and token quotas that never refuse, calling the base "
        "through an alias; recording on (a record process per worker). CPU per request: the gateway's process "
        "tree (workers and record processes).",
        "",
        *_process_table(report),
        "",
    ]
    if oversubscribed:
        lines += [
            f"**{', '.join(map(str, oversubscribed))} processes oversubscribe this machine's {m['cores']} cores**, "
            "which the client, the mock and Redis share with the gateway as well: the scaling measured here is a "
            "floor, not what more cores would give.",
            "",
        ]
    return "\n".join(lines)


# -- summary and plot -------------------------------------------------------------------------------


def print_summary(report: dict[str, Any]) -> None:
    res = report["results"]
    for endpoint, by_tenant in res["versions"].items():
        for tenant, curve in by_tenant.items():
            f = curve["flat"]
            verdict = "[green]PASS[/green]" if f["pass"] else "[red]FAIL[/red]"
            console.print(f"{endpoint} {tenant}: p50 delta {f['p50_delta_ms']:+.3f} ms: {verdict}")
    proc = ", ".join(
        f"{p['processes']}: {p['requests_per_s']:,.0f}/s ({p['scaling']:.2f}x)"
        for p in res["processes"].values()
        if "scaling" in p
    )
    console.print(f"saturation by processes: {proc}; plot in {report['plot']}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, sizes = report["results"], report["config"]["sizes"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (endpoint, label) in zip(axes[:2], ENDPOINTS.items(), strict=True):
        for tenant, curve in res["versions"][endpoint].items():
            p50 = [curve["sizes"][str(s)]["p50_ms"] for s in sizes]
            p95 = [curve["sizes"][str(s)]["p95_ms"] for s in sizes]
            line = ax.plot(sizes, p50, "o-", label=f"{tenant} p50")[0]
            ax.plot(sizes, p95, "x--", color=line.get_color(), alpha=0.6, label=f"{tenant} p95")
        ax.set_xscale("log")
        ax.set(xlabel="adapter versions in the store", ylabel="latency (ms)", title=label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    gateways = [p for p in res["processes"].values() if "scaling" in p]
    counts = [p["processes"] for p in gateways]
    rps = [p["requests_per_s"] for p in gateways]
    ax = axes[2]
    ax.plot(counts, rps, "o-", label="requests/s")
    ax.plot(counts, [rps[0] * n / counts[0] for n in counts], ":", color="grey", label="linear from the first")
    ax.axvline(report["machine"]["cores"], color="red", linewidth=0.6, label="cores")
    ax.set(xlabel="gateway processes (LORAGATE_WORKERS)", ylabel="requests/s", title="Saturation")
    ax.set_xticks(counts)
    twin = ax.twinx()
    twin.plot(counts, [p["p99_ms"] for p in gateways], "s--", color="tab:orange", label="p99 ms")
    twin.set_ylabel("p99 (ms)")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"loragate scale curves: {report['machine']['cores']} cores, {report['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
