"""loragate against LiteLLM's proxy and a bare pass-through, in one run, on the same fast mock upstream.

One run starts a throw-away redis-server and the mock upstream (loadtest/mock_upstream.py), sets up two
tenants, then for each worker count (1, then the number of cores) starts and measures five targets:

- `direct`: the mock itself, the baseline every "added" figure is taken against;
- `passthrough`: loadtest/passthrough.py, a bare Starlette + aiohttp proxy: the floor;
- `core`: loragate with everything off: a tenant without limits calling the base by name, no recording;
- `full`: loragate with everything on: API key, request and token quotas (one Lua script in Redis per
  request), an alias that runs an experiment (90/10, a new end user on every request), completion
  recording (the default);
- `litellm`: LiteLLM's proxy (`litellm --num_workers N`), installed into `.venv-litellm` from PyPI.

For each: added p50 and p99 over direct for sequential requests (all targets, in a new random order each
round), p99 at a fixed request rate (open loop, 200 requests/s), saturation requests/s (closed loop at high
concurrency) and the target's CPU time per request (its process tree). Results:
loadtest/results/compare.json, compare.md and compare.png, with PASS/FAIL for the targets.

    .venv/bin/python -m loadtest.compare            # the defaults (`make bench`), about 5 minutes
    .venv/bin/python -m loadtest.compare --quick    # a smoke run, about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from loadtest import compare_report, litellm
from loadtest.load import LoadResult, Target, chat_bodies, closed_loop, open_loop, sequential
from loadtest.metrics import metric_sum, parse_prometheus
from loadtest.reports import publish, report_header, versions
from loadtest.runner import add_common_arguments, console, event_loop_factory, run_and_clean_up
from loadtest.services import MODEL, BenchError, Service, Stack

FULL_TENANT, CORE_TENANT = "bench-full", "bench-core"
ALIAS, EXPERIMENT = "assistant", "ab"
METRICS_KEY = "compare-bench-metrics-key"
TARGETS = ("direct", "passthrough", "core", "full", "litellm")


@dataclass
class Config:
    """One comparison run. Every field has a default; `--quick` shrinks the measuring, not the set-up."""

    workers: tuple[int, ...] = field(default_factory=lambda: tuple(sorted({1, os.cpu_count() or 1})))
    """Worker counts to measure, each with every target (loragate: LORAGATE_WORKERS, LiteLLM: --num_workers)."""
    warmup: int = 50
    """Sequential warm-up rounds (one request to each target per round), not counted."""
    rounds: int = 400
    """Sequential rounds counted: one request to each target per round, in a new random order each round (`seed`).
    In a rotating order each target always follows the same one, and that moved its p50 by up to 0.06 ms: three
    identical gateways, one at a time after the mock, measured +0.42/+0.41/+0.48 ms so (the last always the
    slowest), +0.46/+0.46/+0.45 shuffled."""
    seed: int = 0
    """The shuffle's seed: the same orders in every run."""
    rate: float = 200.0
    """Open-loop requests per second."""
    open_s: float = 8.0
    """Seconds of open-loop load per target."""
    concurrency: int = 64
    """Closed-loop clients for saturation."""
    saturation_s: float = 6.0
    """Seconds of closed-loop load per target."""
    phase_rounds: int = 3
    """The open-loop and closed-loop phases are cut into this many segments per target, run in turns (always in
    the same order): a machine whose speed drifts during the run then slows every target alike, not the one
    measured at that moment. Each phase's figures pool its segments."""
    users: int = 1000
    """Distinct end users (`user`) the requests cycle through (the experiment assigns each)."""

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 1:
            raise ValueError("workers must be one or more counts >= 1")
        if min(self.rounds, self.concurrency, self.users, self.phase_rounds) < 1 or self.warmup < 0:
            raise ValueError("rounds, phase_rounds, concurrency and users must be >= 1, warmup >= 0")
        if min(self.rate, self.open_s, self.saturation_s) <= 0:
            raise ValueError("rate, open_s and saturation_s must be > 0")

    def quick(self) -> Config:
        return replace(self, warmup=20, rounds=100, open_s=2.0, saturation_s=2.0)


def set_up_tenants(stack: Stack) -> dict[str, str]:
    """Two tenants and their keys: `core` without limits, `full` with quotas and an experiment alias."""
    cli = stack._loragate
    cli("tenants", "create", CORE_TENANT, "--exist-ok")
    cli("tenants", "create", FULL_TENANT, "--rpm", "1000000000", "--tpm", "1000000000000", "--exist-ok")
    cli("aliases", "set", ALIAS, MODEL, "--tenant", FULL_TENANT)
    arms = ["--arm", f"control={MODEL}:90", "--arm", f"treatment={MODEL}:10"]
    cli("experiments", "create", EXPERIMENT, "--tenant", FULL_TENANT, "--alias", ALIAS, *arms)
    return {
        "core": cli("keys", "create", "--tenant", CORE_TENANT, "--name", "compare")[-1],
        "full": cli("keys", "create", "--tenant", FULL_TENANT, "--name", "compare")[-1],
    }


def start_targets(stack: Stack, cfg: Config, workers: int, keys: dict[str, str], mock: Service) -> dict[str, Target]:
    """Start pass-through, loragate (core, full) and LiteLLM with `workers` processes each; the five targets."""
    plain = {"Content-Type": "application/json"}

    def target(name: str, service: Service, key: str | None = None, model: str = MODEL) -> Target:
        headers = {**plain, "Authorization": f"Bearer {key}"} if key else plain
        url = f"{service.url}/v1/chat/completions"
        return Target(name, url, headers, chat_bodies(model, cfg.users), pid=service.proc.pid)

    env = {"LORAGATE_WORKERS": str(workers), "LORAGATE_LOG_LEVEL": "warning"}
    with console.status(f"starting the pass-through, two gateways and LiteLLM, {workers} worker(s) each"):
        passthrough = stack.start_passthrough(f"passthrough-w{workers}", workers)
        core = stack.start_named_gateway(f"core-w{workers}", {**env, "LORAGATE_RECORD_COMPLETIONS": "false"})
        full = stack.start_named_gateway(f"full-w{workers}", {**env, "LORAGATE_METRICS_KEY": METRICS_KEY})
        proxy = litellm.start(stack, f"litellm-w{workers}", workers)
    return {
        "direct": target("direct", mock),
        "passthrough": target("passthrough", passthrough),
        "core": target("core", core, keys["core"]),
        "full": target("full", full, keys["full"], model=ALIAS),
        "litellm": target("litellm", proxy, litellm.MASTER_KEY),
    }


async def check(session: aiohttp.ClientSession, targets: dict[str, Target]) -> dict[str, Any]:
    """Every target answers a chat completion; those with keys refuse a request without one; `full` names
    the experiment arm that served."""
    out: dict[str, Any] = {"unauthenticated_status": {}}
    for target in targets.values():
        async with session.post(target.url, data=target.body(), headers=target.headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200 or data.get("object") != "chat.completion" or not data.get("choices"):
                raise BenchError(f"{target.name} answered HTTP {resp.status}: {str(data)[:300]}")
            if target.name == "full":
                out["full_arm"] = resp.headers.get("x-loragate-arm")
                if out["full_arm"] not in ("control", "treatment"):
                    raise BenchError(f"full: no experiment arm in the answer's headers: {dict(resp.headers)}")
        if "Authorization" in target.headers:
            plain = {"Content-Type": "application/json"}
            async with session.post(target.url, data=target.body(), headers=plain) as resp:
                await resp.read()
                out["unauthenticated_status"][target.name] = resp.status
                # loragate must say 401; LiteLLM 1.108 answers 500 here (its error handler imports prisma)
                if resp.status == 200 or (target.name in ("core", "full") and resp.status != 401):
                    raise BenchError(f"{target.name} answered HTTP {resp.status} without a key, expected 401")
    return out


async def full_metrics(session: aiohttp.ClientSession, full: Target) -> dict[str, Any]:
    """What `full` did, by its own /metrics: requests by experiment arm, records written, quota refusals."""
    url = full.url.removesuffix("/v1/chat/completions") + "/metrics"
    async with session.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"}) as resp:
        samples = parse_prometheus(await resp.text())
    requests = "loragate_requests_total"
    return {
        "requests_by_arm": {arm: metric_sum(samples, requests, arm=arm) for arm in ("control", "treatment")},
        "records_written": metric_sum(samples, "loragate_records_written_total"),
        "quota_refusals": metric_sum(samples, "loragate_quota_refusals_total"),
    }


async def loaded_phases(
    session: aiohttp.ClientSession, ordered: list[Target], cfg: Config
) -> tuple[dict[str, LoadResult], dict[str, LoadResult]]:
    """The open-loop phase, then the closed-loop one, each in `cfg.phase_rounds` turns over the targets, in the same
    order every turn: LiteLLM last. It cannot keep up with the open loop's rate; a request the client gives up on
    (15 s) it still works through, and so does its background work, after its segment: that falls on the next
    turn's mock (direct: its own figures are no target's), not on a gateway under test. Each closed-loop segment
    is charged the CPU of the second after it too (a gateway's record process writing its last records)."""
    fixed: dict[str, list[LoadResult]] = {target.name: [] for target in ordered}
    saturated: dict[str, list[LoadResult]] = {target.name: [] for target in ordered}
    open_s, closed_s = cfg.open_s / cfg.phase_rounds, cfg.saturation_s / cfg.phase_rounds
    for turn in range(cfg.phase_rounds):
        for target in ordered:
            with console.status(f"open loop, {cfg.rate:g} requests/s, turn {turn + 1}: {target.name}"):
                fixed[target.name].append(await open_loop(session, target, cfg.rate, open_s))
                await asyncio.sleep(1)  # let a target that fell behind finish before the next one
    for turn in range(cfg.phase_rounds):
        for target in ordered:
            with console.status(f"closed loop, {cfg.concurrency} clients, turn {turn + 1}: {target.name}"):
                saturated[target.name].append(await closed_loop(session, target, cfg.concurrency, closed_s, 1.0))
    pooled = LoadResult.combined
    return {n: pooled(parts) for n, parts in fixed.items()}, {n: pooled(parts) for n, parts in saturated.items()}


def summaries(results: dict[str, LoadResult]) -> dict[str, dict[str, Any]]:
    return {name: result.summary() for name, result in results.items()}


async def measure(targets: dict[str, Target], cfg: Config) -> dict[str, Any]:
    """Checks, warm-up, then sequential, open-loop and closed-loop phases against every target."""
    ordered = [targets[name] for name in TARGETS]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        checks = await check(session, targets)
        with console.status("warming up (sequential, then a burst per target to reach every worker)"):
            await sequential(session, ordered, cfg.warmup)
            for target in ordered:
                await closed_loop(session, target, max(cfg.concurrency // 4, 1), 0.5)
        with console.status(f"sequential: {cfg.rounds} rounds over {len(ordered)} targets"):
            seq = summaries(await sequential(session, ordered, cfg.rounds, random.Random(cfg.seed)))
        fixed, saturated = await loaded_phases(session, ordered, cfg)
        checks["full_metrics"] = await full_metrics(session, targets["full"])
    opened, closed = summaries(fixed), summaries(saturated)
    per_target = {
        name: {
            "sequential": seq[name],
            "added_p50_ms": seq[name]["p50_ms"] - seq["direct"]["p50_ms"],
            "added_p99_ms": seq[name]["p99_ms"] - seq["direct"]["p99_ms"],
            "open_loop": opened[name],
            "saturation": closed[name],
        }
        for name in TARGETS
    }
    return {"checks": checks, "targets": per_target}


def run_groups(stack: Stack, cfg: Config) -> list[dict[str, Any]]:
    with console.status("starting redis-server and the mock upstream; tenants, keys, the experiment"):
        stack.start_redis()
        stack.start_mock()
        mock = stack.services[-1]
        mock.port = stack.mock_port
        keys = set_up_tenants(stack)
    groups = []
    for workers in cfg.workers:
        targets = start_targets(stack, cfg, workers, keys, mock)
        started = [service for service in stack.services if service is not mock]
        console.print(f"{workers} worker(s): " + ", ".join(f"{s.name} :{s.port}" for s in started))
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            result = runner.run(measure(targets, cfg))
        for service in started:
            if service.proc.poll() is not None:
                raise BenchError(f"{service.name} exited during the run")
            stack.stop_service(service)
        groups.append({"workers": workers, **result})
        compare_report.print_group(groups[-1])
    return groups


def parse_args(argv: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.compare",
        description="loragate (everything on, everything off) against LiteLLM's proxy and a bare pass-through, "
        "on one mock upstream, with 1 and N workers.",
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run: short phases (about 2 minutes).")
    parser.add_argument("--workers", type=int, nargs="+", default=list(defaults.workers), help="Worker counts.")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="Sequential rounds counted.")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="Open-loop requests/s.")
    parser.add_argument("--open-s", type=float, default=defaults.open_s, help="Open-loop seconds per target.")
    parser.add_argument("-c", "--concurrency", type=int, default=defaults.concurrency, help="Closed-loop clients.")
    parser.add_argument("--saturation-s", type=float, default=defaults.saturation_s, help="Closed-loop seconds.")
    parser.add_argument(
        "--phase-rounds", type=int, default=defaults.phase_rounds, help="Turns the open and closed loops are cut into."
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = Config(
            workers=tuple(args.workers),
            rounds=args.rounds,
            rate=args.rate,
            open_s=args.open_s,
            concurrency=args.concurrency,
            saturation_s=args.saturation_s,
            phase_rounds=args.phase_rounds,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return (cfg.quick() if args.quick else cfg), args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-compare-"))
    stack = Stack(workdir, dict(item.split("=", 1) for item in args.gateway_env))

    def body() -> None:
        litellm_version = litellm.ensure_installed()
        groups = run_groups(stack, cfg)
        report = {
            **report_header("loadtest.compare", stack, argv, load_before),
            "versions": {**versions(), "litellm": litellm_version},
            "config": {**asdict(cfg), "quick": args.quick, "gateway_env": args.gateway_env},
            "groups": groups,
            "wall_s": round(time.monotonic() - started, 1),
        }
        report["targets"] = compare_report.verdicts(report)
        publish(args.output_dir, "compare", report, compare_report.markdown, compare_report.print_summary)
        compare_report.plot(report, args.output_dir / "compare.png")

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
