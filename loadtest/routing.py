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
import redis.asyncio as aioredis
from rich.progress import Progress

from adapters.registry import Registry
from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.experiments import ExperimentStore
from gateway.pointers import PointerStore
from gateway.routing import Router
from loadtest import mock_upstream
from loadtest.reports import publish, report_header, versions
from loadtest.routing_report import ADAPTER, EXPERIMENT, TARGETS, TENANT, analyse, markdown, plot, print_summary
from loadtest.runner import Ticker, console, event_loop_factory, parse_config, progress_bar, run_and_clean_up
from loadtest.services import MODEL, BenchError, Service, Stack, free_port, tail

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


def mock_routes() -> mock_upstream.Routes:
    """The overhead benchmark's mock, plus what the gateway asks of vLLM to serve adapters: runtime loads
    and unloads, and /v1/models listing what is loaded (with `parent`, like vLLM)."""
    loaded: dict[str, str] = {}

    def load(request: mock_upstream.Request) -> list[bytes]:
        body = json.loads(request.body)
        loaded[str(body["lora_name"])] = str(body["lora_path"])
        text = f"Success: LoRA adapter '{body['lora_name']}' added successfully."
        return mock_upstream.response(200, text.encode(), mock_upstream.TEXT_TYPE)

    def unload(request: mock_upstream.Request) -> list[bytes]:
        name = str(json.loads(request.body)["lora_name"])
        found = loaded.pop(name, None) is not None
        return mock_upstream.response(200, b"Success", mock_upstream.TEXT_TYPE) if found else mock_upstream.NOT_FOUND

    def models(_: mock_upstream.Request) -> list[bytes]:
        cards = [{"id": MODEL, "object": "model", "root": MODEL, "parent": None}]
        cards += [{"id": name, "object": "model", "root": path, "parent": MODEL} for name, path in loaded.items()]
        return mock_upstream.json_response({"object": "list", "data": cards})

    return {
        **mock_upstream.ROUTES,
        (b"GET", b"/v1/models"): models,
        (b"POST", b"/v1/load_lora_adapter"): load,
        (b"POST", b"/v1/unload_lora_adapter"): unload,
    }


def serve_mock(port: int) -> None:
    mock_upstream.serve("127.0.0.1", port, mock_routes())


# -- set-up: processes, tenant, adapters, aliases, experiment ---------------------------------


def write_adapters(stack: Stack) -> list[str]:
    """Two versions of a tiny synthetic adapter, straight into the gateway's store (no base model needed:
    the mock never reads them; the gateway checks their sha256 once before its first load)."""
    shapes = {f"model.layers.0.self_attn.{p}": (64, 64) for p in ("q_proj", "v_proj")}
    base = BaseModelSpec(MODEL, "LlamaForCausalLM", frozenset({MODEL}), shapes)
    store = AdapterStore(stack.workdir / "home" / "adapters" / TENANT, TENANT)
    refs = []
    for seed in (1, 2):
        folder = make_adapter(stack.workdir / f"raw-{seed}", base, seed=seed, rank=8)
        refs.append(store.add(folder, ADAPTER, base, max_rank=8).ref)
    return refs


def start(stack: Stack, cfg: Config) -> Service:
    """Redis, the mock and the gateway up, the tenant ready; returns the gateway."""
    stack.start_redis()
    stack.mock_port = free_port()
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
            raise BenchError(f"HTTP {resp.status}: {raw[:300].decode(errors='replace')}")
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
            raise BenchError(f"{name} ({model}) answered {resp.status}, arm {arm!r}: {answer}")
        served[name] = str(answer.get("model"))
    if served["plain"] != f"{ADAPTER}@1":
        raise BenchError(f"`plain` was served by {served['plain']}, not {ADAPTER}@1")
    return served


class Client:
    """One keep-alive session to the gateway, sending each target in turn, in rotating order (each target
    goes first, second and third equally often)."""

    def __init__(self, session: aiohttp.ClientSession, stack: Stack) -> None:
        self.session = session
        self.url = f"http://127.0.0.1:{stack.gateway_port}/v1/chat/completions"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.api_key}"}
        self.orders = itertools.cycle(itertools.permutations(TARGETS))
        self.arms: dict[str, int] = {}

    async def round(self, label: str, count: int, progress: Progress, keep: bool = True) -> dict[str, list[float]]:
        """`count` request slots, each a request to every target for a new end user: latencies in ms."""
        ticker = Ticker(progress, progress.add_task(label, total=count * len(TARGETS)))
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


async def measure(stack: Stack, cfg: Config) -> tuple[dict[str, Any], dict[str, list[list[float]]]]:
    """Checks, warm-up, then `rounds` rounds: latencies per target per round (ms), arms seen, served models."""
    latencies: dict[str, list[list[float]]] = {name: [] for name in TARGETS}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        client = Client(session, stack)
        served = await check(session, client.url, client.headers)
        with progress_bar(14) as progress:
            await client.round("warm-up", cfg.warmup, progress, keep=False)
            for r in range(cfg.rounds):
                samples = await client.round(f"round {r + 1}/{cfg.rounds}", cfg.requests, progress)
                for name in TARGETS:
                    latencies[name].append(samples[name])
    return {"served": served, "arms": client.arms}, latencies


# -- what resolving costs, in this process --------------------------------------------------------


async def resolve_costs(stack: Stack, calls: int, chunk: int = 500) -> dict[str, float]:
    """Median microseconds of one `Router.resolve` per target (caches warm, a new end user each call),
    over chunks of `chunk` calls that take turns between the targets."""
    redis = aioredis.from_url(f"redis://127.0.0.1:{stack.redis_port}/0", decode_responses=True)
    try:
        registry = Registry(stack.workdir / "home" / "adapters")
        router = Router(MODEL, registry, PointerStore(redis), ExperimentStore(redis))
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


# -- entry point ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    return parse_config("python -m loadtest.routing", __doc__.splitlines()[0], Config, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-routing-"))
    stack = Stack(workdir, extra_env)

    def body() -> None:
        with console.status("starting redis-server, the mock and the gateway; tenant, adapters, experiment"):
            gateway = start(stack, cfg)
        console.print(f"redis :{stack.redis_port}, mock :{stack.mock_port}, gateway :{stack.gateway_port}")
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            seen, latencies = runner.run(measure(stack, cfg))
            with console.status("timing Router.resolve in this process"):
                resolve_us = runner.run(resolve_costs(stack, cfg.resolve_calls))
        if gateway.proc.poll() is not None:
            raise BenchError(f"the gateway exited during the run:\n{tail(gateway.log)}")
        report = {
            **report_header("loadtest.routing", stack, argv, load_before),
            "versions": versions(),
            "config": {**asdict(cfg), "gateway_env": extra_env},
            **seen,
            "results": analyse(latencies, cfg),
            "resolve_us": resolve_us,
            "plot": os.path.relpath(args.output_dir / "routing.png"),
            "wall_s": round(time.monotonic() - started, 1),
        }
        plot(report, latencies, args.output_dir / "routing.png")
        publish(args.output_dir, "routing", report, markdown, print_summary)

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
