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
import json
import math
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

# Names with `as` are re-exported: records.py, retraining.py and routing.py reach them here (`oh.free_port`).
from loadtest.metrics import cpu_seconds, median_of, summarise
from loadtest.reports import machine as machine
from loadtest.reports import publish, report_header, versions
from loadtest.reports import write_atomic as write_atomic
from loadtest.runner import add_common_arguments, console, event_loop_factory, run_and_clean_up
from loadtest.runner import command_line as command_line
from loadtest.services import MODEL, TENANCY_ALIAS, BenchError, Stack, tail
from loadtest.services import REPO as REPO
from loadtest.services import Service as Service
from loadtest.services import free_port as free_port

# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Write one friendly sentence greeting a new user of our service."},
]


def request_body(stream: bool, model: str = MODEL) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 64, "temperature": 0.7}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]
    model: str = MODEL
    """The `model` its requests name (an alias, for the tenancy target)."""


async def call(session: aiohttp.ClientSession, target: Target, body: bytes, stream: bool) -> tuple[float, float]:
    """One request read to its end: (time to first body byte, time to last byte), in seconds."""
    started = time.perf_counter()
    async with session.post(target.url, data=body, headers=target.headers) as resp:
        if stream:
            first = 0.0
            end = b""
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.perf_counter()
                end = (end + chunk)[-32:]
            done = time.perf_counter()
            if resp.status == 200 and not end.endswith(b"data: [DONE]\n\n"):
                raise BenchError(f"{target.name}: stream did not end with [DONE]: {end!r}")
        else:
            raw = await resp.read()
            done = first = time.perf_counter()
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace") if stream else raw.decode(errors="replace")
            raise BenchError(f"{target.name} answered HTTP {resp.status}: {text[:300]}")
    return first - started, done - started


async def checks(session: aiohttp.ClientSession, direct: Target, gateway: Target) -> dict[str, Any]:
    """Make sure both targets answer as expected before timing them."""
    out: dict[str, Any] = {}
    sent_id = "loadtest-check"
    body = request_body(False)
    async with session.post(direct.url, data=body, headers={**direct.headers, "X-Request-Id": sent_id}) as resp:
        data = await resp.json()
        if resp.status != 200 or data.get("id") != f"chatcmpl-{sent_id}":
            raise BenchError(f"mock upstream answered {resp.status}: {data}")
    async with session.post(gateway.url, data=body, headers={**gateway.headers, "X-Request-Id": sent_id}) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise BenchError(f"gateway answered HTTP {resp.status}: {data}")
        header_id = resp.headers.get("x-request-id")
        out["gateway_response_id_matches_x_request_id"] = data.get("id") == f"chatcmpl-{header_id}"
        out["gateway_propagates_client_x_request_id"] = data.get("id") == f"chatcmpl-{sent_id}"
        if not out["gateway_response_id_matches_x_request_id"]:
            raise BenchError(f"gateway id {data.get('id')!r} does not match its x-request-id {header_id!r}")
    async with session.post(gateway.url, data=body, headers={"Content-Type": "application/json"}) as resp:
        out["gateway_without_key_status"] = resp.status
        await resp.read()
        if resp.status != 401:
            raise BenchError(f"gateway without a key answered HTTP {resp.status}, expected 401")
    async with session.post(gateway.url, data=request_body(True), headers=gateway.headers) as resp:
        raw = await resp.read()
        events = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
        out["gateway_stream_events"] = len(events)
        if resp.status != 200 or events[-1:] != [b"data: [DONE]"]:
            raise BenchError(f"gateway stream answered {resp.status}: {raw[-300:]!r}")
    return out


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


class Ticker:
    """Advances a progress bar in batches, so drawing costs the client next to nothing."""

    def __init__(self, progress: Progress, task: TaskID, every: int = 50) -> None:
        self.progress, self.task, self.every, self.pending = progress, task, every, 0

    def tick(self) -> None:
        self.pending += 1
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.progress.advance(self.task, self.pending)
            self.pending = 0


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
    base, other = (target.name for target in targets)
    task = progress.add_task(label, total=(cfg.warmup + cfg.requests * cfg.repeats) * 2)
    ticker = Ticker(progress, task)
    for _ in range(cfg.warmup):
        for target in targets:
            await call(session, target, bodies[target.name], stream)
            ticker.tick()
    runs = []
    for _ in range(cfg.repeats):
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
        runs.append(run)
    ticker.flush()

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


async def load_segment(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    concurrency: int,
    duration_s: float | None,
    count: int | None = None,
) -> tuple[list[float], int, float]:
    """`concurrency` clients in a loop until the time is up (or `count` requests each)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s if duration_s else math.inf

    async def client() -> None:
        nonlocal errors
        done = 0
        while time.perf_counter() < deadline and (count is None or done < count):
            done += 1
            try:
                latencies.append((await call(session, target, body, False))[1])
            except (TimeoutError, BenchError, aiohttp.ClientError):
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


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
        columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, refresh_per_second=4) as progress:
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
# Reporting
# --------------------------------------------------------------------------------------------


def ms(value: float, signed: bool = False) -> str:
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    m = report["machine"]
    seq, stream, conc = report["sequential_nonstream"], report["sequential_stream"], report["concurrent"]
    load = report["load_average_before"]
    lines = [
        "# Gateway overhead",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), {m['platform']}, Python {m['python']}; "
        f"load average before the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- Command: `{report['command']}`",
        f"- Gateway: `{' '.join(report['gateway_command'])}` (LORAGATE_ENGINE_URLS = the mock), "
        f"uvicorn {report['versions'].get('uvicorn', '?')}, fastapi {report['versions'].get('fastapi', '?')}",
        "- Upstream: `loadtest/mock_upstream.py` (aiohttp, answers at once). Client: one aiohttp session, "
        "keep-alive. Client, gateway, mock and redis share the same machine.",
        f"- Sequential: {cfg['repeats']} runs x {cfg['requests']} requests per target (after {cfg['warmup']} "
        "warm-up), direct and gateway alternating; each figure is the median of the runs.",
        f"- Concurrent: {cfg['concurrency']} clients, {cfg['duration_s']:g} s per target in "
        f"{cfg['segments'] * 2} alternating segments ({', '.join(conc['segments'])}).",
        "",
        "## Latency (ms)",
        "",
        "| Scenario | Direct p50 | Gateway p50 | Added p50 | Direct p99 | Gateway p99 | Added p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, direct: dict[str, float], gateway: dict[str, float]) -> str:
        return (
            f"| {name} | {ms(direct['p50_ms'])} | {ms(gateway['p50_ms'])} | "
            f"{ms(gateway['p50_ms'] - direct['p50_ms'], True)} | {ms(direct['p99_ms'])} | "
            f"{ms(gateway['p99_ms'])} | {ms(gateway['p99_ms'] - direct['p99_ms'], True)} |"
        )

    def added_row(name: str, section: dict[str, Any], direct: dict[str, float], gateway: dict[str, float]) -> str:
        # sequential: the median over runs of (gateway - direct), which can differ slightly from
        # the difference of the medians shown next to it
        added = section["added"]
        return (
            f"| {name} | {ms(direct['p50_ms'])} | {ms(gateway['p50_ms'])} | {ms(added['p50_ms'], True)} | "
            f"{ms(direct['p99_ms'])} | {ms(gateway['p99_ms'])} | {ms(added['p99_ms'], True)} |"
        )

    lines.append(added_row("Sequential, non-stream", seq, seq["direct"], seq["gateway"]))
    lines.append(row("Sequential, stream: first byte", stream["direct"]["first_byte"], stream["gateway"]["first_byte"]))
    lines.append(added_row("Sequential, stream: last byte", stream, stream["direct"], stream["gateway"]))
    lines.append(row(f"Concurrent (C={conc['concurrency']}), non-stream", conc["direct"], conc["gateway"]))
    tenancy = report.get("tenancy_nonstream")
    if tenancy:
        lines += [
            "",
            "## Tenancy and quotas (ms)",
            "",
            "The same gateway, two keys, alternating request by request: a tenant without limits calling the base "
            "model by name (the serving core: auth from the cache, no Redis call), and a tenant with request and "
            "token quotas calling it through an alias (auth, namespace, alias, one quota Lua script per request).",
            "",
            "| Scenario | Core p50 | Tenancy + quotas p50 | Added p50 | Core p99 | Tenancy + quotas p99 | Added p99 |",
            "|---|---:|---:|---:|---:|---:|---:|",
            added_row("Sequential, non-stream", tenancy, tenancy["gateway"], tenancy["tenancy"]),
        ]
    lines += [
        "",
        "## Throughput (requests/s)",
        "",
        "| Scenario | Direct | Gateway | Gateway / direct | Gateway CPU per request |",
        "|---|---:|---:|---:|---:|",
    ]

    def tput(name: str, section: dict[str, Any]) -> str:
        cpu = section.get("gateway_cpu_us_per_request")
        cpu_text = f"{cpu / 1000:.2f} ms" if cpu is not None else "n/a"
        return (
            f"| {name} | {section['direct']['requests_per_s']:.0f} | {section['gateway']['requests_per_s']:.0f} "
            f"| {section['ratio_requests_per_s']:.2f} | {cpu_text} |"
        )

    lines.append(tput("Sequential, non-stream", seq))
    lines.append(tput("Sequential, stream", stream))
    lines.append(tput(f"Concurrent (C={conc['concurrency']}), non-stream", conc))
    per_run = ", ".join(ms(x, True) for x in seq["added"]["p50_ms_per_run"])
    per_run_stream = ", ".join(ms(x, True) for x in stream["added"]["p50_ms_per_run"])
    lines += [
        "",
        f"Added p50 in each run: non-stream {per_run} ms; stream {per_run_stream} ms. "
        f"Median of paired differences (same request index): non-stream "
        f"{ms(seq['added']['paired_p50_ms'], True)} ms, stream {ms(stream['added']['paired_p50_ms'], True)} ms.",
        f"Concurrent errors: direct {conc['direct']['errors']}, gateway {conc['gateway']['errors']}.",
        'Sequential "Added" is the median over runs of (gateway - direct), so it can differ slightly from '
        "the difference of the two medians next to it. Sequential requests/s is 1 / mean latency of one "
        "client. Gateway CPU per request is the gateway process's user+system CPU time during the phase "
        "divided by the requests it served.",
        "",
    ]
    return "\n".join(lines)


def print_summary(report: dict[str, Any]) -> None:
    seq, stream, conc = report["sequential_nonstream"], report["sequential_stream"], report["concurrent"]
    console.print(
        f"[bold]added latency[/bold] non-stream p50 {ms(seq['added']['p50_ms'], True)} ms, "
        f"p99 {ms(seq['added']['p99_ms'], True)} ms; stream (last byte) p50 {ms(stream['added']['p50_ms'], True)} ms, "
        f"p99 {ms(stream['added']['p99_ms'], True)} ms"
    )
    console.print(
        f"[bold]concurrent C={conc['concurrency']}[/bold] direct {conc['direct']['requests_per_s']:.0f} req/s, "
        f"gateway {conc['gateway']['requests_per_s']:.0f} req/s (x{conc['ratio_requests_per_s']:.2f}); "
        f"p50 {ms(conc['direct']['p50_ms'])} -> {ms(conc['gateway']['p50_ms'])} ms"
    )


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
