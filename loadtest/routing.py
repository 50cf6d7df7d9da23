"""What routing through an experiment costs: the same requests to a plain alias and to an experiment alias.

Target: an alias that points at an experiment (`experiment:NAME`) adds at most 0.1 ms at p50 over a
plain alias to a version. One run starts a throw-away redis-server, a mock vLLM that also takes runtime
LoRA loads (loadtest/mock_upstream.py plus /v1/load_lora_adapter) and one `loragate serve`; creates one
tenant with a key, two versions of a synthetic adapter (`helper@1`, `helper@2`), the alias `plain` ->
`helper@1` and the experiment `split` behind the alias `split` (control `helper@1` 90, treatment
`helper@2` 10). It then sends small non-stream chat requests one at a time to three targets: the base
model by name, `plain` and `split`, each request with its own `user` (so the split hashes a new end user
every time); within a round the three take turns in rotating order, and rounds repeat, so drift in
machine load hits all three alike. It reports p50 / p95 per target, the added p50 of `split` over
`plain` (pooled, per round, and a paired bootstrap interval) and the in-process cost of
`Router.resolve` per target. Results: loadtest/results/routing.json, routing.md and routing.png.

    .venv/bin/python -m loadtest.routing                      # the defaults (part of `make bench`)
    .venv/bin/python -m loadtest.routing --rounds 3 --requests 200   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis.asyncio as aioredis
from aiohttp import web
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adapters.registry import Registry
from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.experiments import ExperimentStore
from gateway.pointers import PointerStore
from gateway.routing import Router
from loadtest import mock_upstream
from loadtest import overhead as oh
from loadtest.runner import parse_config

TENANT = "routing"
ADAPTER = "helper"
EXPERIMENT = "split"
TARGETS = {"base": oh.MODEL, "plain": "plain", "split": "split"}
"""Target name -> the `model` its requests name."""
TARGET_ADDED_MS = 0.1
MESSAGES = [{"role": "user", "content": "Say hi."}]


@dataclass(frozen=True)
class Config:
    rounds: int = field(default=10, metadata={"help": "Rounds; each sends --requests to every target, interleaved."})
    requests: int = field(default=400, metadata={"help": "Requests per target per round."})
    warmup: int = field(default=100, metadata={"help": "Warm-up requests per target before the first round."})
    treatment: float = field(default=10.0, metadata={"help": "Treatment arm's weight in percent (control: the rest)."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the interval of the added p50."})
    resolve_calls: int = field(default=20_000, metadata={"help": "In-process Router.resolve calls per target."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})

    def __post_init__(self) -> None:
        if min(self.rounds, self.requests, self.bootstrap, self.resolve_calls) < 1 or self.warmup < 0:
            raise ValueError("counts must be at least 1 (--warmup at least 0)")
        if not 0 < self.treatment < 100:
            raise ValueError("--treatment must be between 0 and 100 (exclusive)")


# -- the mock vLLM, with runtime LoRA loading ---------------------------------------------------


def mock_app() -> web.Application:
    """The overhead benchmark's mock, plus what the gateway asks of vLLM to serve adapters: runtime loads
    and unloads, and /v1/models listing what is loaded (with `parent`, like vLLM)."""
    loaded: dict[str, str] = {}

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        loaded[str(body["lora_name"])] = str(body["lora_path"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        name = str((await request.json())["lora_name"])
        return web.Response(text="Success") if loaded.pop(name, None) else web.Response(status=404)

    async def models(_: web.Request) -> web.Response:
        cards = [{"id": oh.MODEL, "object": "model", "root": oh.MODEL, "parent": None}]
        cards += [{"id": name, "object": "model", "root": path, "parent": oh.MODEL} for name, path in loaded.items()]
        return web.json_response({"object": "list", "data": cards})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", mock_upstream.chat_completions)
    app.router.add_get("/health", mock_upstream.health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    return app


def serve_mock(port: int) -> None:
    loop = (oh.event_loop_factory() or asyncio.new_event_loop)()
    web.run_app(mock_app(), host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


# -- set-up: processes, tenant, adapters, aliases, experiment ---------------------------------


def write_adapters(stack: oh.Stack) -> list[str]:
    """Two versions of a tiny synthetic adapter, straight into the gateway's store (no base model needed:
    the mock never reads them; the gateway checks their sha256 once before its first load)."""
    shapes = {f"model.layers.0.self_attn.{p}": (64, 64) for p in ("q_proj", "v_proj")}
    base = BaseModelSpec(oh.MODEL, "LlamaForCausalLM", frozenset({oh.MODEL}), shapes)
    store = AdapterStore(stack.workdir / "home" / "adapters" / TENANT, TENANT)
    refs = []
    for seed in (1, 2):
        folder = make_adapter(stack.workdir / f"raw-{seed}", base, seed=seed, rank=8)
        refs.append(store.add(folder, ADAPTER, base, max_rank=8).ref)
    return refs


def start(stack: oh.Stack, cfg: Config) -> oh.Service:
    """Redis, the mock and the gateway up, the tenant ready; returns the gateway."""
    stack.start_redis()
    stack.mock_port = oh.free_port()
    command = [sys.executable, "-c", f"from loadtest.routing import serve_mock; serve_mock({stack.mock_port})"]
    stack._wait_http(stack._spawn("mock", command), f"http://127.0.0.1:{stack.mock_port}/health")
    gateway = stack.start_gateway()
    control, treatment = write_adapters(stack)
    stack._loragate("tenants", "create", TENANT, "--exist-ok")
    stack.api_key = stack._loragate("keys", "create", "--tenant", TENANT, "--name", "routing")[-1]
    stack._loragate("aliases", "set", "plain", control, "--tenant", TENANT)
    stack._loragate(
        "experiments", "create", EXPERIMENT, "--tenant", TENANT, "--alias", "split",
        "--arm", f"control={control}:{100 - cfg.treatment:g}", "--arm", f"treatment={treatment}:{cfg.treatment:g}",
    )  # fmt: skip
    return gateway


# -- the client ---------------------------------------------------------------------------------


def body(model: str, user: str) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 16, "user": user}).encode()


async def timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str], data: bytes) -> tuple[float, str]:
    """One request read to its end: (seconds, the arm that served or '')."""
    started = time.perf_counter()
    async with session.post(url, data=data, headers=headers) as resp:
        raw = await resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise oh.BenchError(f"HTTP {resp.status}: {raw[:300].decode(errors='replace')}")
        return elapsed, resp.headers.get("x-loragate-arm", "")


async def check(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> dict[str, str]:
    """Every target answers with the version it should; waits (10 s at most) until the gateway has seen
    the experiment (it polls the state version). Returns target -> the model that answered."""
    deadline = time.monotonic() + 10
    served: dict[str, str] = {}
    for name, model in TARGETS.items():
        while True:
            async with session.post(url, data=body(model, "check"), headers=headers) as resp:
                answer = await resp.json(content_type=None)
                arm = resp.headers.get("x-loragate-arm")
            if resp.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if resp.status != 200 or (name == "split") != (arm is not None):
            raise oh.BenchError(f"{name} ({model}) answered {resp.status}, arm {arm!r}: {answer}")
        served[name] = str(answer.get("model"))
    if served["plain"] != f"{ADAPTER}@1":
        raise oh.BenchError(f"`plain` was served by {served['plain']}, not {ADAPTER}@1")
    return served


class Client:
    """One keep-alive session to the gateway, sending each target in turn, in rotating order (each target
    goes first, second and third equally often)."""

    def __init__(self, session: aiohttp.ClientSession, stack: oh.Stack) -> None:
        self.session = session
        self.url = f"http://127.0.0.1:{stack.gateway_port}/v1/chat/completions"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.api_key}"}
        self.orders = itertools.cycle(itertools.permutations(TARGETS))
        self.arms: dict[str, int] = {}

    async def round(self, label: str, count: int, progress: Progress, keep: bool = True) -> dict[str, list[float]]:
        """`count` request slots, each a request to every target for a new end user: latencies in ms."""
        ticker = oh.Ticker(progress, progress.add_task(label, total=count * len(TARGETS)))
        samples: dict[str, list[float]] = {name: [] for name in TARGETS}
        for i in range(count):
            user = f"{label}-{i}"
            for name in next(self.orders):
                seconds, arm = await timed(self.session, self.url, self.headers, body(TARGETS[name], user))
                samples[name].append(seconds * 1000)
                if arm and keep:
                    self.arms[arm] = self.arms.get(arm, 0) + 1
                ticker.tick()
        ticker.flush()
        return samples


async def measure(stack: oh.Stack, cfg: Config) -> tuple[dict[str, Any], dict[str, list[list[float]]]]:
    """Checks, warm-up, then `rounds` rounds: latencies per target per round (ms), arms seen, served models."""
    latencies: dict[str, list[list[float]]] = {name: [] for name in TARGETS}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        client = Client(session, stack)
        served = await check(session, client.url, client.headers)
        with Progress(*columns, console=oh.console, refresh_per_second=4) as progress:
            await client.round("warm-up", cfg.warmup, progress, keep=False)
            for r in range(cfg.rounds):
                samples = await client.round(f"round {r + 1}/{cfg.rounds}", cfg.requests, progress)
                for name in TARGETS:
                    latencies[name].append(samples[name])
    return {"served": served, "arms": client.arms}, latencies


# -- what resolving costs, in this process --------------------------------------------------------


async def resolve_costs(stack: oh.Stack, calls: int, chunk: int = 500) -> dict[str, float]:
    """Median microseconds of one `Router.resolve` per target (caches warm, a new end user each call),
    over chunks of `chunk` calls that take turns between the targets."""
    redis = aioredis.from_url(f"redis://127.0.0.1:{stack.redis_port}/0", decode_responses=True)
    try:
        registry = Registry(stack.workdir / "home" / "adapters")
        router = Router(oh.MODEL, registry, PointerStore(redis), ExperimentStore(redis))
        per_call: dict[str, list[float]] = {name: [] for name in TARGETS}
        for model in TARGETS.values():
            await router.resolve(model, TENANT, "warm")
        for start_at in range(0, calls, chunk):
            users = [f"resolve-{n}" for n in range(start_at, min(start_at + chunk, calls))]
            for name, model in TARGETS.items():
                started = time.perf_counter_ns()
                for user in users:
                    await router.resolve(model, TENANT, user)
                per_call[name].append((time.perf_counter_ns() - started) / len(users) / 1000)
        return {name: statistics.median(values) for name, values in per_call.items()}
    finally:
        await redis.aclose()


# -- statistics -----------------------------------------------------------------------------------


def stats(values: np.ndarray) -> dict[str, float]:
    p50, p95, p99 = (float(x) for x in np.percentile(values, [50, 95, 99]))
    return {"count": int(values.size), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": float(values.mean())}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> list[float]:
    """95% interval of p50(b) - p50(a), resampling the rounds' request slots (a[i] and b[i] were sent
    side by side, so they are resampled together)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for done in range(0, resamples, 100):
        idx = rng.integers(0, a.size, size=(min(100, resamples - done), a.size))
        diffs.append(np.median(b[idx], axis=1) - np.median(a[idx], axis=1))
    low, high = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return [float(low), float(high)]


def analyse(latencies: dict[str, list[list[float]]], cfg: Config) -> dict[str, Any]:
    pooled = {name: np.array([x for run in runs for x in run]) for name, runs in latencies.items()}
    result: dict[str, Any] = {name: stats(values) for name, values in pooled.items()}
    result["rounds"] = [
        {name: stats(np.array(latencies[name][r])) for name in TARGETS} for r in range(len(latencies["base"]))
    ]
    for label, low, high in (("split_over_plain", "plain", "split"), ("plain_over_base", "base", "plain")):
        per_round = [r[high]["p50_ms"] - r[low]["p50_ms"] for r in result["rounds"]]
        result[label] = {
            "p50_ms": result[high]["p50_ms"] - result[low]["p50_ms"],
            "p95_ms": result[high]["p95_ms"] - result[low]["p95_ms"],
            "p50_ms_per_round": per_round,
            "p50_ms_median_of_rounds": statistics.median(per_round),
            "p50_ms_interval_95": paired_bootstrap(pooled[low], pooled[high], cfg.bootstrap, cfg.seed),
        }
    added = result["split_over_plain"]
    added["target_ms"] = TARGET_ADDED_MS
    added["target_met"] = added["p50_ms"] <= TARGET_ADDED_MS
    added["target_met_with_95_confidence"] = added["p50_ms_interval_95"][1] <= TARGET_ADDED_MS
    return result


# -- report ---------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    m, cfg, res, load = report["machine"], report["config"], report["results"], report["load_average_before"]
    added, alias, us = res["split_over_plain"], res["plain_over_base"], report["resolve_us"]
    verdict = "**PASS**" if added["target_met"] else "**FAIL**"
    lines = [
        "# Routing through an experiment alias",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {m['cores']} cores ({m['cpu_model']}), Python {m['python']}; load average before "
        f"{load[0]:.2f}, after {report['load_average_after'][0]:.2f}",
        f"- One gateway (`{' '.join(report['gateway_command'])}`), real Redis, a mock vLLM that answers at once; "
        f"tenant `{TENANT}`: `plain` -> `{ADAPTER}@1`, `split` -> experiment `{EXPERIMENT}` (control "
        f"`{ADAPTER}@1` {100 - cfg['treatment']:g}, treatment `{ADAPTER}@2` {cfg['treatment']:g}).",
        f"- {cfg['rounds']} rounds x {cfg['requests']} sequential non-stream chat requests per target (after "
        f"{cfg['warmup']} warm-up), the three targets in rotating order, a new `user` for each request slot.",
        "",
        "| Target | `model` | p50 ms | p95 ms | p99 ms | mean ms | requests |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in TARGETS.items():
        figures = " | ".join(f"{res[name][k]:.3f}" for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"))
        lines.append(f"| {name} | `{model}` | {figures} | {res[name]['count']} |")
    low, high = added["p50_ms_interval_95"]
    rounds = ", ".join(f"{x:+.3f}" for x in added["p50_ms_per_round"])
    lines += [
        "",
        f"**Added p50, split over plain: {added['p50_ms']:+.3f} ms** (95% paired bootstrap interval "
        f"[{low:+.3f}, {high:+.3f}]; median of rounds {added['p50_ms_median_of_rounds']:+.3f}); target at most "
        f"+{TARGET_ADDED_MS} ms: {verdict}"
        + ("" if added["target_met_with_95_confidence"] == added["target_met"] else " (the interval straddles it)"),
        "",
        f"- Added p50 per round (ms): {rounds}",
        f"- Added p95, split over plain: {added['p95_ms']:+.3f} ms; plain alias over the base by name: p50 "
        f"{alias['p50_ms']:+.3f} ms, p95 {alias['p95_ms']:+.3f} ms",
        f"- Arms that served `split`: {', '.join(f'{k} {v}' for k, v in sorted(report['arms'].items()))}",
        f"- `Router.resolve` in-process, median per call (us): base {us['base']:.1f}, plain {us['plain']:.1f}, "
        f"split {us['split']:.1f} (split - plain {us['split'] - us['plain']:+.1f} us)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], latencies: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    pooled = {name: np.sort(np.array([x for run in runs for x in run])) for name, runs in latencies.items()}
    for name, values in pooled.items():
        a.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{name} (p50 {np.median(values):.3f} ms)")
    a.set_xlim(min(v[0] for v in pooled.values()), max(np.percentile(v, 90) for v in pooled.values()))
    a.axhline(0.5, color="grey", linewidth=0.5)
    a.set(xlabel="latency (ms)", ylabel="fraction of requests", title="Latency CDF per target (to p90)")
    a.legend(fontsize=8)
    res = report["results"]
    for label in ("split_over_plain", "plain_over_base"):
        per_round = res[label]["p50_ms_per_round"]
        b.plot(range(1, len(per_round) + 1), per_round, "o-", label=label.replace("_", " "))
    b.axhline(TARGET_ADDED_MS, color="red", linestyle="--", label="target (split over plain)")
    b.axhline(0, color="grey", linewidth=0.5)
    b.set(xlabel="round", ylabel="added p50 (ms)", title="Added p50 per round")
    b.legend(fontsize=8)
    fig.suptitle(f"loragate experiment routing: {report['machine']['cores']} cores, {report['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    added = report["results"]["split_over_plain"]
    low, high = added["p50_ms_interval_95"]
    verdict = "[green]PASS[/green]" if added["target_met"] else "[red]FAIL[/red]"
    oh.console.print(
        f"[bold]split over plain[/bold] p50 {added['p50_ms']:+.3f} ms [{low:+.3f}, {high:+.3f}] "
        f"(target <= +{TARGET_ADDED_MS} ms): {verdict}; plot in {report['plot']}"
    )


# -- entry point ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    return parse_config("python -m loadtest.routing", __doc__.splitlines()[0], Config, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-routing-"))
    stack = oh.Stack(workdir, extra_env)

    def body() -> None:
        with oh.console.status("starting redis-server, the mock and the gateway; tenant, adapters, experiment"):
            gateway = start(stack, cfg)
        oh.console.print(f"redis :{stack.redis_port}, mock :{stack.mock_port}, gateway :{stack.gateway_port}")
        with asyncio.Runner(loop_factory=oh.event_loop_factory()) as runner:
            seen, latencies = runner.run(measure(stack, cfg))
            with oh.console.status("timing Router.resolve in this process"):
                resolve_us = runner.run(resolve_costs(stack, cfg.resolve_calls))
        if gateway.proc.poll() is not None:
            raise oh.BenchError(f"the gateway exited during the run:\n{oh.tail(gateway.log)}")
        report = {
            **oh.report_header("loadtest.routing", stack, argv, load_before),
            "versions": oh.versions(),
            "config": {**asdict(cfg), "gateway_env": extra_env},
            **seen,
            "results": analyse(latencies, cfg),
            "resolve_us": resolve_us,
            "plot": os.path.relpath(args.output_dir / "routing.png"),
            "wall_s": round(time.monotonic() - started, 1),
        }
        plot(report, latencies, args.output_dir / "routing.png")
        oh.publish(args.output_dir, "routing", report, markdown, print_summary)

    return oh.run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
