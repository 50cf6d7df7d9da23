"""Real-model throughput: loragate against straight to vLLM, and mixed-adapter traffic by adapter count.

One run starts a throw-away redis-server and `loragate serve`, which starts and supervises one vLLM
(CPU, the real SmolLM2-135M-Instruct base), writes small synthetic adapters (rank 8, q_proj and v_proj)
into its adapter store, and drives both with the real OpenAI SDK (`AsyncOpenAI`, streaming):

(a) the base model at a fixed concurrency in a closed loop, fixed max_tokens with ignore_eos,
    temperature 0, every prompt with a unique prefix; runs alternate gateway, direct, direct, gateway.
    Output tokens/s, requests/s, time to first token p50, inter-token latency p50; ratio gateway/direct
    against the 0.98 target;
(b) through loragate, the same closed loop over 8, 32 and 128 adapters in round-robin rotation
    (request i goes to adapter i mod N), each point warmed by one short max_tokens=1 request per adapter;
    tokens/s and each point's ratio to the 8-adapter point.

Results: loadtest/results/throughput.json, throughput.md and throughput.png.

    .venv/bin/python -m loadtest.throughput           # the defaults, about 12-15 minutes on 2 cores
    .venv/bin/python -m loadtest.throughput --quick   # a smoke run, about 3-4 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import httpx
from openai import AsyncOpenAI, OpenAIError
from openai.types.chat import ChatCompletionMessageParam

from loadtest import throughput_report
from loadtest.engine import (
    BASE_MODEL,
    DEFAULT_MODEL_CACHE,
    METRICS_KEY,
    EngineOptions,
    EngineStack,
    WrittenAdapters,
    engine_versions,
    gateway_counters,
    messages,
    nonce,
    package_version,
    start_engine,
    vllm_restarts,
    vllm_servers,
    write_adapters,
)
from loadtest.metrics import parse_prometheus, percentile
from loadtest.reports import publish, report_header, versions
from loadtest.runner import add_common_arguments, console, event_loop_factory, run_and_clean_up

TARGETS = ("q_proj", "v_proj")
ABBA = ("gateway", "direct", "direct", "gateway")
WARM_UP = [{"role": "system", "content": "."}, {"role": "user", "content": "hi"}]
"""The (b) warm-up's prompt: as short as it gets, since a LoRA prefill on this CPU is slow."""


@dataclass
class Config(EngineOptions):
    concurrency: int = 8
    """Clients in the closed loop, for (a) and (b)."""
    max_tokens: int = 48
    """Output tokens of each (a) request (ignore_eos: exactly this many)."""
    requests: int = 32
    """Requests per (a) run."""
    rounds: int = 2
    """(a): groups of gateway, direct, direct, gateway."""
    adapter_counts: list[int] = field(default_factory=lambda: [8, 32, 128])
    mixed_requests: int = 128
    """Requests per (b) run: a multiple of the largest count touches every adapter equally often."""
    mixed_max_tokens: int = 8
    repeats: int = 2
    """(b): passes over the counts, the order reversed every other pass."""
    rank: int = 8
    max_loras: int = 8
    """= the concurrency, so every request in flight fits in a batch; max_cpu_loras (64): more load on demand."""
    target_ratio: float = 0.98
    model_cache: Path = DEFAULT_MODEL_CACHE
    quick: bool = False

    @classmethod
    def quick_preset(cls) -> Config:
        """A smoke run of about 3 minutes (most of it vLLM's start-up): one round, short requests."""
        return cls(requests=16, max_tokens=32, rounds=1, mixed_requests=32, mixed_max_tokens=4, repeats=1, quick=True)


# --------------------------------------------------------------------------------------------
# Requests through the OpenAI SDK
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    tokens: int
    latency_s: float
    ttft_s: float
    gaps_s: list[float]
    """Seconds between successive streamed tokens."""


Job = tuple[str, list[dict[str, str]]]
"""A request: the model and its messages."""


async def stream_one(client: AsyncOpenAI, job: Job, max_tokens: int) -> Sample:
    """One streamed chat completion: completion tokens (from usage), latency, TTFT and inter-token gaps."""
    model, prompt = job
    started = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=cast("list[ChatCompletionMessageParam]", prompt),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        # vLLM's first chunk only names the role, then one chunk per token; an empty closing chunk is no token.
        choice = chunk.choices[0] if chunk.choices else None
        if choice and choice.delta.role is None and (choice.delta.content or choice.finish_reason is None):
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    first = stamps[0] if stamps else end
    return Sample(tokens, end - started, first - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)])


def p50_ms(values: list[float]) -> float:
    return percentile(sorted(values), 0.5) * 1000


async def closed_loop(client: AsyncOpenAI, jobs: list[Job], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """`jobs` from `concurrency` clients, each taking the next one when its last is answered."""
    queue = iter(jobs)
    samples: list[Sample] = []
    errors: list[str] = []

    async def worker() -> None:
        for job in queue:  # the shared iterator hands each job to one client
            try:
                sample = await stream_one(client, job, max_tokens)
            except OpenAIError as exc:
                errors.append(f"{job[0]}: {type(exc).__name__}: {exc}"[:300])
                continue
            samples.append(sample)
            if sample.tokens != max_tokens:
                errors.append(f"{job[0]}: {sample.tokens} tokens instead of {max_tokens}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "requests_per_s": len(samples) / seconds,
        "ttft_p50_ms": p50_ms([s.ttft_s for s in samples]),
        "itl_p50_ms": p50_ms([g for s in samples for g in s.gaps_s]),
        "latency_p50_ms": p50_ms([s.latency_s for s in samples]),
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def base_jobs(count: int) -> list[Job]:
    tag = nonce()
    return [(BASE_MODEL, messages(f"{tag}-{i}", i)) for i in range(count)]


def rotation(names: list[str], count: int) -> list[Job]:
    """Round-robin: request i to adapter i mod len(names), each with a unique prompt prefix."""
    tag = nonce()
    return [(names[i % len(names)], messages(f"{tag}-{i}", i)) for i in range(count)]


# --------------------------------------------------------------------------------------------
# The two measurements
# --------------------------------------------------------------------------------------------


def pooled(runs: list[dict[str, Any]]) -> float:
    """Tokens/s over several runs: all their tokens over all their seconds."""
    return sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)


async def measure_base(clients: dict[str, AsyncOpenAI], cfg: Config) -> dict[str, Any]:
    """(a): the base model, gateway and direct alternating ABBA, `rounds` times."""
    for via in ("direct", "gateway"):  # warm-up, not measured
        await closed_loop(clients[via], base_jobs(cfg.concurrency), cfg.concurrency, cfg.max_tokens)
    runs: dict[str, list[dict[str, Any]]] = {"gateway": [], "direct": []}
    paired = []
    for round_index in range(cfg.rounds):
        this: dict[str, list[dict[str, Any]]] = {"gateway": [], "direct": []}
        for via in ABBA:
            run = await closed_loop(clients[via], base_jobs(cfg.requests), cfg.concurrency, cfg.max_tokens)
            run |= {"round": round_index, "load_average_1m_after": os.getloadavg()[0]}
            this[via].append(run)
            runs[via].append(run)
            console.print(
                f"  (a) round {round_index + 1} {via:<7} {run['tokens_per_s']:6.1f} tok/s "
                f"TTFT p50 {run['ttft_p50_ms']:.0f} ms, ITL p50 {run['itl_p50_ms']:.1f} ms, {run['errors']} err"
            )
        paired.append(pooled(this["gateway"]) / pooled(this["direct"]))
    result: dict[str, Any] = {"order": list(ABBA) * cfg.rounds, "runs": runs, "ratio_each_round": paired}
    for via, its in runs.items():
        result[via] = {
            "tokens_per_s": pooled(its),
            "requests_per_s": sum(r["requests"] for r in its) / sum(r["seconds"] for r in its),
            **{k: p50_of_runs(its, k) for k in ("ttft_p50_ms", "itl_p50_ms", "latency_p50_ms")},
            "errors": sum(r["errors"] for r in its),
        }
    result["ratio"] = result["gateway"]["tokens_per_s"] / result["direct"]["tokens_per_s"]
    return result


def p50_of_runs(runs: list[dict[str, Any]], key: str) -> float:
    return percentile(sorted(r[key] for r in runs), 0.5)


async def gateway_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    resp = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    return gateway_counters(parse_prometheus(resp.text))


async def count_point(gateway: AsyncOpenAI, http: httpx.AsyncClient, cfg: Config, names: list[str]) -> dict[str, Any]:
    """One (b) run: warm every adapter of the point once (max_tokens=1), then the measured rotation."""
    warm_started = time.perf_counter()
    await closed_loop(gateway, [(name, WARM_UP) for name in names], cfg.concurrency, 1)
    warm_s = time.perf_counter() - warm_started
    before = await gateway_metrics(http)
    run = await closed_loop(gateway, rotation(names, cfg.mixed_requests), cfg.concurrency, cfg.mixed_max_tokens)
    after = await gateway_metrics(http)
    return run | {
        "adapters": len(names),
        "warm_s": warm_s,
        "loads": after["loads_ok"] - before["loads_ok"],
        "evictions": after["evictions"] - before["evictions"],
        "resident_after": after["resident"],
        "load_average_1m_after": os.getloadavg()[0],
    }


def count_summary(n: int, runs: list[dict[str, Any]], first: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """One adapter count's runs; its ratio to the first (smallest) count's, pooled and pass by pass."""
    return {
        "adapters": n,
        "tokens_per_s": pooled(runs),
        "tokens_per_s_each": [r["tokens_per_s"] for r in runs],
        "ratio_to_first": pooled(runs) / pooled(first),
        "ratio_to_first_each": [r["tokens_per_s"] / f["tokens_per_s"] for r, f in zip(runs, first, strict=True)],
        "resident": min(n, cfg.max_cpu_loras),
        "on_demand": max(0, n - cfg.max_cpu_loras),
        "loads_per_run": [r["loads"] for r in runs],
        "evictions_per_run": [r["evictions"] for r in runs],
        "latency_p50_ms": p50_of_runs(runs, "latency_p50_ms"),
        "errors": sum(r["errors"] for r in runs),
    }


async def measure_counts(
    gateway: AsyncOpenAI, http: httpx.AsyncClient, cfg: Config, names: list[str]
) -> dict[str, Any]:
    """(b): every adapter count, `repeats` passes, the order reversed every other pass."""
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in cfg.adapter_counts}
    order = []
    for repeat in range(cfg.repeats):
        for n in cfg.adapter_counts if repeat % 2 == 0 else cfg.adapter_counts[::-1]:
            run = await count_point(gateway, http, cfg, names[:n]) | {"repeat": repeat}
            runs[n].append(run)
            order.append(n)
            console.print(
                f"  (b) pass {repeat + 1} {n:>4} adapters {run['tokens_per_s']:6.1f} tok/s "
                f"({run['seconds']:.0f} s, {run['loads']:.0f} loads, {run['evictions']:.0f} evictions, "
                f"{run['errors']} err)"
            )
    first = runs[cfg.adapter_counts[0]]
    points = [count_summary(n, runs[n], first, cfg) for n in cfg.adapter_counts]
    return {"order": order, "points": points, "runs": {str(n): r for n, r in runs.items()}}


def sdk_client(base_url: str, api_key: str) -> AsyncOpenAI:
    """The OpenAI SDK's async client, no retries (a failed request counts as an error)."""
    return AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=600.0, max_retries=0)


async def measure(stack: EngineStack, cfg: Config, names: list[str]) -> dict[str, Any]:
    gateway_url = f"http://127.0.0.1:{stack.gateway_port}"
    gateway = sdk_client(gateway_url + "/v1", stack.api_key or "")
    direct = sdk_client(f"http://127.0.0.1:{stack.engine_port}/v1", "EMPTY")
    async with gateway, direct, httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        with console.status("(a) base model, gateway vs direct"):
            base = await measure_base({"gateway": gateway, "direct": direct}, cfg)
        with console.status("(b) mixed adapters by count"):
            counts = await measure_counts(gateway, http, cfg, names)
        final = await gateway_metrics(http)
    return {"base": base, "counts": counts, "gateway_metrics": final}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quick", action="store_true")
    d = Config.quick_preset() if pre.parse_known_args(argv)[0].quick else Config()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.throughput",
        description="Real-model tokens/s through loragate vs straight to vLLM, and by adapter count.",
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run of about 3 minutes; flags given win.")
    parser.add_argument("-c", "--concurrency", type=int, default=d.concurrency, help="Clients in the closed loop.")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="Output tokens per (a) request.")
    parser.add_argument("-n", "--requests", type=int, default=d.requests, help="Requests per (a) run.")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="(a): rounds of gateway, direct, direct, gateway.")
    parser.add_argument("--adapter-counts", default=",".join(map(str, d.adapter_counts)), help="(b): e.g. 8,32,128.")
    parser.add_argument("--mixed-requests", type=int, default=d.mixed_requests, help="Requests per (b) run.")
    parser.add_argument(
        "--mixed-max-tokens", type=int, default=d.mixed_max_tokens, help="Output tokens per (b) request."
    )
    parser.add_argument("--repeats", type=int, default=d.repeats, help="(b): passes over the counts.")
    parser.add_argument("--max-loras", type=int, default=d.max_loras, help="vLLM --max-loras.")
    parser.add_argument("--max-cpu-loras", type=int, default=d.max_cpu_loras, help="vLLM --max-cpu-loras.")
    parser.add_argument("--model-cache", type=Path, default=d.model_cache, help="The prepared base model's folder.")
    parser.add_argument(
        "--start-timeout", type=float, default=d.start_timeout_s, help="Seconds vLLM may take to start."
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(x) for x in str(args.adapter_counts).split(",") if x.strip()})
    except ValueError:
        parser.error("--adapter-counts needs comma-separated integers")
    numbers = ("concurrency", "max_tokens", "requests", "rounds", "mixed_requests", "mixed_max_tokens", "repeats")
    for name in (*numbers, "max_loras", "max_cpu_loras"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not counts or counts[0] < 1:
        parser.error("--adapter-counts needs positive counts")
    cfg = replace(
        d,
        **{name: getattr(args, name) for name in (*numbers, "max_loras", "max_cpu_loras", "model_cache")},
        adapter_counts=counts,
        start_timeout_s=args.start_timeout,
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started, load_before, others_at_start = time.monotonic(), os.getloadavg(), len(vllm_servers())
    workdir = Path(tempfile.mkdtemp(prefix="loragate-bench-throughput-"))
    stack = EngineStack(workdir, extra_env, cfg, cfg.model_cache)
    names = [f"tp-{i:03d}" for i in range(cfg.adapter_counts[-1])]

    def body() -> None:
        gateway, startup_s, written = start_engine(stack, lambda: write_adapters(stack, names, cfg.rank, TARGETS))
        console.print(
            f"gateway :{stack.gateway_port}, vLLM :{stack.engine_port}, ready in {startup_s:.0f} s; "
            f"{len(names)} adapters written in {written.seconds:.0f} s; logs in {workdir}"
        )
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            results = runner.run(measure(stack, cfg, names))
        report = {
            **report_header("loadtest.throughput", stack, argv, load_before),
            "other_vllm_servers_at_start": others_at_start,
            "other_vllm_servers_at_end": stack.other_vllm_servers(),
            "versions": {**versions(), **engine_versions(), "openai": package_version("openai")},
            "config": {**asdict(cfg), "model_cache": str(cfg.model_cache), "gateway_env": extra_env},
            "adapter": adapter_facts(written),
            "startup_s": round(startup_s, 1),
            "vllm_restarts": vllm_restarts(gateway),
            **results,
            "wall_s": round(time.monotonic() - started, 1),
        }
        publish(args.output_dir, "throughput", report, throughput_report.markdown, throughput_report.print_summary)
        throughput_report.plot(report, args.output_dir / "throughput.png")

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


def adapter_facts(written: WrittenAdapters) -> dict[str, Any]:
    return {"targets": list(TARGETS), "file_kib": written.file_bytes / 1024, "write_s": written.seconds}


if __name__ == "__main__":
    sys.exit(main())
