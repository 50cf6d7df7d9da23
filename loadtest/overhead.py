"""What the gateway costs: the same requests straight to a mock upstream and through loragate.

One run starts a throw-away redis-server, the mock upstream (loadtest/mock_upstream.py) and
`loragate serve` in front of it, creates an API key, then measures, with one keep-alive aiohttp
client session and the two targets interleaved so machine noise hits both alike:

1. sequential non-stream requests: per-request latency (repeated, medians of the repeats);
2. sequential stream requests: time to first and to last byte (repeated likewise);
3. concurrent non-stream requests: C clients for a fixed time per target, in ABBA segments
   (direct, gateway, gateway, direct, ...): requests/s and latency.

Results go to loadtest/results/overhead.json and overhead.md. Every process it starts is
stopped again, on success, failure, Ctrl-C or SIGTERM.

    .venv/bin/python -m loadtest.overhead            # the defaults (`make bench`)
    .venv/bin/python -m loadtest.overhead -n 200 -d 5  # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from rich.progress import Progress

from loadtest.metrics import cpu_seconds, median_of, summarise
from loadtest.overhead_client import Target, call, checks, load_segment, request_body
from loadtest.overhead_report import markdown, print_summary
from loadtest.reports import publish, report_header, versions
from loadtest.runner import Ticker, add_common_arguments, console, event_loop_factory, progress_bar, run_and_clean_up
from loadtest.services import TENANCY_ALIAS, BenchError, Stack, tail

# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    requests: int
    warmup: int
    repeats: int
    concurrency: int
    duration_s: float
    segments: int


async def sequential(
    session: aiohttp.ClientSession,
    targets: tuple[Target, Target],
    stream: bool,
    cfg: Config,
    progress: Progress,
    label: str,
    gateway_pid: int,
) -> dict[str, Any]:
    """N requests per target, one at a time, alternating targets (ABBA order), `repeats` times. The first
    target is the baseline: `added` is the second's latency minus the first's."""
    bodies = {target.name: request_body(stream, target.model) for target in targets}
    task = progress.add_task(label, total=(cfg.warmup + cfg.requests * cfg.repeats) * 2)
    ticker = Ticker(progress, task)
    for _ in range(cfg.warmup):
        for target in targets:
            await call(session, target, bodies[target.name], stream)
            ticker.tick()
    runs = []
    for _ in range(cfg.repeats):
        runs.append(await sequential_run(session, targets, bodies, stream, cfg, ticker, gateway_pid))
    ticker.flush()
    return summarise_sequential(runs, targets, stream)


async def sequential_run(
    session: aiohttp.ClientSession,
    targets: tuple[Target, Target],
    bodies: dict[str, bytes],
    stream: bool,
    cfg: Config,
    ticker: Ticker,
    gateway_pid: int,
) -> dict[str, Any]:
    """One run: `requests` per target in ABBA order; each target's latency (and time to first byte when
    streaming), the paired added p50 and the gateway's CPU time per request."""
    base, other = (target.name for target in targets)
    first: dict[str, list[float]] = {t.name: [] for t in targets}
    last: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu_before = cpu_seconds(gateway_pid)
    for i in range(cfg.requests):
        for target in targets if i % 2 == 0 else targets[::-1]:
            ttfb, total = await call(session, target, bodies[target.name], stream)
            first[target.name].append(ttfb)
            last[target.name].append(total)
            ticker.tick()
    cpu_after = cpu_seconds(gateway_pid)
    run: dict[str, Any] = {}
    for target in targets:
        run[target.name] = summarise(last[target.name])
        run[target.name]["requests_per_s"] = len(last[target.name]) / sum(last[target.name])
        if stream:
            run[target.name]["first_byte"] = summarise(first[target.name])
    paired = [g - d for d, g in zip(last[base], last[other], strict=True)]
    run["paired_added_p50_ms"] = statistics.median(paired) * 1000
    if cpu_before is not None and cpu_after is not None:
        run["gateway_cpu_us_per_request"] = (cpu_after - cpu_before) / cfg.requests * 1e6
    return run


def summarise_sequential(runs: list[dict[str, Any]], targets: tuple[Target, Target], stream: bool) -> dict[str, Any]:
    """Each target's medians over the runs, and what the second target adds to the first (the baseline)."""
    base, other = (target.name for target in targets)
    result: dict[str, Any] = {"runs": runs}
    for name in (base, other):
        result[name] = {
            key: median_of(runs, name, key) for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "requests_per_s")
        }
        if stream:
            result[name]["first_byte"] = {key: median_of(runs, name, "first_byte", key) for key in ("p50_ms", "p99_ms")}
    result["added"] = {
        "p50_ms": statistics.median(r[other]["p50_ms"] - r[base]["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r[other]["p99_ms"] - r[base]["p99_ms"] for r in runs),
        "p50_ms_per_run": [r[other]["p50_ms"] - r[base]["p50_ms"] for r in runs],
        "paired_p50_ms": median_of(runs, "paired_added_p50_ms"),
    }
    if stream:
        result["added"]["first_byte_p50_ms"] = statistics.median(
            r[other]["first_byte"]["p50_ms"] - r[base]["first_byte"]["p50_ms"] for r in runs
        )
    result["ratio_requests_per_s"] = result[other]["requests_per_s"] / result[base]["requests_per_s"]
    if all("gateway_cpu_us_per_request" in r for r in runs):
        result["gateway_cpu_us_per_request"] = median_of(runs, "gateway_cpu_us_per_request")
    return result


async def concurrent(
    session: aiohttp.ClientSession,
    targets: tuple[Target, Target],
    cfg: Config,
    progress: Progress,
    label: str,
    gateway_pid: int,
) -> dict[str, Any]:
    body = request_body(False)
    for target in targets:  # open the connections (client -> target, gateway -> upstream)
        await load_segment(session, target, body, cfg.concurrency, None, count=5)
    segment_s = cfg.duration_s / cfg.segments
    # ABBA: direct, gateway, gateway, direct, ... so a drift in machine load hits both alike
    order = [targets[0 if i % 4 in (0, 3) else 1] for i in range(cfg.segments * 2)]
    task = progress.add_task(label, total=round(segment_s * len(order), 1))
    latencies: dict[str, list[float]] = {t.name: [] for t in targets}
    errors = {t.name: 0 for t in targets}
    elapsed = {t.name: 0.0 for t in targets}
    gateway_cpu = 0.0
    cpu_known = True
    for index, target in enumerate(order):
        base = index * segment_s

        async def tick(base: float = base) -> None:
            start = time.perf_counter()
            while True:
                await asyncio.sleep(0.25)
                progress.update(task, completed=min(base + time.perf_counter() - start, base + segment_s))

        ticker = asyncio.create_task(tick())
        cpu_before = cpu_seconds(gateway_pid)
        try:
            lat, err, secs = await load_segment(session, target, body, cfg.concurrency, segment_s)
        finally:
            ticker.cancel()
        cpu_after = cpu_seconds(gateway_pid)
        if target.name == "gateway":
            if cpu_before is None or cpu_after is None:
                cpu_known = False
            else:
                gateway_cpu += cpu_after - cpu_before
        progress.update(task, completed=base + segment_s)
        latencies[target.name] += lat
        errors[target.name] += err
        elapsed[target.name] += secs
    result: dict[str, Any] = {
        "concurrency": cfg.concurrency,
        "seconds_per_target": cfg.duration_s,
        "segments": [t.name for t in order],
    }
    for target in targets:
        stats = summarise(latencies[target.name])
        stats["requests_per_s"] = len(latencies[target.name]) / elapsed[target.name]
        stats["errors"] = errors[target.name]
        result[target.name] = stats
    result["added"] = {key: result["gateway"][key] - result["direct"][key] for key in ("p50_ms", "p99_ms")}
    result["ratio_requests_per_s"] = result["gateway"]["requests_per_s"] / result["direct"]["requests_per_s"]
    if cpu_known and latencies["gateway"]:
        result["gateway_cpu_us_per_request"] = gateway_cpu / len(latencies["gateway"]) * 1e6
    return result


async def measure(stack: Stack, cfg: Config, gateway_pid: int) -> dict[str, Any]:
    direct = Target(
        "direct", f"http://127.0.0.1:{stack.mock_port}/v1/chat/completions", {"Content-Type": "application/json"}
    )
    gateway = Target(
        "gateway",
        f"http://127.0.0.1:{stack.gateway_port}/v1/chat/completions",
        {"Content-Type": "application/json", "Authorization": f"Bearer {stack.api_key}"},
    )
    targets = (direct, gateway)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=30)
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        results["checks"] = await checks(session, direct, gateway)
        with progress_bar() as progress:
            results["sequential_nonstream"] = await sequential(
                session, targets, False, cfg, progress, "sequential, non-stream (requests)", gateway_pid
            )
            results["sequential_stream"] = await sequential(
                session, targets, True, cfg, progress, "sequential, stream (requests)", gateway_pid
            )
            tenancy = Target(
                "tenancy",
                gateway.url,
                {"Content-Type": "application/json", "Authorization": f"Bearer {stack.tenancy_key}"},
                model=TENANCY_ALIAS,
            )
            results["tenancy_nonstream"] = await sequential(
                session, (gateway, tenancy), False, cfg, progress, "tenancy + quotas on vs off (requests)", gateway_pid
            )
            results["concurrent"] = await concurrent(
                session, targets, cfg, progress, f"concurrent C={cfg.concurrency} (seconds)", gateway_pid
            )
    return results


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.overhead",
        description="Measure the latency and throughput loragate adds in front of a mock upstream.",
    )
    parser.add_argument("-n", "--requests", type=int, default=500, help="Sequential requests per target per run.")
    parser.add_argument("--warmup", type=int, default=50, help="Warm-up requests per target before sequential runs.")
    parser.add_argument("--repeats", type=int, default=3, help="Sequential runs; medians are reported.")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="Concurrent clients.")
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="Seconds of concurrent load per target.")
    parser.add_argument(
        "--segments",
        type=int,
        default=2,
        help="Concurrent load is split into this many segments per target, alternating.",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("requests", "repeats", "concurrency", "segments"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.duration <= 0:
        parser.error("--warmup must be >= 0 and --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = Config(args.requests, args.warmup, args.repeats, args.concurrency, args.duration, args.segments)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started = time.monotonic()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    stack = Stack(workdir, extra_env)

    def body() -> None:
        with console.status("starting redis-server, mock upstream and gateway"):
            stack.start_redis()
            stack.start_mock()
            gateway = stack.start_gateway()
            stack.create_key()
            stack.create_tenancy_key()
        console.print(
            f"redis :{stack.redis_port}, mock :{stack.mock_port}, gateway :{stack.gateway_port} "
            f"(pid {gateway.proc.pid}); logs in {workdir}"
        )
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            results = runner.run(measure(stack, cfg, gateway.proc.pid))
        if gateway.proc.poll() is not None:
            raise BenchError(f"the gateway exited during the run:\n{tail(gateway.log)}")
        report = {
            **report_header("loadtest.overhead", stack, argv, load_before),
            "versions": versions(),
            "config": {
                "requests": cfg.requests,
                "warmup": cfg.warmup,
                "repeats": cfg.repeats,
                "concurrency": cfg.concurrency,
                "duration_s": cfg.duration_s,
                "segments": cfg.segments,
                "gateway_env": extra_env,
            },
            **results,
            "wall_s": round(time.monotonic() - started, 1),
        }
        publish(args.output_dir, "overhead", report, markdown, print_summary)

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
