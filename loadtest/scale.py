"""Scale curves against a mock upstream: routing and `/v1/models` by registry size, saturation by processes.

1. **Versions**: for each size (10, 1,000, 10,000 versions spread across 100 tenants) one adapter store,
   filled through the registry's own API (`AdapterStore.add`: validated, hashed, manifest written; one
   tiny rank-1 synthetic adapter as the source of every version, several processes at once), its own
   mock vLLM (loadtest/routing.py's, with runtime LoRA loading) and its own `loragate serve`, all on one
   Redis. Two tenants are measured: `scale-000` holds its even share of the versions (1, 10, 100) and
   `scale-001` always one. Each key sends, one at a time and every target in a new random order per request slot, a chat
   completion naming one of its adapters by its bare name and `GET /v1/models`: p50 / p95 per size, and
   p50 at the largest size minus p50 at the smallest (target: at most +0.05 ms) with a paired bootstrap
   interval and the median of rounds.
2. **Processes**: `loragate serve` with LORAGATE_WORKERS 1, 2 and 4 (recording on, the default; a tenant
   with request and token quotas that never refuse, calling the base through an alias), each in a closed
   loop at a concurrency, repeated in alternating order: requests/s, scaling over 1 process, p99, CPU per
   request (the gateway's process tree: workers and record processes).

Results: loadtest/results/scale.json, scale.md and scale.png.

    .venv/bin/python -m loadtest.scale                     # the defaults, about 3-4 minutes on 2 cores
    .venv/bin/python -m loadtest.scale --rounds 2 --requests 50 --saturation-s 2 --repeats 1   # quicker
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.tenants import TenantStore
from loadtest import scale_report
from loadtest.load import LoadResult, Target, chat_bodies, closed_loop, sequential
from loadtest.metrics import metric_sum, parse_prometheus
from loadtest.reports import publish, report_header, versions
from loadtest.runner import console, event_loop_factory, parse_config, run_and_clean_up
from loadtest.scale_report import FIXED, SHARE, target_name
from loadtest.services import MODEL, TENANCY_ALIAS, BenchError, Service, Stack, free_port

ROUTED = "a0"
"""The adapter every chat request names (bare: its latest version)."""
METRICS_KEY = "scale-bench-metrics-key"


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = field(default=(10, 1_000, 10_000), metadata={"help": "Adapter versions per store."})
    tenants: int = field(default=100, metadata={"help": "Tenants the versions are spread across."})
    per_name: int = field(default=10, metadata={"help": "Versions per adapter name."})
    rounds: int = field(default=5, metadata={"help": "Rounds; each sends --requests to every target, shuffled."})
    requests: int = field(default=200, metadata={"help": "Requests per target per round."})
    warmup: int = field(default=30, metadata={"help": "Warm-up requests per target."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the interval."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    workers: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "LORAGATE_WORKERS to saturate."})
    concurrency: int = field(default=64, metadata={"help": "Closed-loop clients for saturation."})
    saturation_s: float = field(default=5.0, metadata={"help": "Seconds of closed-loop load per target per repeat."})
    repeats: int = field(default=3, metadata={"help": "Saturation repeats (the order alternates)."})
    users: int = field(default=1000, metadata={"help": "Distinct end users (`user`) the requests cycle through."})
    jobs: int = field(default=os.cpu_count() or 1, metadata={"help": "Processes registering versions."})

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 2 or self.tenants < 3:
            raise ValueError("sizes must be at least 2 versions each, tenants at least 3")
        if min(self.per_name, self.rounds, self.requests, self.bootstrap, self.concurrency, self.repeats) < 1:
            raise ValueError("counts must be at least 1")
        if not self.workers or min(self.workers) < 1 or self.saturation_s <= 0 or self.warmup < 0 or self.jobs < 1:
            raise ValueError("workers >= 1, saturation-s > 0, warmup >= 0, jobs >= 1")


# -- registering versions: the store's own API, several processes at once -----------------------


def tenant_name(index: int) -> str:
    return f"scale-{index:03d}"


def spread(total: int, tenants: int) -> list[int]:
    """Versions per tenant: SHARE its even share (at least 1), FIXED one, the rest round-robin over the others."""
    counts = [0] * tenants
    counts[0], counts[1] = max(1, total // tenants), 1
    for i in range(max(0, total - counts[0] - 1)):
        counts[2 + i % (tenants - 2)] += 1
    return counts


def base_spec() -> BaseModelSpec:
    """A base model as small as an adapter can fit: one 8x8 projection (the mock never reads the weights)."""
    return BaseModelSpec(MODEL, "LlamaForCausalLM", frozenset({MODEL}), {"model.layers.0.self_attn.q_proj": (8, 8)})


def register(root: Path, tenant: str, count: int, per_name: int, source: Path) -> int:
    """`count` versions of the tenant: names a0, a1, ... with `per_name` versions each."""
    store, base = AdapterStore(root / tenant, tenant), base_spec()
    for i in range(count):
        store.add(source, f"a{i // per_name}", base, max_rank=8)
    return count


def register_all(stack: Stack, cfg: Config) -> dict[int, float]:
    """Fill one store per size; seconds each took (the sizes run one after the other, tenants in parallel)."""
    source = make_adapter(stack.workdir / "source", base_spec(), seed=1, rank=1, targets=("q_proj",))
    took = {}
    with ProcessPoolExecutor(max_workers=cfg.jobs) as pool:
        for size in cfg.sizes:
            started = time.perf_counter()
            root = home(stack, size) / "adapters"
            counts = spread(size, cfg.tenants)
            jobs = [pool.submit(register, root, tenant_name(i), n, cfg.per_name, source) for i, n in enumerate(counts)]
            if sum(job.result() for job in jobs) != size:
                raise BenchError(f"registered the wrong number of versions for {size}")
            took[size] = time.perf_counter() - started
            console.print(f"registered {size:,} versions in {took[size]:.1f} s")
    return took


def home(stack: Stack, size: int) -> Path:
    return stack.workdir / f"home-v{size}"


# -- set-up: processes, tenants, keys -------------------------------------------------------------


async def create_tenants(redis_port: int | None, count: int) -> None:
    redis = aioredis.from_url(f"redis://127.0.0.1:{redis_port}/0", decode_responses=True)
    try:
        store = TenantStore(redis)
        existing = set(await store.names())
        for i in range(count):
            if tenant_name(i) not in existing:
                await store.create(tenant_name(i))
    finally:
        await redis.aclose()


def start_mock(stack: Stack, name: str) -> Service:
    """loadtest/routing.py's mock vLLM (runtime LoRA loads, /v1/models) on its own port."""
    port = free_port()
    command = [sys.executable, "-c", f"from loadtest.routing import serve_mock; serve_mock({port})"]
    return stack.start_http(name, command, port, "/health")


def start_version_gateways(stack: Stack, cfg: Config) -> tuple[dict[int, Service], list[Service]]:
    """One mock and one gateway per size (its home, `home-vSIZE`, holds that size's store); gateways and mocks."""
    gateways, mocks = {}, []
    for size in cfg.sizes:
        mocks.append(start_mock(stack, f"mock-v{size}"))
        env = {"LORAGATE_ENGINE_URLS": mocks[-1].url, "LORAGATE_LOG_LEVEL": "warning"}
        gateways[size] = stack.start_named_gateway(f"v{size}", env)
    return gateways, mocks


def set_up(stack: Stack, cfg: Config) -> dict[str, Any]:
    """Redis, the plain mock (saturation's upstream), tenants, stores, keys; the seconds registering took."""
    stack.start_redis()
    stack.start_mock()
    asyncio.run(create_tenants(stack.redis_port, cfg.tenants))
    took = register_all(stack, cfg)
    keys = {t: stack._loragate("keys", "create", "--tenant", t, "--name", "scale")[-1] for t in (SHARE, FIXED)}
    stack.create_tenancy_key("scale-quotas")
    return {"register_s": took, "keys": keys}


# -- 1. routing and /v1/models by registry size ---------------------------------------------------


def version_targets(gateways: dict[int, Service], keys: dict[str, str], cfg: Config) -> dict[str, Target]:
    """For each size and measured tenant: a chat completion naming its adapter `a0`, and GET /v1/models."""
    targets = {}
    for size, gateway in gateways.items():
        for tenant, key in keys.items():
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            chat, models = target_name("chat", tenant, size), target_name("models", tenant, size)
            url = f"{gateway.url}/v1/chat/completions"
            targets[chat] = Target(chat, url, headers, chat_bodies(ROUTED, cfg.users), pid=gateway.proc.pid)
            targets[models] = Target(models, f"{gateway.url}/v1/models", headers, [b""], gateway.proc.pid, "GET")
    return targets


async def check_versions(session: aiohttp.ClientSession, targets: dict[str, Target], cfg: Config) -> dict[str, Any]:
    """The chat request is served by a0's latest version, and /v1/models lists the base, every name and
    every version of the tenant: nothing less, nothing of another tenant. Returns the cards per target."""
    cards = {}
    for size in cfg.sizes:
        counts = spread(size, cfg.tenants)
        for tenant, held in ((SHARE, counts[0]), (FIXED, counts[1])):
            chat, models = targets[target_name("chat", tenant, size)], targets[target_name("models", tenant, size)]
            async with session.post(chat.url, data=chat.body(), headers=chat.headers) as resp:
                served = (await resp.json(content_type=None)).get("model")
            if resp.status != 200 or served != f"{ROUTED}@{min(held, cfg.per_name)}":
                raise BenchError(f"{chat.name}: HTTP {resp.status}, served by {served!r}")
            async with session.get(models.url, headers=models.headers) as resp:
                ids = [card["id"] for card in (await resp.json(content_type=None)).get("data", [])]
            expected = 1 + -(-held // cfg.per_name) + held
            if resp.status != 200 or len(ids) != expected or any("/" in i for i in ids):
                raise BenchError(f"{models.name}: HTTP {resp.status}, {len(ids)} cards, expected {expected}")
            cards[models.name] = len(ids)
    return cards


async def measure_versions(targets: dict[str, Target], cfg: Config) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Checks, warm-up, then `rounds` rounds of sequential requests over every target: ms per round."""
    ordered = list(targets.values())
    latencies: dict[str, list[list[float]]] = {name: [] for name in targets}
    shuffle = random.Random(cfg.seed)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        cards = await check_versions(session, targets, cfg)
        with console.status(f"warm-up: {cfg.warmup} requests per target"):
            await sequential(session, ordered, cfg.warmup)
        for r in range(cfg.rounds):
            with console.status(f"round {r + 1}/{cfg.rounds}: {cfg.requests} requests to each of {len(ordered)}"):
                results = await sequential(session, ordered, cfg.requests, shuffle)
            for name, result in results.items():
                failed(name, result)
                latencies[name].append([x * 1000 for x in result.latencies_s])
    return {"cards": cards}, latencies


def failed(name: str, result: LoadResult) -> None:
    if result.errors:
        raise BenchError(f"{name}: {result.errors} failed requests, the first: {result.first_error}")


# -- 3. saturation by gateway processes -------------------------------------------------------------


def start_process_gateways(stack: Stack, cfg: Config) -> dict[str, Service]:
    """`loragate serve` with each worker count: recording on (the default), /metrics behind a key."""
    env = {"LORAGATE_LOG_LEVEL": "warning", "LORAGATE_METRICS_KEY": METRICS_KEY}
    with console.status(f"starting gateways with {', '.join(map(str, cfg.workers))} processes"):
        return {f"w{n}": stack.start_named_gateway(f"w{n}", {**env, "LORAGATE_WORKERS": str(n)}) for n in cfg.workers}


async def gateway_metrics(session: aiohttp.ClientSession, gateway: Service) -> dict[str, float]:
    """From its /metrics (every process added up): records written and quota refusals."""
    headers = {"Authorization": f"Bearer {METRICS_KEY}"}
    async with session.get(f"{gateway.url}/metrics", headers=headers) as resp:
        samples = parse_prometheus(await resp.text())
    return {
        "requests": metric_sum(samples, "loragate_requests_total"),
        "records_written": metric_sum(samples, "loragate_records_written_total"),
        "quota_refusals": metric_sum(samples, "loragate_quota_refusals_total"),
    }


async def measure_processes(
    stack: Stack, gateways: dict[str, Service], mock: Service, cfg: Config
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Closed loop on the mock alone (the client's ceiling) and on each gateway, `repeats` times in
    alternating order; each run's summary, and each gateway's /metrics at the end."""
    plain = {"Content-Type": "application/json"}
    keyed = {**plain, "Authorization": f"Bearer {stack.tenancy_key}"}
    targets = {"direct": Target("direct", f"{mock.url}/v1/chat/completions", plain, chat_bodies(MODEL, cfg.users))}
    targets["direct"].pid = mock.proc.pid
    for name, gateway in gateways.items():
        url = f"{gateway.url}/v1/chat/completions"
        targets[name] = Target(name, url, keyed, chat_bodies(TENANCY_ALIAS, cfg.users), pid=gateway.proc.pid)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for target in targets.values():  # a short burst reaches every worker before anything is counted
            failed(target.name, await closed_loop(session, target, max(cfg.concurrency // 4, 1), 1.0))
        for rep in range(cfg.repeats):
            order = list(targets) if rep % 2 == 0 else list(reversed(targets))
            for name in order:
                label = f"repeat {rep + 1}/{cfg.repeats}: {cfg.concurrency} clients for {cfg.saturation_s:g} s: {name}"
                with console.status(label):
                    result = await closed_loop(session, targets[name], cfg.concurrency, cfg.saturation_s)
                failed(name, result)
                runs[name].append(result.summary())
                await asyncio.sleep(1)
        seen = {name: await gateway_metrics(session, gateway) for name, gateway in gateways.items()}
    return runs, seen


# -- entry point ----------------------------------------------------------------------------------


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    """Both parts, one after the other (the version gateways are stopped before saturation)."""
    with console.status("starting redis-server and the mock; 100 tenants; registering versions"):
        setup = set_up(stack, cfg)
    mock = stack.services[-1]
    mock.port = stack.mock_port
    with console.status("starting a mock and a gateway per registry size"):
        gateways, mocks = start_version_gateways(stack, cfg)
    keys = setup.pop("keys")
    counts = {size: spread(size, cfg.tenants) for size in cfg.sizes}
    setup["held"] = {t: {str(size): counts[size][i] for size in cfg.sizes} for i, t in enumerate((SHARE, FIXED))}
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        checks, latencies = runner.run(measure_versions(version_targets(gateways, keys, cfg), cfg))
        for service in [*gateways.values(), *mocks]:
            if service.proc.poll() is not None:
                raise BenchError(f"{service.name} exited during the run")
            stack.stop_service(service)
        saturating = start_process_gateways(stack, cfg)
        runs, seen = runner.run(measure_processes(stack, saturating, mock, cfg))
    return {
        **setup,
        **checks,
        "versions": scale_report.analyse_versions(latencies, cfg.sizes, cfg.bootstrap, cfg.seed),
        "processes": scale_report.analyse_processes(runs, seen),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_config("python -m loadtest.scale", __doc__.splitlines()[0], Config, argv)
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-scale-"))
    stack = Stack(workdir, dict(item.split("=", 1) for item in args.gateway_env))

    def body() -> None:
        results = run(stack, cfg)
        report = {
            **report_header("loadtest.scale", stack, argv, load_before),
            "versions": versions(),
            "config": {**asdict(cfg), "gateway_env": args.gateway_env},
            "results": results,
            "plot": os.path.relpath(args.output_dir / "scale.png"),
            "wall_s": round(time.monotonic() - started, 1),
        }
        publish(args.output_dir, "scale", report, scale_report.markdown, scale_report.print_summary)
        scale_report.plot(report, args.output_dir / "scale.png")

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
