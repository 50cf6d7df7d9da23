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
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.adapters_report import markdown, print_summary
from loadtest.adapters_run import TARGETS, make_adapters, measure
from loadtest.engine import (
    DEFAULT_MODEL_CACHE,
    EngineOptions,
    EngineStack,
    engine_versions,
    start_engine,
    vllm_restarts,
    vllm_servers,
)
from loadtest.reports import publish, report_header, versions
from loadtest.runner import add_common_arguments, console, event_loop_factory, run_and_clean_up

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


def add_workload_arguments(parser: argparse.ArgumentParser, d: Config) -> None:
    """What is measured: the cold adapters, the mixed traffic and the memory steps."""
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


def add_engine_arguments(parser: argparse.ArgumentParser, d: Config) -> None:
    """The vLLM it runs against: adapter capacity, the base model's folder, the start-up timeout."""
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


def apply_smoke(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--smoke: the SMOKE settings, except for those whose flags were given as well."""
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


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse --memory-steps into sorted counts, and stop with a usage error on values that cannot work."""
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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Config()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.adapters",
        description="Measure cold-adapter latency, mixed-adapter throughput and adapter memory with a real vLLM.",
    )
    add_workload_arguments(parser, d)
    add_engine_arguments(parser, d)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="A tiny run (2 cold, 4 adapters, 8 requests, 1 round) to check that it works; flags given as well win.",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args, argv)
    check_args(parser, args)
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
