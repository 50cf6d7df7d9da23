"""The adapters benchmark's run (loadtest.adapters): the synthetic adapters it writes, the Zipf request sequence,
and its three measurements: memory per resident adapter, the cold-adapter penalty, mixed-adapter throughput."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from rich.progress import Progress

from loadtest.adapters_client import Client, load_histogram
from loadtest.engine import BASE_MODEL, EngineStack, gateway_counters, messages, nonce, write_adapters
from loadtest.metrics import summarise, tree_rss
from loadtest.runner import console, progress_bar
from loadtest.scenarios import zipf_sequence
from loadtest.services import BenchError

if TYPE_CHECKING:
    from loadtest.adapters import Config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    """(a), (b) and (c) over the same Zipf sequence, `repeats` rounds, the order reversed every other round."""
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
    return summarise_mixed(cfg, sequence, order, runs)


def summarise_mixed(
    cfg: Config, sequence: list[int], order: list[str], runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The mixed runs' result: the sequence's spread, each traffic's medians, and (a)'s ratios to (b) and (c)."""
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
    for name in runs:
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
        with progress_bar(refresh_per_second=2) as progress:
            results["memory"] = await measure_memory(client, stack, cfg, adapters, progress)
            # The first LoRA request of a vLLM server pays one-time costs; keep them out of the cold timings.
            await client.ttft("direct", "bench-mem-00", 0)
            results["cold"] = await measure_cold(client, cfg, adapters, progress)
            results["mixed"] = await measure_mixed(client, cfg, adapters, progress, stack.other_vllm_servers)
        final = await client.metrics()
        results["gateway_metrics"] = {**gateway_counters(final), "load_histogram": load_histogram(final)}
    return results
