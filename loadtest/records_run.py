"""The records benchmark's run (loadtest.records): (1) the `Recorder` in this process, (2) requests/s through a
gateway with recording off vs on, (3) feedback latency by durability; its targets and the gateways it starts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest import mock

import aiohttp
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from rich.progress import Progress, TaskID

from gateway import keys, native
from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.records import LogPolicy
from gateway.redaction import Redactor
from gateway.routing import Route
from gateway.spool import Spool
from gateway.tenants import Tenant
from loadtest.metrics import cpu_seconds, machine_busy_seconds, summarise, tree_cpu_seconds
from loadtest.mock_upstream import completion_body
from loadtest.overhead_client import Target, load_segment
from loadtest.services import MODEL, BenchError, Service

if TYPE_CHECKING:
    from loadtest.records import Config, RecordsStack

TENANT = "loadtest"
METRICS_KEY = "records-bench-metrics-key"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_KEY}"}
TARGET_EVENTS_S, TARGET_DROP, TARGET_LOGGED = 20_000, 0.05, 0.99
TURNS = 8
CONVERSATIONS = f"redaction on, {TURNS}-turn chats"
"""The recorder run whose requests are turns of conversations, each carrying the turns before it."""
POLICIES = {
    "redaction on": LogPolicy(max_records=10_000_000),
    "redaction off": LogPolicy(redact=[], max_records=10_000_000),
    "content off": LogPolicy(content=False, max_records=10_000_000),
    CONVERSATIONS: LogPolicy(max_records=10_000_000),
}
BASELINE = ("plain", "redaction off")
"""The recorder run the others are divided by."""
Call = Callable[[aiohttp.ClientSession, int], Awaitable[tuple[float, int]]]


# -- 1. the recorder, in this process ----------------------------------------------------------

SYSTEM = "You are the support assistant of Acme Cloud. Answer politely and briefly; never invent prices."
ANSWER = (
    "Thanks for reaching out! I can see order {i} in our system. It was shipped on March 3rd and should "
    "arrive within five business days. If the tracking page still shows no update tomorrow, reply to this "
    "message and we will open an investigation with the carrier. Is there anything else I can help with?"
)


def user_text(conversation: int, turn: int) -> str:
    """A customer's message; the first of one conversation in ten carries an e-mail address and a phone number."""
    if turn:
        return f"Thanks. It is day {turn + 5} now and order {conversation} is still not here. What else can I do?"
    c = conversation
    text = f"Hi, my order {c} from last week has not arrived yet and the tracking page shows nothing. "
    if c % 10 == 0:
        return text + f"Please reach me at jane.doe{c}@example.com or +44 20 7946 0{c % 1000:03d}."
    return text + "Could you check what happened and tell me when it will be delivered?"


def chat_payload(i: int, turns: int = 1) -> dict[str, Any]:
    """A chat request (about 200 characters of messages; one in ten with an e-mail and a phone number). With `turns`,
    request i is turn i % turns of conversation i // turns, carrying the turns before it, as chat applications send
    a conversation: the system prompt, each earlier message and answer, the new message."""
    conversation, turn = divmod(i, turns)
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turn + 1):
        messages.append({"role": "user", "content": user_text(conversation, t)})
        if t < turn:
            messages.append({"role": "assistant", "content": ANSWER.format(i=conversation)})
    user = f"user-{conversation % 500}"
    return {"model": MODEL, "messages": messages, "max_tokens": 256, "temperature": 0.7, "user": user}


def contexts(variant: str, n: int) -> list[RequestContext]:
    """N finished chat requests with vLLM-shaped whole answers (about 300 characters), as the gateway has them."""
    tenant = Tenant(name="-".join(["bench", *re.findall(r"[a-z0-9]+", variant)]), logging=POLICIES[variant])
    route = Route(requested=MODEL, upstream_model=MODEL, served_model=MODEL)
    turns = TURNS if variant == CONVERSATIONS else 1
    out = []
    for i in range(n):
        request_id = f"{tenant.name}-{i:07d}"
        payload = chat_payload(i, turns)
        ctx = RequestContext(request_id, "chat", tenant, "key-bench", payload=payload, route=route)
        ctx.validated = True
        ctx.sent = json.dumps(ctx.payload, separators=(",", ":")).encode()  # as the gateway forwards it
        body = completion_body(request_id, MODEL, 60)
        body["choices"][0]["message"]["content"] = ANSWER.format(i=i // turns)
        ctx.answer.body = json.dumps(body, separators=(",", ":")).encode()
        ctx.finish(200)
        out.append(ctx)
    return out


async def record_all(
    stack: RecordsStack, mode: str, variant: str, n: int, workers: int, progress: Progress, task: TaskID
) -> dict[str, Any]:
    """Time record() of N contexts + waiting until written (by `workers` record processes, as
    `LORAGATE_RECORD_WORKERS`); check that all N are in the stream."""
    batch, metrics = contexts(variant, n), Metrics()
    redis = aioredis.Redis.from_url(stack.redis_url(mode), decode_responses=True)
    spool = Spool(stack.workdir / "spool", fsync=False)
    spool.open()
    recorder = Recorder(  # as the gateway runs it: its record process writes too
        redis, spool, metrics, max_queued=max(n, 100_000), workers=workers, redis_url=stack.redis_url(mode)
    )
    done = progress.tasks[task].completed

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.25)
            written = metrics.registry.get_sample_value("loragate_records_written_total") or 0
            progress.update(task, completed=done + written)

    ticker = asyncio.create_task(tick())
    try:
        await recorder.start()  # its record process: the CPU below is this process's and that one's
        await asyncio.sleep(1.5)  # ... once it has imported what it needs
        cpu, redis_cpu, started = (
            tree_cpu_seconds(os.getpid()),
            cpu_seconds(stack.redis_pid(mode)) or 0,
            time.perf_counter(),
        )
        running = asyncio.create_task(recorder.run())
        for ctx in batch:
            recorder.record(ctx)
        await recorder.written()
        await recorder.stop()
        await running
        seconds = time.perf_counter() - started
        cpu, redis_cpu = tree_cpu_seconds(os.getpid()) - cpu, (cpu_seconds(stack.redis_pid(mode)) or 0) - redis_cpu
        stream = keys.completion_log(batch[0].tenant.name)
        written = await redis.xlen(stream)
        first = json.loads((await redis.xrange(stream, count=1))[0][1]["r"]) if written else {}
    finally:
        ticker.cancel()
        await recorder.close()
        await redis.flushall()
        await redis.aclose()
        spool.close()
    if recorder.degraded or written != n:
        raise BenchError(f"{mode} Redis, {variant}: {written} records in {stream}, expected {n}")
    if variant.startswith("redaction on") and first["redactions"] != {"email": 1, "phone": 1}:
        raise BenchError(f"request 0's e-mail and phone number were not redacted: {first['redactions']}")
    progress.update(task, completed=done + n)
    return {"events": n, "seconds": seconds, "events_per_s": n / seconds, "cpu_us_per_event": cpu / n * 1e6} | {
        "redis_cpu_us_per_event": redis_cpu / n * 1e6
    }


PYTHON_ROW = f", record process as Python ({native.OFF}=0)"


async def recorder_bench(stack: RecordsStack, cfg: Config, progress: Progress) -> dict[str, Any]:
    Redactor().redact("+44 20 7946 0958")  # the phone library loads its metadata on first use: not in the timing
    runs: list[tuple[str, str, int, bool]] = []
    for turn, mode in enumerate(("plain", "durable")):
        # The default policy with the record process compiled and, where it is, running the Python modules the
        # compiled ones are built from: side by side, the first of the two taking turns.
        pair = [(mode, "redaction on", 1, compiled) for compiled in (True, False)[: 1 + native.active()]]
        runs += pair[::-1] if turn % 2 else pair
        runs += [(mode, variant, 1, True) for variant in POLICIES if variant != "redaction on"]
        if cfg.record_workers > 1:  # the default policy again, its gateway process with several record processes
            runs.append((mode, "redaction on", cfg.record_workers, True))
    task = progress.add_task("1. recorder (events)", total=cfg.events * len(runs))
    results: dict[str, dict[str, Any]] = {"plain": {}, "durable": {}}
    for mode, variant, workers, compiled in runs:
        name = variant if workers == 1 else f"{variant}, {workers} record processes"
        name += "" if compiled else PYTHON_ROW
        with mock.patch.dict(os.environ, {} if compiled else {native.OFF: "0"}):  # for the record process it starts
            results[mode][name] = await record_all(stack, mode, variant, cfg.events, workers, progress, task)
    base = results[BASELINE[0]][BASELINE[1]]["events_per_s"]
    for run in (run for by_variant in results.values() for run in by_variant.values()):
        run["ratio_to_baseline"] = run["events_per_s"] / base
        run["target_met"] = run["events_per_s"] >= TARGET_EVENTS_S
    return {"baseline": list(BASELINE), "target_events_per_s": TARGET_EVENTS_S, "compiled": native.active(), **results}


# -- 2. gateway requests/s, recording off vs on
PAIRS = (("off", "on"), ("off-2", "on-2"))
"""Each side runs in two gateway processes, which take turns: two processes of one build differ by up to 3-4% in
requests/s between them (where each lands in memory; measured in runs taking turns), as much as the target allows."""


def side(name: str) -> str:
    """Which side a gateway process is of: "off" or "on"."""
    return name.split("-", 1)[0]


@dataclass
class Gateways:
    """The gateway processes the requests/s part loads: their targets and pids, the Redis servers' pids, the body
    every request sends."""

    session: aiohttp.ClientSession
    targets: dict[str, Target]
    pids: dict[str, int]
    redis_pids: list[int]
    body: bytes

    def redis_cpu(self) -> float:
        return sum(cpu_seconds(pid) or 0 for pid in self.redis_pids)


async def throughput(gateways: Gateways, cfg: Config, progress: Progress) -> dict[str, Any]:
    """At each concurrency: C clients in a closed loop, each side's two processes taking turns (ABBA...), a pair at a
    time. The drop is judged at the highest concurrency (the gateway's capacity: at 16 clients, recording on left it
    3-6% idle, waiting for answers from a mock and a client that shared the two cores with its record process and
    Redis); the others are reported beside it."""
    for target in gateways.targets.values():  # open the connections (client -> gateway -> upstream)
        await load_segment(gateways.session, target, gateways.body, max(cfg.concurrency), None, 5)
    task = progress.add_task("2. recording off/on (segments)", total=len(cfg.concurrency) * cfg.segments * 4)
    runs = []
    for concurrency in sorted(cfg.concurrency):
        runs.append(await throughput_at(gateways, cfg, concurrency, lambda: progress.advance(task)))
    judged = runs[-1]
    return {**judged, "by_concurrency": runs, "target_drop": TARGET_DROP, "target_met": judged["drop"] <= TARGET_DROP}


async def throughput_at(
    gateways: Gateways, cfg: Config, concurrency: int, advance: Callable[[], None]
) -> dict[str, Any]:
    """One concurrency: requests/s and CPU per request of each side (its processes together): the gateway
    processes', with their record processes, the Redis servers' and the whole machine's (the last two counted in its
    segments only)."""
    order = [name for k in range(cfg.segments) for pair in PAIRS for name in (pair if k % 2 else pair[::-1])]
    seconds = cfg.duration_s / (cfg.segments * len(PAIRS))
    pids = gateways.pids
    cpu = {name: cpu_seconds(pid) or 0 for name, pid in pids.items()}
    tree_cpu = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    shared = {kind: [0.0, 0.0] for kind in ("off", "on")}  # the Redis servers' and the machine's CPU in its segments
    runs: dict[str, list[tuple[list[float], int, float]]] = {name: [] for name in gateways.targets}
    for name in order:
        redis_before, machine_before = gateways.redis_cpu(), machine_busy_seconds()
        target = gateways.targets[name]
        runs[name].append(await load_segment(gateways.session, target, gateways.body, concurrency, seconds))
        shared[side(name)][0] += gateways.redis_cpu() - redis_before
        shared[side(name)][1] += machine_busy_seconds() - machine_before
        advance()
    result: dict[str, Any] = {"concurrency": concurrency, "seconds_per_target": cfg.duration_s, "order": order}
    for kind in ("off", "on"):
        names = [name for name in runs if side(name) == kind]
        segments = [seg for name in names for seg in runs[name]]
        latencies = [x for lat, _, _ in segments for x in lat]
        per_request, elapsed_s = 1e6 / max(len(latencies), 1), sum(seg[2] for seg in segments)
        own = sum((cpu_seconds(pids[name]) or 0) - cpu[name] for name in names)
        tree = sum(tree_cpu_seconds(pids[name]) - tree_cpu[name] for name in names)
        result[kind] = {**summarise(latencies), "errors": sum(seg[1] for seg in segments)}
        result[kind] |= {
            "requests_per_s": len(latencies) / elapsed_s,
            "per_process_requests_per_s": [
                sum(len(seg[0]) for seg in runs[name]) / sum(seg[2] for seg in runs[name]) for name in names
            ],
            "cpu_us_per_request": own * per_request,
            "tree_cpu_us_per_request": tree * per_request,
            "redis_cpu_us_per_request": shared[kind][0] * per_request,
            "machine_cpu_us_per_request": shared[kind][1] * per_request,
            "machine_busy": shared[kind][1] / (elapsed_s * (os.cpu_count() or 1)),
        }
    result["drop"] = 1 - result["on"]["requests_per_s"] / result["off"]["requests_per_s"]
    return result


async def logged(session: aiohttp.ClientSession, urls: list[str], redis_url: str) -> dict[str, Any]:
    """Requests the "on" gateways answered (their /metrics) and records in the tenant's log, once written."""
    answered = 0
    for url in urls:
        async with session.get(f"{url}/metrics", headers=METRICS_AUTH) as resp:
            families = text_string_to_metric_families(await resp.text())
        samples = [s for f in families if f.name == "loragate_requests" for s in f.samples]
        answered += int(sum(s.value for s in samples if s.name.endswith("_total")))
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while (count := await redis.xlen(keys.completion_log(TENANT))) < answered and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    ratio = count / max(answered, 1)
    return {"answered": answered, "records": count, "ratio": ratio, "target_met": ratio >= TARGET_LOGGED}


# -- 3. feedback latency, by durability
async def timed(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[float, int]:
    started = time.perf_counter()
    async with session.request(method, url, **kwargs) as resp:
        await resp.read()
    return time.perf_counter() - started, resp.status


async def completion_ids(session: aiohttp.ClientSession, base: str, headers: dict[str, str], n: int) -> list[str]:
    ids = []
    for i in range(n):
        async with session.post(f"{base}/v1/chat/completions", json=chat_payload(i), headers=headers) as resp:
            if resp.status != 200:
                raise BenchError(f"{base} answered HTTP {resp.status}: {(await resp.text())[:300]}")
            ids.append((await resp.json())["id"])
    return ids


def feedback_call(base: str, api_key: str, ids: list[str]) -> Call:
    """The i-th feedback POST through one gateway: a rating by end user i of one of `ids`."""
    headers = {"Authorization": f"Bearer {api_key}"}

    def call(session: aiohttp.ClientSession, i: int) -> Awaitable[tuple[float, int]]:
        body: dict[str, Any] = {"completion_id": ids[i % len(ids)], "user": f"rater-{i}", "score": 0.8}
        body |= {"thumbs": "up" if i % 3 else "down", "comment": "Clear and correct, it solved my problem. Thanks!"}
        return timed(session, "POST", f"{base}/v1/feedback", json=body, headers=headers)

    return call


async def feedback_bench(
    session: aiohttp.ClientSession, calls: dict[str, Call], cfg: Config, progress: Progress
) -> dict[str, Any]:
    """N calls per target one at a time (the targets taking turns), then N with C clients (ABCCBA halves)."""
    names, half = list(calls), cfg.feedback // 2
    samples: dict[str, dict[str, tuple[list[float], Counter[int]]]] = {
        phase: {name: ([], Counter()) for name in names} for phase in ("sequential", "concurrent")
    }
    task = progress.add_task("3. feedback (requests)", total=(cfg.feedback + half * 2) * len(names))

    async def run(phase: str, name: str, i: int) -> None:
        latency, status = await calls[name](session, i)
        samples[phase][name][0].append(latency)
        samples[phase][name][1][status] += 1
        progress.advance(task)

    for i in range(cfg.feedback):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            await run("sequential", name, i)
    for k, name in enumerate(names + names[::-1]):
        indices = iter(range(cfg.feedback + half * (k >= len(names)), cfg.feedback + half * (1 + (k >= len(names)))))

        async def client(name: str = name, indices: Iterator[int] = indices) -> None:
            for i in indices:  # shared by the clients: each takes the next one
                await run("concurrent", name, i)

        await asyncio.gather(*(client() for _ in range(cfg.feedback_concurrency)))
    out: dict[str, Any] = {"requests_per_target": cfg.feedback, "concurrency": cfg.feedback_concurrency}
    for phase, by_name in samples.items():
        out[phase] = {name: {**summarise(lat), "statuses": dict(st)} for name, (lat, st) in by_name.items()}
    out["durable_all_200"] = all(set(out[phase]["durable"]["statuses"]) == {200} for phase in samples)
    return out


# -- the run
def start_gateways(stack: RecordsStack, extra_env: dict[str, str]) -> dict[str, tuple[Service, int]]:
    """Five gateways on one mock and one Redis: recording off (two: PAIRS); on (two; records in the plain Redis, so
    feedback goes through the fsynced spool: 202); durable (records and feedback in the durable Redis: 200)."""
    stack.start_mock()
    envs: dict[str, dict[str, str]] = {
        **{off: {"LORAGATE_RECORD_COMPLETIONS": "false"} for off, _ in PAIRS},
        **{on: {} for _, on in PAIRS},
        "durable": {"LORAGATE_RECORDS_REDIS_URL": stack.redis_url("durable")},
    }
    started = {name: stack.spawn_gateway(name, {**env, **extra_env}) for name, env in envs.items()}
    stack._loragate("tenants", "create", TENANT, "--exist-ok")  # while they start
    stack._loragate("tenants", "logging", TENANT, "--max-records", "10000000")  # default policy otherwise
    stack.api_key = stack._loragate("keys", "create", "--tenant", TENANT, "--name", "records")[-1]
    for service, port in started.values():
        stack._wait_http(service, f"http://127.0.0.1:{port}/readyz")
    return started


async def gateway_benches(
    stack: RecordsStack, gateways: dict[str, tuple[Service, int]], cfg: Config, progress: Progress
) -> dict[str, Any]:
    urls = {name: f"http://127.0.0.1:{port}" for name, (_, port) in gateways.items()}
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        found = {}
        for name in ("on", "durable"):
            async with session.get(f"{urls[name]}/readyz?verbose=1", headers=METRICS_AUTH) as resp:
                found[name] = (await resp.json())["records"]["feedback_durability"]
        if found != {"on": "spool", "durable": "fsync-always"}:
            raise BenchError(f"feedback durability is {found}, expected spool (on) and fsync-always (durable)")
        json_headers = {**headers, "Content-Type": "application/json"}
        names = [name for pair in PAIRS for name in pair]
        loaded = Gateways(
            session,
            {name: Target(name, f"{urls[name]}/v1/chat/completions", json_headers) for name in names},
            {name: gateways[name][0].proc.pid for name in names},
            [server.pid or 0 for server in stack.redis_servers.values()],
            json.dumps(chat_payload(1)).encode(),
        )
        result: dict[str, Any] = {"feedback_durability": found, "throughput": await throughput(loaded, cfg, progress)}
        on = [urls[name] for name in names if side(name) == "on"]
        result["logged"] = await logged(session, on, stack.redis_url("plain"))
        ids = {name: await completion_ids(session, urls[name], headers, 50) for name in ("durable", "on")}
        calls: dict[str, Call] = {name: feedback_call(urls[name], stack.api_key or "", ids[name]) for name in ids}
        calls["healthz"] = lambda session, _i: timed(session, "GET", f"{urls['durable']}/healthz")
        result["feedback"] = await feedback_bench(session, calls, cfg, progress)
    return result
