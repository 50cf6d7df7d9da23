"""The routing benchmark's figures (loadtest.routing): what it measures and its target, the statistics (pooled,
per round, a paired bootstrap interval), the Markdown table, the plot and a summary line."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loadtest.metrics import paired_bootstrap, stats
from loadtest.runner import console
from loadtest.services import MODEL

if TYPE_CHECKING:
    from loadtest.routing import Config

TENANT = "routing"
ADAPTER = "helper"
EXPERIMENT = "split"
TARGETS = {"base": MODEL, "plain": "plain", "split": "split"}
"""Target name -> the `model` its requests name."""
TARGET_ADDED_MS = 0.1


def analyse(latencies: dict[str, list[list[float]]], cfg: Config) -> dict[str, Any]:
    pooled = {name: np.array([x for run in runs for x in run]) for name, runs in latencies.items()}
    result: dict[str, Any] = {name: stats(values) for name, values in pooled.items()}
    result["rounds"] = [
        {name: stats(np.array(latencies[name][r])) for name in TARGETS} for r in range(len(latencies["base"]))
    ]
    for label, low, high in (("split_over_plain", "plain", "split"), ("plain_over_base", "base", "plain")):
        per_round = [r[high]["p50_ms"] - r[low]["p50_ms"] for r in result["rounds"]]
        result[label] = {
            "p50_ms": result[high]["p50_ms"] - result[low]["p50_ms"],
            "p95_ms": result[high]["p95_ms"] - result[low]["p95_ms"],
            "p50_ms_per_round": per_round,
            "p50_ms_median_of_rounds": statistics.median(per_round),
            "p50_ms_interval_95": paired_bootstrap(pooled[low], pooled[high], cfg.bootstrap, cfg.seed),
        }
    added = result["split_over_plain"]
    added["target_ms"] = TARGET_ADDED_MS
    added["target_met"] = added["p50_ms"] <= TARGET_ADDED_MS
    added["target_met_with_95_confidence"] = added["p50_ms_interval_95"][1] <= TARGET_ADDED_MS
    return result


def markdown(report: dict[str, Any]) -> str:
    m, cfg, res, load = report["machine"], report["config"], report["results"], report["load_average_before"]
    added, alias, us = res["split_over_plain"], res["plain_over_base"], report["resolve_us"]
    verdict = "**PASS**" if added["target_met"] else "**FAIL**"
    lines = [
        "# Routing through an experiment alias",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), Python {m['python']}; load average before "
        f"{load[0]:.2f}, after {report['load_average_after'][0]:.2f}",
        f"- One gateway (`{' '.join(report['gateway_command'])}`), real Redis, a mock vLLM that answers at once; "
        f"tenant `{TENANT}`: `plain` -> `{ADAPTER}@1`, `split` -> experiment `{EXPERIMENT}` (control "
        f"`{ADAPTER}@1` {100 - cfg['treatment']:g}, treatment `{ADAPTER}@2` {cfg['treatment']:g}).",
        f"- {cfg['rounds']} rounds x {cfg['requests']} sequential non-stream chat requests per target (after "
        f"{cfg['warmup']} warm-up), the three targets in rotating order, a new `user` for each request slot.",
        "",
        "| Target | `model` | p50 ms | p95 ms | p99 ms | mean ms | requests |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in TARGETS.items():
        figures = " | ".join(f"{res[name][k]:.3f}" for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"))
        lines.append(f"| {name} | `{model}` | {figures} | {res[name]['count']} |")
    low, high = added["p50_ms_interval_95"]
    rounds = ", ".join(f"{x:+.3f}" for x in added["p50_ms_per_round"])
    lines += [
        "",
        f"**Added p50, split over plain: {added['p50_ms']:+.3f} ms** (95% paired bootstrap interval "
        f"[{low:+.3f}, {high:+.3f}]; median of rounds {added['p50_ms_median_of_rounds']:+.3f}); target at most "
        f"+{TARGET_ADDED_MS} ms: {verdict}"
        + ("" if added["target_met_with_95_confidence"] == added["target_met"] else " (the interval straddles it)"),
        "",
        f"- Added p50 per round (ms): {rounds}",
        f"- Added p95, split over plain: {added['p95_ms']:+.3f} ms; plain alias over the base by name: p50 "
        f"{alias['p50_ms']:+.3f} ms, p95 {alias['p95_ms']:+.3f} ms",
        f"- Arms that served `split`: {', '.join(f'{k} {v}' for k, v in sorted(report['arms'].items()))}",
        f"- `Router.resolve` in-process, median per call (us): base {us['base']:.1f}, plain {us['plain']:.1f}, "
        f"split {us['split']:.1f} (split - plain {us['split'] - us['plain']:+.1f} us)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], latencies: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    pooled = {name: np.sort(np.array([x for run in runs for x in run])) for name, runs in latencies.items()}
    for name, values in pooled.items():
        a.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{name} (p50 {np.median(values):.3f} ms)")
    a.set_xlim(min(v[0] for v in pooled.values()), max(np.percentile(v, 90) for v in pooled.values()))
    a.axhline(0.5, color="grey", linewidth=0.5)
    a.set(xlabel="latency (ms)", ylabel="fraction of requests", title="Latency CDF per target (to p90)")
    a.legend(fontsize=8)
    res = report["results"]
    for label in ("split_over_plain", "plain_over_base"):
        per_round = res[label]["p50_ms_per_round"]
        b.plot(range(1, len(per_round) + 1), per_round, "o-", label=label.replace("_", " "))
    b.axhline(TARGET_ADDED_MS, color="red", linestyle="--", label="target (split over plain)")
    b.axhline(0, color="grey", linewidth=0.5)
    b.set(xlabel="round", ylabel="added p50 (ms)", title="Added p50 per round")
    b.legend(fontsize=8)
    fig.suptitle(f"loragate experiment routing: {report['machine']['cores']} cores, {report['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    added = report["results"]["split_over_plain"]
    low, high = added["p50_ms_interval_95"]
    verdict = "[green]PASS[/green]" if added["target_met"] else "[red]FAIL[/red]"
    console.print(
        f"[bold]split over plain[/bold] p50 {added['p50_ms']:+.3f} ms [{low:+.3f}, {high:+.3f}] "
        f"(target <= +{TARGET_ADDED_MS} ms): {verdict}; plot in {report['plot']}"
    )
