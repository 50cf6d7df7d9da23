"""The adapters benchmark's report (loadtest.adapters): the cold-adapter penalty, mixed-traffic throughput and
memory per adapter as Markdown tables, and a summary line."""

from __future__ import annotations

from typing import Any

from loadtest.adapters_client import histogram_quantile
from loadtest.adapters_run import TARGETS
from loadtest.engine import BASE_MODEL
from loadtest.runner import console


def f1(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def noise_line(mixed: dict[str, Any]) -> str:
    runs = [(name, mixed["runs"][name][mixed["order"][:i].count(name)]) for i, name in enumerate(mixed["order"])]
    if not all("other_vllm_servers" in run for _, run in runs):
        return ""
    each = ", ".join(f"{name} {run['other_vllm_servers']} / {run['load_average_1m_after']:.1f}" for name, run in runs)
    return (
        f"Noise, run by run (other vLLM servers on the machine / 1-minute load average at the end): {each}. "
        "Runs next to busy vLLM servers are slower; compare runs with the same noise.\n"
    )


def traffic_row(label: str, t: dict[str, Any]) -> str:
    each = ", ".join(f"{x:.1f}" for x in t["tokens_per_s_each"])
    return f"| {label} | {t['tokens_per_s']:.1f} | {each} | {t['p50_ms']:.0f} | {t['p99_ms']:.0f} | {t['errors']} |"


def header(report: dict[str, Any]) -> list[str]:
    """The title and the run's facts: when, on what machine, with which command, engine and adapters."""
    cfg, m, mem = report["config"], report["machine"], report["memory"]
    load, load_after = report["load_average_before"], report["load_average_after"]
    return [
        "# Many adapters on one vLLM",
        "",
        f"- Date: {report['date']}; wall time {report['wall_s']:.0f} s (vLLM start-up {report['startup_s']:.0f} s)",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), {m['platform']}, Python {m['python']}; load average "
        f"{load[0]:.2f} before, {load_after[0]:.2f} after; other vLLM servers running on the machine at the "
        f"start: {report['other_vllm_servers_at_start']}, at the end: {report['other_vllm_servers_at_end']}",
        f"- Command: `{report['command']}`",
        f"- Engine: vLLM {report['versions'].get('vllm', '?')} on the CPU, started by `loragate serve` "
        f"(LORAGATE_ENGINE_REPLICAS=1): base `{BASE_MODEL}`, `--max-loras {cfg['max_loras']} "
        f"--max-cpu-loras {cfg['max_cpu_loras']} --max-lora-rank {cfg['rank']}`, KV cache {cfg['kv_cache_gib']} GiB "
        f"(LORAGATE_MAX_LORAS={cfg['max_loras']}, LORAGATE_MAX_CPU_LORAS={cfg['max_cpu_loras']}, so "
        f"{cfg['adapters']} adapters fit in vLLM's adapter cache and in the gateway's residency list)",
        f"- Adapters: synthetic (`adapters.synthetic.make_adapter`), rank {cfg['rank']}, targets "
        f"{', '.join(TARGETS)}, float32, {mem['adapter_file_mb']:.1f} MiB each on disk",
        "- Every prompt starts with a unique nonce, so no request hits vLLM's prefix cache.",
        "",
    ]


def cold_section(report: dict[str, Any]) -> list[str]:
    """The cold-adapter penalty: first against second request, through loragate and straight to vLLM."""
    cold = report["cold"]
    med = cold["median"]
    return [
        "## Cold-adapter penalty (time to first token, streaming, max_tokens=1)",
        "",
        f"{cold['adapters']} fresh adapters; for each, in this order: a base-model request (gateway and "
        "direct), the adapter's first request through loragate (it verifies the adapter's sha256, then "
        "loads it into vLLM), its second request; then the same files straight into vLLM under another name "
        "(`/v1/load_lora_adapter`, then the first and a second request). Medians, ms:",
        "",
        "| Path | Cold (first request) | Warm (second request) | Extra for a cold adapter |",
        "|---|---:|---:|---:|",
        f"| Through loragate | {med['gateway_cold_ms']:.1f} | {med['gateway_warm_ms']:.1f} | "
        f"**{cold['gateway_extra_ms']:+.1f}** |",
        f"| Straight to vLLM (load call + first request) | {med['direct_cold_ms']:.1f} | {med['direct_warm_ms']:.1f} | "
        f"{cold['direct_extra_ms']:+.1f} |",
        f"| Base model, through loragate / direct | {med['base_gateway_ms']:.1f} / {med['base_direct_ms']:.1f} | | |",
        "",
        f"Target: under 100 ms extra. Extra per adapter (ms): "
        f"{', '.join(f'{x:+.0f}' for x in cold['gateway_extra_ms_each'])}; slowest cold TTFT "
        f"{cold['gateway_cold_ms_max']:.0f} ms. Direct `/v1/load_lora_adapter` call alone: median "
        f"{med['direct_load_ms']:.1f} ms. The gateway checks each adapter's sha256 before its first load "
        f"(once per process): {cold['sha256_ms']:.0f} ms for one adapter's weights on this machine.",
        "",
    ]


def load_histogram_table(report: dict[str, Any]) -> list[str]:
    """The gateway's own adapter-load histogram, after the cold phase and at the end, bucket by bucket."""
    hist = report["gateway_metrics"]["load_histogram"]
    lines = [
        "Gateway's adapter-load histogram (`loragate_adapter_load_seconds`, from the decision to load until "
        "vLLM answered: the first load's sha256 check, the wait for the replica's load slot and the load call), "
        "all adapters:",
        "",
        "| Loads | Mean | p50 (bucket bound) | p90 (bucket bound) | "
        + " | ".join(f"≤{float(b['le']) * 1000:g} ms" if b["le"] != "+Inf" else "all" for b in hist["buckets"])
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(hist["buckets"]),
    ]
    for label, h in (("after the cold phase", report["cold"]["load_histogram"]), ("at the end", hist)):
        lines.append(
            f"| {h['count']} ({label}) | {f1(h['mean_ms'])} ms | {f1(histogram_quantile(h, 0.5))} ms | "
            f"{f1(histogram_quantile(h, 0.9))} ms | " + " | ".join(str(b["count"]) for b in h["buckets"]) + " |"
        )
    lines.append("")
    return lines


def mixed_section(report: dict[str, Any]) -> list[str]:
    """Mixed traffic: tokens/s of (a), (b) and (c), their ratios, and what the gateway did meanwhile."""
    cfg, mixed = report["config"], report["mixed"]
    return [
        "## Mixed traffic: output tokens/s",
        "",
        f"{cfg['requests']} requests per run, Zipf-distributed (s={cfg['zipf_s']}, seed {cfg['seed']}) over "
        f"{cfg['adapters']} adapters ({mixed['distinct_adapters']} of them drawn; the most popular gets "
        f"{mixed['top_adapter_share']:.0%} of the requests), {cfg['concurrency']} concurrent clients in a closed "
        f"loop, max_tokens={cfg['max_tokens']}, temperature 0, ignore_eos. Runs in this order: "
        f"{', '.join(mixed['order'])}; each figure is the median over its {cfg['repeats']} runs.",
        "",
        "| Traffic | Tokens/s (median) | Each run | Request p50 ms | Request p99 ms | Errors |",
        "|---|---:|---|---:|---:|---:|",
        traffic_row("(a) mixed, through loragate", mixed["gateway"]),
        traffic_row("(b) mixed, straight to vLLM (runtime loading)", mixed["direct"]),
        traffic_row("(c) one adapter, through loragate", mixed["single"]),
        "",
        "| Ratio | Median of runs | Per round (paired) | Target |",
        "|---|---:|---|---|",
        f"| (a) / (b): loragate vs vLLM direct | {mixed['ratio_gateway_direct']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in mixed['ratio_gateway_direct_each'])} | |",
        f"| (a) / (c): mixed vs single adapter | {mixed['ratio_gateway_single']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in mixed['ratio_gateway_single_each'])} | ≥ 0.90 |",
        "",
        noise_line(mixed),
        mixed_gateway_note(report),
        "",
    ]


def mixed_gateway_note(report: dict[str, Any]) -> str:
    """The gateway's adapter loads and evictions during the mixed runs, and why (a) and (b) pay against (c)."""
    cfg, runs, metrics = report["config"], report["mixed"]["runs"], report["gateway_metrics"]
    return (
        f"Gateway during the mixed runs: adapter loads per run "
        f"{', '.join(str(int(r['gateway_loads'])) for r in runs['gateway'])} (a), evictions per run "
        f"{', '.join(str(int(r['gateway_evictions'])) for r in runs['gateway'])} (a); over the whole "
        f"benchmark {metrics['loads_ok']:.0f} loads, {metrics['evictions']:.0f} "
        f"evictions, {metrics['loads_failed']:.0f} failed loads. The direct client loaded each "
        "adapter once, on its first request (the first (b) run pays for that). With "
        f"`--max-loras {cfg['max_loras']}` vLLM batches requests for at most {cfg['max_loras']} different adapters "
        "per step, which is what (a) and (b) pay against (c). (a) and (b) use different vLLM adapter names for "
        f"the same files, so together they are {cfg['adapters'] * 2} adapters in vLLM's "
        f"{cfg['max_cpu_loras']}-slot CPU cache"
        + (
            "; each run reloads evicted ones from disk inside vLLM, alike for both."
            if cfg["adapters"] * 2 > cfg["max_cpu_loras"]
            else ": all stay loaded."
        )
    )


def memory_section(report: dict[str, Any]) -> list[str]:
    """RSS of the vLLM tree by adapters loaded, and the marginal cost of one more resident adapter."""
    mem = report["memory"]
    lines = [
        "## Memory per resident adapter",
        "",
        "RSS of the vLLM process tree (the API server, the engine core, its worker and helper processes, "
        "summed) with no adapter loaded, then after loading adapters straight into vLLM "
        "(`/v1/load_lora_adapter`, which loads the weights into vLLM's CPU adapter cache at once). "
        f"Adapter file: {mem['adapter_file_mb']:.1f} MiB (float32).",
        "",
        "| Adapters loaded | RSS MiB | Added MiB | Added per adapter, MiB | Per adapter / file size |",
        "|---:|---:|---:|---:|---:|",
    ]
    for point in mem["points"]:
        per = point["mb_per_adapter"]
        lines.append(
            f"| {point['adapters']} | {point['rss'] / 2**20:.0f} | {point['delta_mb']:+.0f} | {f1(per)} | "
            + (f"{per / mem['adapter_file_mb']:.2f}" if per is not None else "")
            + " |"
        )
    slope = mem["mb_per_adapter_slope"]
    if slope is not None:
        first, last = mem["points"][1]["adapters"], mem["points"][-1]["adapters"]
        lines += [
            "",
            f"**Marginal cost: {slope:.1f} MiB per resident adapter** (the slope from {first} to {last} "
            f"adapters), {slope / mem['adapter_file_mb']:.2f} × the file size. The first adapters partly "
            "fit in memory the allocator already holds (freed after start-up), so the added RSS divided "
            "by the count understates the cost at small counts; the slope is the figure to plan with.",
        ]
    lines.append("")
    return lines


def restarts_note(report: dict[str, Any]) -> list[str]:
    """A warning when vLLM restarted during the run, since its figures are then suspect."""
    if not report.get("vllm_restarts"):
        return []
    return [f"**vLLM restarted {report['vllm_restarts']} time(s) during the run**; the figures are suspect.", ""]


def markdown(report: dict[str, Any]) -> str:
    sections = (header, cold_section, load_histogram_table, mixed_section, memory_section, restarts_note)
    return "\n".join(line for section in sections for line in section(report))


def print_summary(report: dict[str, Any]) -> None:
    cold, mixed, mem = report["cold"], report["mixed"], report["memory"]
    console.print(
        f"[bold]cold adapter[/bold] TTFT {cold['median']['gateway_cold_ms']:.0f} ms vs warm "
        f"{cold['median']['gateway_warm_ms']:.0f} ms: extra {cold['gateway_extra_ms']:+.0f} ms "
        "(target < 100)"
    )
    console.print(
        f"[bold]mixed[/bold] (a) {mixed['gateway']['tokens_per_s']:.1f}, "
        f"(b) {mixed['direct']['tokens_per_s']:.1f}, (c) {mixed['single']['tokens_per_s']:.1f} tok/s; "
        f"(a)/(b) {mixed['ratio_gateway_direct']:.2f}, "
        f"(a)/(c) {mixed['ratio_gateway_single']:.2f} (target >= 0.9)"
    )
    per_adapter = mem["mb_per_adapter_slope"] or mem["mb_per_adapter"]
    console.print(
        f"[bold]memory[/bold] {f1(per_adapter)} MiB per resident adapter (file {mem['adapter_file_mb']:.1f} MiB)"
    )
