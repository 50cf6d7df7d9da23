"""Soak: minutes of mixed traffic against one gateway and its real vLLM; is anything lost, does memory grow.

One run starts a throw-away redis-server and `loragate serve` (one process, with its record worker,
starting and supervising one vLLM on the CPU), makes several tenants, each with an inference key, a
manage key and a few small synthetic adapters, points one tenant's alias at an experiment (two arms),
and then for `--minutes` (10) sends, on a fixed schedule, requests through the real OpenAI SDK (async):
chat and text completions, streaming and not, to the base, adapters and the alias; posts feedback on a
share of the answers; and meanwhile uploads new versions of an adapter (admin API, manage key), sends
traffic to them and deletes older ones. Every few seconds it samples the RSS of the gateway's process
tree (the gateway and its record worker) and of vLLM's. At the end it checks that every answered
completion is in the log in Redis and every acknowledged rating is stored.

Writes loadtest/results/soak.{json,md,png}; stops every process it started, whatever happens.

    .venv/bin/python -m loadtest.soak            # 10 minutes of load, about 12 with start-up
    .venv/bin/python -m loadtest.soak --quick    # 1.5 minutes of load: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.engine import BASE_MODEL, DEFAULT_MODEL_CACHE, EngineOptions, EngineStack, vllm_servers
from loadtest.reports import publish, report_header, versions
from loadtest.runner import add_common_arguments, console, event_loop_factory, run_and_clean_up
from loadtest.scenarios import Scenario, summary
from loadtest.services import BenchError, free_port, tail
from loadtest.soak_report import markdown, memory_verdict, plot, print_summary, summarise_requests
from loadtest.soak_run import TARGETS, Soak

ALIAS, EXPERIMENT = "assistant", "tone"


@dataclass
class SoakConfig:
    minutes: float = 10.0
    rate: float = 1.5
    """Completion requests per second, on a fixed schedule (open loop)."""
    max_in_flight: int = 16
    """Past this many requests in flight a due request is skipped (and counted), so a slow machine
    does not queue without end."""
    tenants: int = 3
    adapters_per_tenant: int = 2
    rank: int = 8
    max_tokens: int = 12
    stream_share: float = 0.5
    completion_share: float = 0.25
    """Share of text completions (`/v1/completions`); the rest are chat."""
    feedback_share: float = 0.3
    churn_every_s: float = 40.0
    """A new version of one tenant's `churn` adapter every this many seconds; half a cycle later its
    oldest live version is deleted."""
    sample_every_s: float = 5.0
    flat_mib_per_h: float = 10.0
    """Memory is "flat" when the RSS slope over the second half of the run is below this."""
    timeout_s: float = 120.0
    users: int = 200
    seed: int = 0
    start_timeout_s: float = 600.0
    zipf_s: float = 0.0
    """Popularity of each tenant's models (base, adapters, alias, churn) in its traffic; 0: uniform."""

    def scenario(self) -> Scenario:
        return Scenario(
            stream_share=self.stream_share, completion_share=self.completion_share,
            feedback_share=self.feedback_share, zipf_s=self.zipf_s, max_tokens=self.max_tokens, users=self.users,
            seed=self.seed, timeout_s=self.timeout_s,
        )  # fmt: skip


QUICK = {"minutes": 1.5, "churn_every_s": 15.0}


@dataclass
class Tenant:
    name: str
    key: str
    manage_key: str
    models: list[str] = field(default_factory=list)
    """What its traffic calls: the base, its adapters, the alias of its experiment."""
    churn: list[int] = field(default_factory=list)
    """Live versions of its `churn` adapter, oldest first."""
    refs: list[str] = field(default_factory=list)
    """Its first adapters as `name@version`."""


# -- set-up: tenants and keys (CLI), adapters (admin API), the experiment (CLI)
def create_tenants(stack: EngineStack, cfg: SoakConfig) -> list[Tenant]:
    tenants = []
    for i in range(cfg.tenants):
        name = f"soak-{i}"
        # soak-0 has request and token quotas it never reaches: its requests take the quota path (leases, settling)
        limits = ["--rpm", "1000000", "--tpm", "10000000000"] if i == 0 else []
        stack._loragate("tenants", "create", name, *limits, "--exist-ok")
        key = stack._loragate("keys", "create", "--tenant", name, "--name", "soak")[-1]
        manage = stack._loragate("keys", "create", "--tenant", name, "--role", "manage", "--name", "soak-admin")[-1]
        tenants.append(Tenant(name, key, manage, models=[BASE_MODEL]))
    return tenants


def base_spec(model_cache: Path) -> Any:
    from adapters.base_model import is_prepared, prepared_dir
    from adapters.validate import BaseModelSpec

    folder = prepared_dir(model_cache)
    if not is_prepared(folder):
        raise BenchError(f"no prepared base model in {folder}; run `loragate model prepare` first")
    return BaseModelSpec.from_folder(folder, BASE_MODEL)


async def soak(stack: EngineStack, cfg: SoakConfig, tenants: list[Tenant], base: Any) -> dict[str, Any]:
    run = Soak(stack, cfg, tenants, base)
    try:
        await run.setup_adapters()
        first = tenants[0]
        stack._loragate("aliases", "set", ALIAS, first.refs[0], "--tenant", first.name)
        arms = [f"--arm=control={first.refs[0]}:50", f"--arm=treatment={first.refs[1]}:50"]
        stack._loragate("experiments", "create", EXPERIMENT, "--tenant", first.name, "--alias", ALIAS, *arms)
        first.models.append(ALIAS)
        await run.run()
        checks = await run.losses()
    finally:
        await run.close()
    timeline = run.timeline()
    errors = run.errors + run.load.errors
    return {
        "requests": summarise_requests(timeline, run.cfg.minutes * 60),
        "streams": summary(run.load.samples, run.cfg.minutes * 60),
        "skipped": run.skipped,
        "errors": dict(errors.most_common()),
        "error_samples": run.error_samples + run.load.error_samples,
        "checks": checks,
        "memory": memory_verdict(run.rss, cfg.flat_mib_per_h),
        "rss_samples": run.rss,
        "timeline": [list(s) for s in timeline],
        "models": {t.name: t.models for t in tenants},
    }


# -- entry point
def parse_args(argv: list[str]) -> argparse.Namespace:
    d = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=d.minutes, help="Minutes of load.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 1.5 minutes, a churn cycle every 15 s.")
    parser.add_argument("--rate", type=float, default=d.rate, help="Completion requests per second.")
    parser.add_argument("--max-in-flight", type=int, default=d.max_in_flight, help="Skip a due request past this.")
    parser.add_argument("--tenants", type=int, default=d.tenants, help="Tenants, each with its own keys.")
    parser.add_argument("--adapters", type=int, default=d.adapters_per_tenant, help="Adapters per tenant (>= 2).")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max_tokens of every request.")
    parser.add_argument("--churn-every", type=float, default=d.churn_every_s, help="Seconds per upload/delete cycle.")
    parser.add_argument("--flat-mib-per-h", type=float, default=d.flat_mib_per_h, help="Flatness threshold.")
    parser.add_argument("--seed", type=int, default=d.seed, help="Seed of the traffic.")
    parser.add_argument(
        "--zipf-s", type=float, default=d.zipf_s, help="Popularity of each tenant's models (0: uniform)."
    )
    parser.add_argument(
        "--model-cache", type=Path, default=DEFAULT_MODEL_CACHE, help="The prepared base model's folder."
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split("=", 1)[0] for a in argv}
        args.minutes = args.minutes if "--minutes" in given else QUICK["minutes"]
        args.churn_every = args.churn_every if "--churn-every" in given else QUICK["churn_every_s"]
    if min(args.minutes, args.rate, args.churn_every) <= 0 or min(args.tenants, args.max_in_flight) < 1:
        parser.error("--minutes, --rate and --churn-every must be > 0; --tenants and --max-in-flight >= 1")
    if args.adapters < 2:
        parser.error("--adapters must be at least 2 (the experiment's two arms)")
    return args


def config(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        minutes=args.minutes,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        tenants=args.tenants,
        adapters_per_tenant=args.adapters,
        max_tokens=args.max_tokens,
        churn_every_s=args.churn_every,
        flat_mib_per_h=args.flat_mib_per_h,
        seed=args.seed,
        zipf_s=args.zipf_s,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = config(args)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started, load_before, others = time.monotonic(), os.getloadavg(), len(vllm_servers())
    workdir = Path(tempfile.mkdtemp(prefix="loragate-soak-"))
    engine = EngineOptions(rank=cfg.rank, start_timeout_s=cfg.start_timeout_s)
    stack = EngineStack(workdir, extra_env, engine, args.model_cache)

    def body() -> None:
        base = base_spec(args.model_cache)
        stack.start_redis()
        with console.status("starting the gateway and its vLLM (about a minute or two)"):
            stack.gateway_port, stack.engine_port = free_port(), free_port()  # the CLI's settings need ports
            with ThreadPoolExecutor(1) as pool:
                made = pool.submit(create_tenants, stack, cfg)  # while vLLM starts
                gateway = stack.start_gateway()
                tenants = made.result()
        console.print(f"gateway :{stack.gateway_port} (pid {gateway.proc.pid}), vLLM :{stack.engine_port}; {workdir}")
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            results = runner.run(soak(stack, cfg, tenants, base))
        if gateway.proc.poll() is not None:
            raise BenchError(f"the gateway exited during the run:\n{tail(gateway.log)}")
        report = {
            **report_header("loadtest.soak", stack, argv, load_before),
            "versions": versions(),
            "config": {**asdict(cfg), "gateway_env": extra_env, "targets": list(TARGETS)},
            "other_vllm_servers_at_start": others,
            "other_vllm_servers_at_end": stack.other_vllm_servers(),
            "vllm_restarts": tail(gateway.log, 100000).count("restarting (restart"),
            **results,
            "wall_s": round(time.monotonic() - started, 1),
        }
        publish(args.output_dir, "soak", report, markdown, print_summary)
        plot(report, args.output_dir / "soak.png")

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
