"""The comparison's report: its targets (PASS/FAIL), a Markdown table, a summary line and a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loadtest.runner import console

LABELS = {
    "direct": "direct (mock upstream)",
    "passthrough": "bare pass-through",
    "core": "loragate, everything off",
    "full": "loragate, everything on",
    "litellm": "LiteLLM proxy",
}
MAX_ADDED_P50_OVER_PASSTHROUGH = 1.5
MAX_P99_AT_RATE_MS = 5.0
MIN_SATURATION_OVER_LITELLM = 25.0


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target at each worker count, measured with everything on."""
    rate = report["config"]["rate"]
    out = []
    for group in report["groups"]:
        t, workers = group["targets"], group["workers"]
        full, floor = t["full"], t["passthrough"]
        ratio = full["added_p50_ms"] / floor["added_p50_ms"] if floor["added_p50_ms"] > 0 else math.inf
        out.append(
            {
                "target": f"added p50 at most {MAX_ADDED_P50_OVER_PASSTHROUGH:g}x the bare pass-through's",
                "workers": workers,
                "measured": f"{ratio:.2f}x ({full['added_p50_ms']:+.2f} vs {floor['added_p50_ms']:+.2f} ms)",
                "pass": ratio <= MAX_ADDED_P50_OVER_PASSTHROUGH,
            }
        )
        p99 = full["open_loop"]["p99_ms"]
        lost = full["open_loop"]["errors"] + full["open_loop"]["dropped"]
        out.append(
            {
                "target": f"p99 at most {MAX_P99_AT_RATE_MS:g} ms at {rate:g} requests/s",
                "workers": workers,
                "measured": f"{p99:.2f} ms" + (f", {lost} failed or dropped" if lost else ""),
                "pass": p99 <= MAX_P99_AT_RATE_MS and not lost,
            }
        )
        mine, theirs = full["saturation"]["requests_per_s"], t["litellm"]["saturation"]["requests_per_s"]
        times = mine / theirs if theirs else math.inf
        out.append(
            {
                "target": f"saturation at least {MIN_SATURATION_OVER_LITELLM:g}x LiteLLM's",
                "workers": workers,
                "measured": f"{times:.1f}x ({mine:,.0f} vs {theirs:,.0f} requests/s)",
                "pass": times >= MIN_SATURATION_OVER_LITELLM,
            }
        )
    return out


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(report: dict[str, Any]) -> list[str]:
    """The results table (also what the README's Benchmarks section shows)."""
    rate = report["config"]["rate"]
    lines = [
        f"| workers | target | added p50 | added p99 | p99 at {rate:g} req/s | saturation req/s | CPU per request |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for group in report["groups"]:
        for name, t in group["targets"].items():
            added = "(baseline)" if name == "direct" else f"{t['added_p50_ms']:+.2f} ms"
            added99 = "" if name == "direct" else f"{t['added_p99_ms']:+.2f} ms"
            fixed = t["open_loop"]
            lost = fixed["errors"] + fixed["dropped"]
            p99 = _num(fixed["p99_ms"], ".2f") + " ms" + (f" ({lost} lost)" if lost else "")
            sat = t["saturation"]
            cpu = _num(sat["cpu_ms_per_request"], ".2f") + " ms"
            lines.append(
                f"| {group['workers']} | {LABELS[name]} | {added} | {added99} | {p99} "
                f"| {_num(sat['requests_per_s'], ',.0f')} | {cpu} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    cfg, m, load = report["config"], report["machine"], report["load_average_before"]
    v = report["versions"]
    quick = "**QUICK RUN** (short phases: a smoke test, not a measurement). " if cfg["quick"] else ""
    lines = [
        "# loragate vs LiteLLM's proxy and a bare pass-through",
        "",
        f"- Date: {report['date']}. {quick}Command: `{report['command']}`",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), {m['platform']}, Python {m['python']}; "
        f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- Versions: loragate {v.get('loragate', '?')}, LiteLLM {v.get('litellm', '?')}, "
        f"uvicorn {v.get('uvicorn', '?')}, starlette {v.get('starlette', '?')}, aiohttp {v.get('aiohttp', '?')}",
        "- Upstream: `loadtest/mock_upstream.py` (answers at once). Client, targets, mock and Redis share the "
        "machine; the client is one process: aiohttp (sequential, open loop), `loadtest/wire.py` (saturation).",
        f"- Sequential: {cfg['rounds']} rounds (after {cfg['warmup']}), one request to each target per round in "
        f"{'a new random' if 'seed' in cfg else 'rotating'} order; open loop: {cfg['rate']:g} requests/s for "
        f"{cfg['open_s']:g} s per target, latency "
        f"from when each request was due; saturation: {cfg['concurrency']} clients for {cfg['saturation_s']:g} s "
        f"per target; both loops in {cfg.get('phase_rounds', 1)} turn(s) over the targets (LiteLLM last), "
        "pooled; CPU per request: the target's process tree (workers, record process) during saturation.",
        "",
        "## Targets (everything on)",
        "",
        "| target | workers | measured | verdict |",
        "|---|---:|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['workers']} | {t['measured']} | {'PASS' if t['pass'] else 'FAIL'} |"
        for t in report["targets"]
    ]
    lines += ["", "## Results", "", *table(report), ""]
    for group in report["groups"]:
        fm = group["checks"]["full_metrics"]
        arms = ", ".join(f"{arm} {n:,.0f}" for arm, n in fm["requests_by_arm"].items())
        lines.append(
            f"- {group['workers']} worker(s), everything on, by its `/metrics`: requests by arm "
            f"{arms}; completion records written {fm['records_written']:,.0f}; quota refusals "
            f"{fm['quota_refusals']:,.0f}."
        )
    lines += [
        "",
        "\"Added\" is the target's sequential latency minus direct's, at p50 and at p99. Only ratios within one "
        "run compare: the absolute figures move with the machine's load.",
        "",
    ]
    return "\n".join(lines)


def print_group(group: dict[str, Any]) -> None:
    for name, t in group["targets"].items():
        console.print(
            f"  w={group['workers']} {name:<12} added p50 {t['added_p50_ms']:+7.2f} ms  "
            f"p99@rate {t['open_loop']['p99_ms']:8.2f} ms  sat {t['saturation']['requests_per_s']:7.0f} req/s  "
            f"cpu {_num(t['saturation']['cpu_ms_per_request'], '.2f')} ms/req"
        )


def print_summary(report: dict[str, Any]) -> None:
    for t in report["targets"]:
        verdict = "[green]PASS[/green]" if t["pass"] else "[red]FAIL[/red]"
        console.print(f"{verdict} {t['target']} (workers {t['workers']}): {t['measured']}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LABELS if n != "direct"]
    groups = report["groups"]
    panels = [
        ("added p50, sequential (ms)", lambda t: t["added_p50_ms"], True),
        (f"p99 at {report['config']['rate']:g} requests/s (ms)", lambda t: t["open_loop"]["p99_ms"], True),
        ("saturation (requests/s)", lambda t: t["saturation"]["requests_per_s"] or 0.0, False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / max(len(groups), 1)
    for ax, (title, value, log) in zip(axes, panels, strict=True):
        for i, group in enumerate(groups):
            xs = [k + (i - (len(groups) - 1) / 2) * width for k in range(len(names))]
            ys = [max(value(group["targets"][n]), 1e-3) for n in names]
            bars = ax.bar(xs, ys, width, label=f"{group['workers']} worker(s)")
            ax.bar_label(bars, labels=[f"{y:.2f}" if y < 10 else f"{y:,.0f}" for y in ys], fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks(range(len(names)), [LABELS[n].replace(", ", ",\n") for n in names], fontsize=8)
    axes[1].axhline(MAX_P99_AT_RATE_MS, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=8)
    quick = " (quick run)" if report["config"]["quick"] else ""
    fig.suptitle(f"Gateways in front of one fast mock upstream, {report['date']}{quick}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
