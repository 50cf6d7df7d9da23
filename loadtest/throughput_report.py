"""The throughput benchmark's report: the target (PASS/FAIL), Markdown tables, a summary line and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.engine import BASE_MODEL
from loadtest.runner import console

SLORA_REFERENCE = 0.95
"""S-LoRA's published throughput from 5 to 2,000 adapters, relative to 5 (a reference, not a target)."""


def verdict(report: dict[str, Any]) -> str:
    return "PASS" if report["base"]["ratio"] >= report["config"]["target_ratio"] else "FAIL"


def header(report: dict[str, Any]) -> list[str]:
    cfg, m = report["config"], report["machine"]
    load, load_after = report["load_average_before"], report["load_average_after"]
    return [
        "# Real-model throughput and adapter count",
        "",
        f"- Date: {report['date']}; wall time {report['wall_s']:.0f} s (vLLM start-up {report['startup_s']:.0f} s)"
        + ("; **a --quick smoke run**" if cfg["quick"] else ""),
        f"- Machine: {m['cores']} cores ({m['cpu_model']}); load average {load[0]:.2f} before, {load_after[0]:.2f} "
        f"after; other vLLM servers on the machine at the start: {report['other_vllm_servers_at_start']}, at the "
        f"end: {report['other_vllm_servers_at_end']}",
        f"- Command: `{report['command']}`",
        f"- Engine: one vLLM {report['versions'].get('vllm', '?')} on the CPU, started by `loragate serve`: base "
        f"`{BASE_MODEL}`, LORAGATE_MAX_LORAS={cfg['max_loras']}, LORAGATE_MAX_CPU_LORAS={cfg['max_cpu_loras']}, "
        f"LORAGATE_MAX_LORA_RANK={cfg['rank']}, KV cache {cfg['kv_cache_gib']} GiB",
        f"- Client: the OpenAI SDK {report['versions'].get('openai', '?')} (`AsyncOpenAI`, streaming, usage in the "
        f"last chunk), {cfg['concurrency']} clients in a closed loop, temperature 0, `ignore_eos` (every request "
        "makes exactly max_tokens, checked from usage), every prompt with a unique prefix (no prefix-cache hits)",
        "",
    ]


def base_section(report: dict[str, Any]) -> list[str]:
    cfg, base = report["config"], report["base"]
    lines = [
        "## (a) Base model: through loragate vs straight to vLLM",
        "",
        f"{cfg['rounds']} round(s) of gateway, direct, direct, gateway; {cfg['requests']} requests per run, "
        f"max_tokens={cfg['max_tokens']}. Tokens/s and requests/s pool every run of a path (all tokens over all "
        "seconds); the latencies are the median of the runs' p50s.",
        "",
        "| Path | Output tokens/s | Each run | Requests/s | TTFT p50 ms | ITL p50 ms | Request p50 ms | Errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for via, label in (("gateway", "Through loragate"), ("direct", "Straight to vLLM")):
        t = base[via]
        each = ", ".join(f"{r['tokens_per_s']:.1f}" for r in base["runs"][via])
        lines.append(
            f"| {label} | {t['tokens_per_s']:.1f} | {each} | {t['requests_per_s']:.2f} | {t['ttft_p50_ms']:.0f} | "
            f"{t['itl_p50_ms']:.1f} | {t['latency_p50_ms']:.0f} | {t['errors']} |"
        )
    paired = ", ".join(f"{x:.3f}" for x in base["ratio_each_round"])
    direct = [r["tokens_per_s"] for r in base["runs"]["direct"]]
    spread = (max(direct) - min(direct)) / base["direct"]["tokens_per_s"]
    lines += [
        "",
        f"**Ratio gateway / direct: {base['ratio']:.4f}** (per round: {paired}); target ≥ {cfg['target_ratio']:.2f}: "
        f"**{verdict(report)}**. Noise: the direct runs alone spread over {min(direct):.1f}-{max(direct):.1f} "
        f"tokens/s ({spread:.0%} of their pooled figure) on this shared machine, so a difference from 1 smaller "
        "than that is within the noise of one run.",
        "",
    ]
    return lines


def residency_line(cfg: dict[str, Any]) -> str:
    return (
        f"vLLM holds at most {cfg['max_cpu_loras']} adapters (`--max-cpu-loras`, also the gateway's residency "
        f"capacity) and batches at most {cfg['max_loras']} different ones per step (`--max-loras`"
        + (
            f", at least the {cfg['concurrency']} clients, so every request in flight fits)."
            if cfg["max_loras"] >= cfg["concurrency"]
            else f", fewer than the {cfg['concurrency']} clients: requests for other adapters wait a step)."
        )
        + f" Counts up to {cfg['max_cpu_loras']} stay "
        "resident after the warm-up; above it the rest load on demand: the gateway evicts the least recently used "
        "adapter and loads the requested one, and in a round-robin rotation over more adapters than fit every "
        "request finds its adapter evicted (the worst case for an LRU cache)."
    )


def counts_section(report: dict[str, Any]) -> list[str]:
    cfg, counts = report["config"], report["counts"]
    adapter = report["adapter"]
    lines = [
        "## (b) Mixed adapters on one vLLM, by adapter count (through loragate)",
        "",
        f"Round-robin rotation: request i goes to adapter i mod N; {cfg['mixed_requests']} requests per run, "
        f"max_tokens={cfg['mixed_max_tokens']}; before each run every adapter of the point gets one max_tokens=1 "
        "request with a two-word prompt (not measured). Synthetic adapters: rank "
        f"{cfg['rank']}, {', '.join(adapter['targets'])}, float32, {adapter['file_kib']:.0f} KiB each. "
        f"{cfg['repeats']} pass(es) in this order: "
        f"{', '.join(map(str, counts['order']))}. " + residency_line(cfg),
        "",
        "| Adapters | Resident / on demand | Output tokens/s | Each run | Ratio to "
        f"{cfg['adapter_counts'][0]} | Loads per run | Evictions per run | Request p50 ms | Errors |",
        "|---:|---|---:|---|---:|---|---|---:|---:|",
    ]
    for p in counts["points"]:
        each = ", ".join(f"{x:.1f}" for x in p["tokens_per_s_each"])
        loads = ", ".join(f"{x:.0f}" for x in p["loads_per_run"])
        evictions = ", ".join(f"{x:.0f}" for x in p["evictions_per_run"])
        lines.append(
            f"| {p['adapters']} | {p['resident']} / {p['on_demand']} | {p['tokens_per_s']:.1f} | {each} | "
            f"**{p['ratio_to_first']:.2f}** | {loads} | {evictions} | {p['latency_p50_ms']:.0f} | {p['errors']} |"
        )
    lines += [
        "",
        f"For reference only (another system, GPU, other sizes): S-LoRA's published throughput stays at about "
        f"{SLORA_REFERENCE:.2f}x from 5 to 2,000 adapters.",
        "",
    ]
    if report.get("vllm_restarts"):
        lines += [f"**vLLM restarted {report['vllm_restarts']} time(s) during the run**; the figures are suspect.", ""]
    return lines


def markdown(report: dict[str, Any]) -> str:
    return "\n".join(header(report) + base_section(report) + counts_section(report))


def print_summary(report: dict[str, Any]) -> None:
    base, points = report["base"], report["counts"]["points"]
    console.print(
        f"[bold](a)[/bold] gateway {base['gateway']['tokens_per_s']:.1f} vs direct {base['direct']['tokens_per_s']:.1f}"
        f" tok/s: ratio {base['ratio']:.4f} (target >= {report['config']['target_ratio']}): {verdict(report)}"
    )
    each = ", ".join(f"{p['adapters']}: {p['tokens_per_s']:.1f} ({p['ratio_to_first']:.2f}x)" for p in points)
    console.print(f"[bold](b)[/bold] tokens/s by adapter count: {each}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, points = report["base"], report["counts"]["points"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    paths = ["gateway", "direct"]
    left.bar([0, 1], [base[p]["tokens_per_s"] for p in paths], color=["tab:blue", "tab:gray"], width=0.6)
    for i, p in enumerate(paths):
        runs = [r["tokens_per_s"] for r in base["runs"][p]]
        left.plot([i] * len(runs), runs, "k.", label="each run" if i == 0 else None)
    left.set_xticks([0, 1], ["through loragate", "straight to vLLM"])
    left.set_ylabel("output tokens/s")
    left.set_title(f"(a) base model: ratio {base['ratio']:.4f} ({verdict(report)})")
    left.legend(loc="lower right")
    xs = [p["adapters"] for p in points]
    right.plot(xs, [p["tokens_per_s"] for p in points], "o-", color="tab:blue", label="through loragate")
    for p in points:
        right.annotate(
            f"{p['ratio_to_first']:.2f}x",
            (p["adapters"], p["tokens_per_s"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
        )
    right.axhline(
        points[0]["tokens_per_s"] * SLORA_REFERENCE,
        color="tab:gray",
        ls="--",
        label=f"{SLORA_REFERENCE}x the first point (S-LoRA, reference)",
    )
    right.axvline(report["config"]["max_cpu_loras"], color="tab:red", ls=":", label="--max-cpu-loras")
    right.set_xscale("log", base=2)
    right.set_xticks(xs, [str(x) for x in xs])
    right.set_ylim(0, max(p["tokens_per_s"] for p in points) * 1.15)
    right.set_xlabel("adapters in rotation")
    right.set_ylabel("output tokens/s")
    right.set_title("(b) mixed adapters, round-robin")
    right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
