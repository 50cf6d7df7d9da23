"""What serving many adapters costs: loragate in front of one real vLLM, with runtime LoRA loading.

One run starts a throw-away redis-server and `loragate serve` (which starts and supervises one vLLM
server on the CPU), writes deterministic rank-16 adapters (all seven projections) into the adapter
store, creates an API key, then measures:

1. memory per resident adapter: RSS of the vLLM process tree with no adapter loaded, then after
   loading 8, 16 and 32 adapters straight into vLLM (`/v1/load_lora_adapter`);
2. the cold-adapter penalty: time to first token (stream, max_tokens=1) of the first request for a
   fresh adapter through the gateway (it verifies and loads the adapter) against the second
   (warm) request; the same straight to vLLM (load + first request, then a warm one) and the base
   model's TTFT for reference; plus the gateway's own adapter-load histogram from /metrics;
3. mixed traffic: a fixed, seeded, Zipf-distributed sequence of requests over 32 adapters from 16
   concurrent clients, max_tokens=32, temperature 0, ignore_eos (so every request makes exactly
   max_tokens): output tokens/s (a) through loragate, (b) straight to the same vLLM, loading each
   adapter on first use under its own names, (c) through loragate, all to one adapter. The three
   run interleaved, repeated (a, b, c, then c, b, a, ...), and the medians are reported.

Results go to loadtest/results/adapters.json and adapters.md. Every process it starts (redis,
the gateway, the vLLM it starts) is stopped again, on success, failure, Ctrl-C or SIGTERM.

    .venv/bin/python -m loadtest.adapters            # the defaults, about 6-8 minutes on 2 cores
    .venv/bin/python -m loadtest.adapters --smoke    # a tiny run, to check it works
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.engine import (
    BASE_MODEL,
    DEFAULT_MODEL_CACHE,
    METRICS_KEY,
    EngineOptions,
    EngineStack,
    engine_versions,
    gateway_counters,
    messages,
    nonce,
    start_engine,
    vllm_restarts,
    vllm_servers,
    write_adapters,
)
from loadtest.metrics import Samples, metric_sum, parse_prometheus, summarise, tree_rss
from loadtest.reports import publish, report_header, versions
from loadtest.runner import add_common_arguments, console, event_loop_factory, run_and_clean_up
from loadtest.services import BenchError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class Config(EngineOptions):
    cold: int = 8
    adapters: int = 32
    requests: int = 96
    concurrency: int = 16
    max_tokens: int = 32
    repeats: int = 2
    zipf_s: float = 1.1
    seed: int = 0
    memory_steps: list[int] = field(default_factory=lambda: [8, 16, 32])


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


@dataclass
class AdapterSet:
    cold: list[str]
    """Store names for the cold-start measurement (never loaded before it)."""
    mixed: list[str]
    paths: dict[str, str]
    """Store name -> the version folder vLLM loads (the same files for gateway and direct)."""
    file_bytes: int
    """Size of one adapter's adapter_model.safetensors."""
    seconds: float


def make_adapters(stack: EngineStack, cfg: Config) -> AdapterSet:
    names = {"cold": [f"cold-{i:02d}" for i in range(cfg.cold)], "mixed": [f"mix-{i:02d}" for i in range(cfg.adapters)]}
    written = write_adapters(stack, names["cold"] + names["mixed"], cfg.rank, TARGETS)
    return AdapterSet(names["cold"], names["mixed"], written.paths, written.file_bytes, written.seconds)


def zipf_sequence(count: int, adapters: int, s: float, seed: int) -> list[int]:
    weights = [1 / (k**s) for k in range(1, adapters + 1)]
    return random.Random(seed).choices(range(adapters), weights=weights, k=count)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class Client:
    """Requests to the gateway and straight to its vLLM, with one keep-alive aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, stack: EngineStack, adapters: AdapterSet) -> None:
        self.session = session
        self.gateway = f"http://127.0.0.1:{stack.gateway_port}"
        self.engine = f"http://127.0.0.1:{stack.engine_port}"
        self.gateway_headers = {"Authorization": f"Bearer {stack.api_key}"}
        self.adapters = adapters
        self.direct_loaded: set[str] = set()
        self.direct_locks: dict[str, asyncio.Lock] = {}
        self.direct_load_s: dict[str, float] = {}

    def target(self, via: str) -> tuple[str, dict[str, str]]:
        if via == "gateway":
            return self.gateway + "/v1/chat/completions", self.gateway_headers
        return self.engine + "/v1/chat/completions", {}

    async def load_direct(self, vllm_name: str, store_name: str) -> float:
        """Load an adapter straight into vLLM once (per-name lock); the time it took, 0 if loaded."""
        if vllm_name in self.direct_loaded:
            return 0.0
        lock = self.direct_locks.setdefault(vllm_name, asyncio.Lock())
        async with lock:
            if vllm_name in self.direct_loaded:
                return 0.0
            started = time.perf_counter()
            payload = {"lora_name": vllm_name, "lora_path": self.adapters.paths[store_name]}
            async with self.session.post(self.engine + "/v1/load_lora_adapter", json=payload) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise BenchError(f"vLLM could not load {vllm_name}: HTTP {resp.status} {text[:300]}")
            seconds = time.perf_counter() - started
            self.direct_loaded.add(vllm_name)
            self.direct_load_s[vllm_name] = seconds
            return seconds

    async def ttft(self, via: str, model: str, index: int) -> dict[str, float]:
        """One streamed request, max_tokens=1: seconds to the first token and to the end."""
        url, headers = self.target(via)
        body = {"model": model, "messages": messages(nonce(), index), "max_tokens": 1, "temperature": 0, "stream": True}
        started = time.perf_counter()
        first = None
        async with self.session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                raise BenchError(f"{via} {model}: HTTP {resp.status} {(await resp.text())[:300]}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                if first is None:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BenchError(f"{via} {model}: stream error {chunk['error']}")
                    choice = (chunk.get("choices") or [{}])[0]
                    if (choice.get("delta") or {}).get("content") or choice.get("text"):
                        first = time.perf_counter()
        end = time.perf_counter()
        return {"ttft_s": (first or end) - started, "total_s": end - started}

    async def complete(self, via: str, model: str, body: dict[str, Any]) -> tuple[int, float]:
        """One non-stream request: (completion tokens, seconds)."""
        url, headers = self.target(via)
        started = time.perf_counter()
        async with self.session.post(url, json={**body, "model": model}, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise BenchError(f"{via} {model}: HTTP {resp.status} {raw[:300]!r}")
        seconds = time.perf_counter() - started
        return int(json.loads(raw)["usage"]["completion_tokens"]), seconds

    async def metrics(self) -> Samples:
        headers = {"Authorization": f"Bearer {METRICS_KEY}"}
        async with self.session.get(self.gateway + "/metrics", headers=headers) as resp:
            return parse_prometheus(await resp.text())


def load_histogram(samples: Samples) -> dict[str, Any]:
    """loragate_adapter_load_seconds summed over adapters: cumulative bucket counts, count, sum."""
    buckets: dict[str, float] = {}
    for labels, value in samples.get("loragate_adapter_load_seconds_bucket", []):
        buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + value
    ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))
    count = metric_sum(samples, "loragate_adapter_load_seconds_count")
    total = metric_sum(samples, "loragate_adapter_load_seconds_sum")
    return {
        "buckets": [{"le": le, "count": int(n)} for le, n in ordered],
        "count": int(count),
        "sum_s": total,
        "mean_ms": total / count * 1000 if count else None,
    }


def histogram_quantile(hist: dict[str, Any], q: float) -> float | None:
    """Upper bound (le, in ms) of the bucket the q-quantile falls in: what the histogram can say."""
    if not hist["count"]:
        return None
    for bucket in hist["buckets"]:
        if bucket["count"] >= q * hist["count"]:
            return float(bucket["le"]) * 1000
    return None


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def warm_up(client: Client) -> None:
    """A few base-model requests, so the first measured one pays no first-request costs."""
    for i in range(3):
        await client.ttft("direct", BASE_MODEL, i)
        await client.ttft("gateway", BASE_MODEL, i)


async def measure_memory(
    client: Client, stack: EngineStack, cfg: Config, adapters: AdapterSet, progress: Progress
) -> dict[str, Any]:
    """RSS of the vLLM tree with 0 adapters, then after loading up to each step (straight into vLLM)."""
    root = stack.engine_root()

    async def sample() -> dict[str, Any]:
        # Settle, then the median of three readings half a second apart.
        await asyncio.sleep(1.0)
        readings = []
        for _ in range(3):
            readings.append(tree_rss(root))
            await asyncio.sleep(0.5)
        readings.sort(key=lambda r: r["rss"])
        return readings[1]

    steps = sorted(set(cfg.memory_steps))
    task = progress.add_task("memory: adapters loaded", total=steps[-1])
    points = [{"adapters": 0, **(await sample())}]
    loaded = 0
    for step in steps:
        while loaded < step:
            store_name = adapters.mixed[loaded]
            await client.load_direct(f"bench-mem-{loaded:02d}", store_name)
            loaded += 1
            progress.advance(task)
        points.append({"adapters": step, **(await sample())})
    base = points[0]["rss"]
    for point in points:
        point["delta_mb"] = (point["rss"] - base) / 2**20
        point["mb_per_adapter"] = point["delta_mb"] / point["adapters"] if point["adapters"] else None
    # The slope between the first and last loaded step, which leaves out one-time allocations.
    slope = None
    if len(points) >= 3:
        slope = (points[-1]["rss"] - points[1]["rss"]) / 2**20 / (points[-1]["adapters"] - points[1]["adapters"])
    return {
        "points": points,
        "adapter_file_mb": adapters.file_bytes / 2**20,
        "mb_per_adapter": points[-1]["mb_per_adapter"],
        "mb_per_adapter_slope": slope,
        "root_pid": root.pid,
        "load_ms": [client.direct_load_s[f"bench-mem-{i:02d}"] * 1000 for i in range(loaded)],
    }


def time_sha256(path: Path) -> float:
    """What the gateway's integrity check of one adapter costs here: median of 3 sha256 runs, in ms."""
    from adapters.store import sha256_file

    times = []
    for _ in range(3):
        started = time.perf_counter()
        sha256_file(path)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def measure_cold(client: Client, cfg: Config, adapters: AdapterSet, progress: Progress) -> dict[str, Any]:
    """For each fresh adapter: base TTFT, gateway cold and warm, direct (load + first) and warm."""
    task = progress.add_task("cold adapters", total=len(adapters.cold))
    rows = []
    metrics_before = await client.metrics()
    for i, name in enumerate(adapters.cold):
        row: dict[str, Any] = {"adapter": name}
        row["base_gateway"] = (await client.ttft("gateway", BASE_MODEL, i))["ttft_s"]
        row["base_direct"] = (await client.ttft("direct", BASE_MODEL, i))["ttft_s"]
        row["gateway_cold"] = (await client.ttft("gateway", name, i))["ttft_s"]
        row["gateway_warm"] = (await client.ttft("gateway", name, i + 1))["ttft_s"]
        direct_name = f"bench-cold-{i:02d}"
        load_s = await client.load_direct(direct_name, name)
        first = (await client.ttft("direct", direct_name, i))["ttft_s"]
        row["direct_load"] = load_s
        row["direct_cold"] = load_s + first
        row["direct_warm"] = (await client.ttft("direct", direct_name, i + 1))["ttft_s"]
        rows.append(row)
        progress.advance(task)
    metrics_after = await client.metrics()
    weights = Path(adapters.paths[adapters.cold[0]]) / "adapter_model.safetensors"
    sha256_ms = await asyncio.to_thread(time_sha256, weights)
    keys = ("base_gateway", "base_direct", "gateway_cold", "gateway_warm", "direct_load", "direct_cold", "direct_warm")
    med = {k + "_ms": median([r[k] for r in rows]) * 1000 for k in keys}
    extra = [(r["gateway_cold"] - r["gateway_warm"]) * 1000 for r in rows]
    extra_direct = [(r["direct_cold"] - r["direct_warm"]) * 1000 for r in rows]
    return {
        "adapters": len(rows),
        "median": med,
        "gateway_extra_ms": median(extra),
        "gateway_extra_ms_each": extra,
        "direct_extra_ms": median(extra_direct),
        "gateway_cold_ms_max": max(r["gateway_cold"] for r in rows) * 1000,
        "rows_ms": [{k: (v * 1000 if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "sha256_ms": sha256_ms,
        "gateway_loads": gateway_counters(metrics_after)["loads_ok"] - gateway_counters(metrics_before)["loads_ok"],
        "load_histogram": load_histogram(metrics_after),
    }


async def mixed_run(
    client: Client,
    via: str,
    models: list[str],
    cfg: Config,
    round_index: int,
    adapters: AdapterSet | None,
    progress: Progress,
    task: Any,
) -> dict[str, Any]:
    """The request sequence (one model per request) from `concurrency` clients in a closed loop."""
    tag = nonce()
    jobs = iter(enumerate(models))
    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    load_s = 0.0

    async def worker() -> None:
        nonlocal tokens, load_s
        for index, model in jobs:  # the shared iterator hands each request to one client
            body = {
                "messages": messages(f"{tag}-{round_index}-{index}", index),
                "max_tokens": cfg.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            try:
                if adapters is not None and model != BASE_MODEL:  # direct: load on first use
                    load_s += await client.load_direct(model, model.removeprefix("bench-"))
                made, seconds = await client.complete(via, model, body)
                tokens += made
                latencies.append(seconds)
                if made != cfg.max_tokens:
                    errors.append(f"{model}: {made} tokens instead of {cfg.max_tokens}")
            except (TimeoutError, BenchError, aiohttp.ClientError) as exc:
                errors.append(f"{model}: {type(exc).__name__}: {exc}"[:300])
            progress.advance(task)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "latency": summarise(latencies),
        "direct_load_s": load_s,
    }


async def measure_mixed(
    client: Client, cfg: Config, adapters: AdapterSet, progress: Progress, others: Callable[[], int]
) -> dict[str, Any]:
    sequence = zipf_sequence(cfg.requests, cfg.adapters, cfg.zipf_s, cfg.seed)
    popular = adapters.mixed[0]  # Zipf rank 1
    models = {
        "gateway": [adapters.mixed[i] for i in sequence],
        "direct": [f"bench-{adapters.mixed[i]}" for i in sequence],
        "single": [popular] * len(sequence),
    }
    via = {"gateway": "gateway", "direct": "direct", "single": "gateway"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    order: list[str] = []
    task = progress.add_task("mixed traffic (requests)", total=cfg.requests * 3 * cfg.repeats)
    for round_index in range(cfg.repeats):
        names = ["gateway", "direct", "single"]
        for name in names if round_index % 2 == 0 else names[::-1]:
            before = gateway_counters(await client.metrics())
            others_before = others()
            run = await mixed_run(
                client,
                via[name],
                models[name],
                cfg,
                round_index,
                adapters if name == "direct" else None,
                progress,
                task,
            )
            after = gateway_counters(await client.metrics())
            run["gateway_loads"] = after["loads_ok"] - before["loads_ok"]
            run["gateway_evictions"] = after["evictions"] - before["evictions"]
            run["round"] = round_index
            run["other_vllm_servers"] = max(others_before, others())
            run["load_average_1m_after"] = os.getloadavg()[0]
            runs[name].append(run)
            order.append(name)
            progress.console.print(
                f"  round {round_index + 1} {name:<7} {run['tokens_per_s']:6.1f} tok/s ({run['seconds']:.0f} s, "
                f"{run['errors']} err, {run['gateway_loads']:.0f} loads, {run['gateway_evictions']:.0f} evictions, "
                f"{run['other_vllm_servers']} other vLLM)"
            )
    counts = [0] * cfg.adapters
    for i in sequence:
        counts[i] += 1
    result: dict[str, Any] = {
        "order": order,
        "sequence": sequence,
        "distinct_adapters": sum(1 for c in counts if c),
        "top_adapter_share": max(counts) / len(sequence),
        "runs": runs,
    }
    for name in models:
        result[name] = {
            "tokens_per_s": median([r["tokens_per_s"] for r in runs[name]]),
            "tokens_per_s_each": [r["tokens_per_s"] for r in runs[name]],
            "p50_ms": median([r["latency"]["p50_ms"] for r in runs[name]]),
            "p99_ms": median([r["latency"]["p99_ms"] for r in runs[name]]),
            "errors": sum(r["errors"] for r in runs[name]),
        }
    result["ratio_gateway_direct"] = result["gateway"]["tokens_per_s"] / result["direct"]["tokens_per_s"]
    result["ratio_gateway_single"] = result["gateway"]["tokens_per_s"] / result["single"]["tokens_per_s"]
    # Paired by round, which cancels slow drifts in the machine's load.
    result["ratio_gateway_direct_each"] = [
        g["tokens_per_s"] / d["tokens_per_s"] for g, d in zip(runs["gateway"], runs["direct"], strict=True)
    ]
    result["ratio_gateway_single_each"] = [
        g["tokens_per_s"] / s["tokens_per_s"] for g, s in zip(runs["gateway"], runs["single"], strict=True)
    ]
    return result


async def measure(stack: EngineStack, cfg: Config, adapters: AdapterSet) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=600)
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, stack, adapters)
        with console.status("warming up (base model)"):
            await warm_up(client)
        columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, refresh_per_second=2) as progress:
            results["memory"] = await measure_memory(client, stack, cfg, adapters, progress)
            # The first LoRA request of a vLLM server pays one-time costs; keep them out of the cold timings.
            await client.ttft("direct", "bench-mem-00", 0)
            results["cold"] = await measure_cold(client, cfg, adapters, progress)
            results["mixed"] = await measure_mixed(client, cfg, adapters, progress, stack.other_vllm_servers)
        final = await client.metrics()
        results["gateway_metrics"] = {**gateway_counters(final), "load_histogram": load_histogram(final)}
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


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


def markdown(report: dict[str, Any]) -> str:
    cfg, m, mem, cold, mixed = (report["config"], report["machine"], report["memory"], report["cold"], report["mixed"])
    load, load_after = report["load_average_before"], report["load_average_after"]
    med = cold["median"]
    hist = report["gateway_metrics"]["load_histogram"]
    cold_hist = cold["load_histogram"]
    lines = [
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
        "Gateway's adapter-load histogram (`loragate_adapter_load_seconds`, from the decision to load until "
        "vLLM answered: the first load's sha256 check, the wait for the replica's load slot and the load call), "
        "all adapters:",
        "",
        "| Loads | Mean | p50 (bucket bound) | p90 (bucket bound) | "
        + " | ".join(f"≤{float(b['le']) * 1000:g} ms" if b["le"] != "+Inf" else "all" for b in hist["buckets"])
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(hist["buckets"]),
    ]
    for label, h in (("after the cold phase", cold_hist), ("at the end", hist)):
        lines.append(
            f"| {h['count']} ({label}) | {f1(h['mean_ms'])} ms | {f1(histogram_quantile(h, 0.5))} ms | "
            f"{f1(histogram_quantile(h, 0.9))} ms | " + " | ".join(str(b["count"]) for b in h["buckets"]) + " |"
        )
    g, d, s = mixed["gateway"], mixed["direct"], mixed["single"]
    lines += [
        "",
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
        traffic_row("(a) mixed, through loragate", g),
        traffic_row("(b) mixed, straight to vLLM (runtime loading)", d),
        traffic_row("(c) one adapter, through loragate", s),
        "",
        "| Ratio | Median of runs | Per round (paired) | Target |",
        "|---|---:|---|---|",
        f"| (a) / (b): loragate vs vLLM direct | {mixed['ratio_gateway_direct']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in mixed['ratio_gateway_direct_each'])} | |",
        f"| (a) / (c): mixed vs single adapter | {mixed['ratio_gateway_single']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in mixed['ratio_gateway_single_each'])} | ≥ 0.90 |",
        "",
        noise_line(mixed),
        f"Gateway during the mixed runs: adapter loads per run "
        f"{', '.join(str(int(r['gateway_loads'])) for r in mixed['runs']['gateway'])} (a), evictions per run "
        f"{', '.join(str(int(r['gateway_evictions'])) for r in mixed['runs']['gateway'])} (a); over the whole "
        f"benchmark {report['gateway_metrics']['loads_ok']:.0f} loads, {report['gateway_metrics']['evictions']:.0f} "
        f"evictions, {report['gateway_metrics']['loads_failed']:.0f} failed loads. The direct client loaded each "
        "adapter once, on its first request (the first (b) run pays for that). With "
        f"`--max-loras {cfg['max_loras']}` vLLM batches requests for at most {cfg['max_loras']} different adapters "
        "per step, which is what (a) and (b) pay against (c). (a) and (b) use different vLLM adapter names for "
        f"the same files, so together they are {cfg['adapters'] * 2} adapters in vLLM's "
        f"{cfg['max_cpu_loras']}-slot CPU cache"
        + (
            "; each run reloads evicted ones from disk inside vLLM, alike for both."
            if cfg["adapters"] * 2 > cfg["max_cpu_loras"]
            else ": all stay loaded."
        ),
        "",
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
    if report.get("vllm_restarts"):
        lines += ["", f"**vLLM restarted {report['vllm_restarts']} time(s) during the run**; the figures are suspect."]
    lines.append("")
    return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

SMOKE = {
    "cold": 2,
    "adapters": 4,
    "requests": 8,
    "concurrency": 4,
    "max_tokens": 8,
    "repeats": 1,
    "memory_steps": "2,4",
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Config()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.adapters",
        description="Measure cold-adapter latency, mixed-adapter throughput and adapter memory with a real vLLM.",
    )
    parser.add_argument("--cold", type=int, default=d.cold, help="Fresh adapters for the cold-start TTFT.")
    parser.add_argument("--adapters", type=int, default=d.adapters, help="Adapters in the mixed traffic.")
    parser.add_argument("-n", "--requests", type=int, default=d.requests, help="Requests per mixed-traffic run.")
    parser.add_argument("-c", "--concurrency", type=int, default=d.concurrency, help="Concurrent clients.")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="Output tokens per mixed request.")
    parser.add_argument(
        "--repeats", type=int, default=d.repeats, help="Rounds of (a, b, c); medians over the rounds are reported."
    )
    parser.add_argument("--zipf-s", type=float, default=d.zipf_s, help="Zipf exponent of adapter popularity.")
    parser.add_argument("--seed", type=int, default=d.seed, help="Seed of the request sequence.")
    parser.add_argument(
        "--memory-steps",
        default=",".join(map(str, d.memory_steps)),
        help="Adapter counts at which RSS is measured, comma-separated.",
    )
    parser.add_argument("--max-loras", type=int, default=d.max_loras, help="vLLM --max-loras.")
    parser.add_argument("--max-cpu-loras", type=int, default=d.max_cpu_loras, help="vLLM --max-cpu-loras.")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=DEFAULT_MODEL_CACHE,
        help="Folder holding the prepared base model (LORAGATE_MODEL_CACHE).",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=d.start_timeout_s,
        help="Seconds the gateway and its vLLM may take to start.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="A tiny run (2 cold, 4 adapters, 8 requests, 1 round) to check that it works; flags given as well win.",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
        flags = {
            "cold": ["--cold"],
            "adapters": ["--adapters"],
            "requests": ["-n", "--requests"],
            "concurrency": ["-c", "--concurrency"],
            "max_tokens": ["--max-tokens"],
            "repeats": ["--repeats"],
            "memory_steps": ["--memory-steps"],
        }
        for key, value in SMOKE.items():
            if not given & set(flags[key]):
                setattr(args, key, value)
    try:
        args.memory_steps = sorted({int(x) for x in str(args.memory_steps).split(",") if x.strip()})
    except ValueError:
        parser.error("--memory-steps needs comma-separated integers")
    for name in ("cold", "adapters", "requests", "concurrency", "max_tokens", "repeats", "max_loras", "max_cpu_loras"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.memory_steps or args.memory_steps[0] < 1:
        parser.error("--memory-steps needs positive counts")
    if args.memory_steps[-1] > min(args.adapters, args.max_cpu_loras):
        parser.error("--memory-steps cannot exceed --adapters or --max-cpu-loras")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = Config(
        cold=args.cold,
        adapters=args.adapters,
        requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        zipf_s=args.zipf_s,
        seed=args.seed,
        memory_steps=args.memory_steps,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        start_timeout_s=args.start_timeout,
    )
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started = time.monotonic()
    load_before = os.getloadavg()
    others_at_start = len(vllm_servers())
    workdir = Path(tempfile.mkdtemp(prefix="loragate-bench-adapters-"))
    stack = EngineStack(workdir, extra_env, cfg, args.model_cache)

    def body() -> None:
        gateway, startup_s, adapters = start_engine(stack, lambda: make_adapters(stack, cfg))
        console.print(
            f"redis :{stack.redis_port}, gateway :{stack.gateway_port} (pid {gateway.proc.pid}), "
            f"vLLM :{stack.engine_port}, ready in {startup_s:.0f} s; "
            f"{len(adapters.paths)} adapters written in {adapters.seconds:.0f} s; logs in {workdir}"
        )
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            results = runner.run(measure(stack, cfg, adapters))
        restarts = vllm_restarts(gateway)
        report = {
            **report_header("loadtest.adapters", stack, argv, load_before),
            "other_vllm_servers_at_start": others_at_start,
            "other_vllm_servers_at_end": stack.other_vllm_servers(),
            "versions": {**versions(), **engine_versions()},
            "config": {**asdict(cfg), "gateway_env": extra_env, "targets": list(TARGETS)},
            "startup_s": round(startup_s, 1),
            "vllm_restarts": restarts,
            **results,
            "wall_s": round(time.monotonic() - started, 1),
        }
        publish(args.output_dir, "adapters", report, markdown, print_summary)

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
