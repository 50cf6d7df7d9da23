"""What recording costs: the completion log's writer, a gateway with recording on vs off, and feedback.

One run starts a plain and a `durable` redis-server (AOF, `appendfsync always`, as the records Redis
runs) with scripts/redis.sh, the mock upstream and three `loragate serve`, and measures, each figure
against a baseline taken in the same run:

1. the `Recorder`, in this process: N realistic chat records into each Redis, with the tenant's
   redaction on (all PII kinds), off, and content off: events/s (target >= 20,000);
2. C concurrent non-stream requests through a gateway with `LORAGATE_RECORD_COMPLETIONS=false` and
   one with it on (same mock, same Redis), ABBA segments: requests/s (target: at most 5% lower);
3. `POST /v1/feedback` latency where the records Redis fsyncs (200) and where it does not (the local
   fsynced spool, 202), sequential and concurrent, with `GET /healthz` as the floor.

Writes loadtest/results/records.{json,md,png}; stops every process it started, whatever happens.

    .venv/bin/python -m loadtest.records              # the defaults: about 2-3 minutes on 2 cores
    .venv/bin/python -m loadtest.records -n 2000 -d 2  # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gateway import keys
from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.records import LogPolicy
from gateway.redaction import Redactor
from gateway.routing import Route
from gateway.spool import Spool
from gateway.tenants import Tenant
from loadtest import overhead as oh
from loadtest.mock_upstream import completion_body

REDIS_SH = oh.REPO / "scripts" / "redis.sh"
TENANT = "loadtest"
METRICS_KEY = "records-bench-metrics-key"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_KEY}"}
TARGET_EVENTS_S, TARGET_DROP, TARGET_LOGGED = 20_000, 0.05, 0.99
POLICIES = {
    "redaction on": LogPolicy(max_records=10_000_000),
    "redaction off": LogPolicy(redact=[], max_records=10_000_000),
    "content off": LogPolicy(content=False, max_records=10_000_000),
}
BASELINE = ("plain", "redaction off")
"""The recorder run the others are divided by."""
Call = Callable[[aiohttp.ClientSession, int], Awaitable[tuple[float, int]]]


@dataclass
class Config:
    events: int
    duration_s: float
    segments: int
    concurrency: int
    feedback: int
    feedback_concurrency: int


# -- processes: redis-servers from scripts/redis.sh, several gateways
class RecordsStack(oh.Stack):
    """overhead.Stack with a plain and a durable redis-server (scripts/redis.sh) and several named gateways."""

    def __init__(self, workdir: Path, gateway_env: dict[str, str]) -> None:
        super().__init__(workdir, gateway_env)
        self.redis_ports: dict[str, int] = {}
        """"plain" (no persistence; keys, tenants, quotas) and "durable" (AOF, appendfsync always) -> port."""

    def redis_url(self, mode: str) -> str:
        return f"redis://127.0.0.1:{self.redis_ports[mode]}/0"

    def redis_pid(self, mode: str) -> int:
        pidfile = self.workdir / f"redis-{mode}" / "redis.pid"
        return int(pidfile.read_text().strip() or 0) if pidfile.exists() else 0

    def redis_sh(self, *args: str) -> None:
        command = ["bash", str(REDIS_SH), *args]
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)

    def start_redis_server(self, mode: str) -> None:
        port = self.redis_ports[mode] = oh.free_port()
        self.redis_sh("start", str(port), str(self.workdir / f"redis-{mode}"), *(["durable"] * (mode == "durable")))
        self.redis_port = self.redis_ports["plain"] if mode == "plain" else self.redis_port  # for gateway_env()

    def spawn_gateway(self, name: str, env: dict[str, str]) -> tuple[oh.Service, int]:
        self.gateway_port = port = oh.free_port()
        script = Path(sys.executable).with_name("loragate")
        self.gateway_command = [str(script), "serve"] if script.exists() else [sys.executable, "-m", "gateway", "serve"]
        home = str(self.workdir / f"home-{name}")
        full_env = {**self.gateway_env(), "LORAGATE_HOME": home, "LORAGATE_METRICS_KEY": METRICS_KEY, **env}
        return self._spawn(name, self.gateway_command, full_env), port

    def stop(self) -> None:
        self.stop_services()
        for mode, port in reversed(self.redis_ports.items()):
            pid, deadline = self.redis_pid(mode), time.monotonic() + 5
            self.redis_sh("stop", str(port))
            while pid and oh.cpu_seconds(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid and oh.cpu_seconds(pid) is not None and b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)  # still there: ended by its own pid


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on (what an fsync costs depends on it)."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    found = [(len(mount), kind) for mount, kind in mounts if str(path.resolve()).startswith(mount)]
    return max(found)[1] if found else "?"


# -- 1. the recorder, in this process ----------------------------------------------------------

SYSTEM = "You are the support assistant of Acme Cloud. Answer politely and briefly; never invent prices."
ANSWER = (
    "Thanks for reaching out! I can see order {i} in our system. It was shipped on March 3rd and should "
    "arrive within five business days. If the tracking page still shows no update tomorrow, reply to this "
    "message and we will open an investigation with the carrier. Is there anything else I can help with?"
)


def chat_payload(i: int) -> dict[str, Any]:
    """A chat request (about 200 characters of messages); one in ten carries an e-mail and a phone number."""
    text = f"Hi, my order {i} from last week has not arrived yet and the tracking page shows nothing. "
    if i % 10 == 0:
        text += f"Please reach me at jane.doe{i}@example.com or +44 20 7946 0{i % 1000:03d}."
    else:
        text += "Could you check what happened and tell me when it will be delivered?"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return {"model": oh.MODEL, "messages": messages, "max_tokens": 256, "temperature": 0.7, "user": f"user-{i % 500}"}


def contexts(variant: str, n: int) -> list[RequestContext]:
    """N finished chat requests with vLLM-shaped whole answers (about 300 characters), as the gateway has them."""
    tenant = Tenant(name=f"bench-{variant.replace(' ', '-')}", logging=POLICIES[variant])
    route = Route(requested=oh.MODEL, upstream_model=oh.MODEL, served_model=oh.MODEL)
    out = []
    for i in range(n):
        request_id = f"{tenant.name}-{i:07d}"
        ctx = RequestContext(request_id, "chat", tenant, "key-bench", payload=chat_payload(i), route=route)
        ctx.validated = True
        ctx.sent = json.dumps(ctx.payload, separators=(",", ":")).encode()  # as the gateway forwards it
        body = completion_body(request_id, oh.MODEL, 60)
        body["choices"][0]["message"]["content"] = ANSWER.format(i=i)
        ctx.answer.body = json.dumps(body, separators=(",", ":")).encode()
        ctx.finish(200)
        out.append(ctx)
    return out


async def record_all(
    stack: RecordsStack, mode: str, variant: str, n: int, progress: Progress, task: TaskID
) -> dict[str, Any]:
    """Time record() of N contexts + waiting until written; check that all N are in the stream."""
    batch, metrics = contexts(variant, n), Metrics()
    redis = aioredis.Redis.from_url(stack.redis_url(mode), decode_responses=True)
    spool = Spool(stack.workdir / "spool", fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, metrics, max_queued=max(n, 100_000), workers=1)  # as the gateway runs it
    done = progress.tasks[task].completed

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.25)
            written = metrics.registry.get_sample_value("loragate_records_written_total") or 0
            progress.update(task, completed=done + written)

    ticker = asyncio.create_task(tick())
    try:
        cpu, redis_cpu, started = time.process_time(), oh.cpu_seconds(stack.redis_pid(mode)) or 0, time.perf_counter()
        running = asyncio.create_task(recorder.run())
        for ctx in batch:
            recorder.record(ctx)
        await recorder.written()
        await recorder.stop()
        await running
        seconds = time.perf_counter() - started
        cpu, redis_cpu = time.process_time() - cpu, (oh.cpu_seconds(stack.redis_pid(mode)) or 0) - redis_cpu
        stream = keys.completion_log(batch[0].tenant.name)
        written = await redis.xlen(stream)
        first = json.loads((await redis.xrange(stream, count=1))[0][1]["r"]) if written else {}
    finally:
        ticker.cancel()
        await redis.flushall()
        await redis.aclose()
        spool.close()
    if recorder.degraded or written != n:
        raise oh.BenchError(f"{mode} Redis, {variant}: {written} records in {stream}, expected {n}")
    if variant == "redaction on" and first["redactions"] != {"email": 1, "phone": 1}:
        raise oh.BenchError(f"request 0's e-mail and phone number were not redacted: {first['redactions']}")
    progress.update(task, completed=done + n)
    return {"events": n, "seconds": seconds, "events_per_s": n / seconds, "cpu_us_per_event": cpu / n * 1e6} | {
        "redis_cpu_us_per_event": redis_cpu / n * 1e6
    }


async def recorder_bench(stack: RecordsStack, cfg: Config, progress: Progress) -> dict[str, Any]:
    Redactor().redact("+44 20 7946 0958")  # phonenumbers loads its metadata on first use: not in the timing
    runs = [(mode, variant) for variant in POLICIES for mode in ("plain", "durable")]
    task = progress.add_task("1. recorder (events)", total=cfg.events * len(runs))
    results: dict[str, dict[str, Any]] = {"plain": {}, "durable": {}}
    for mode, variant in runs:
        results[mode][variant] = await record_all(stack, mode, variant, cfg.events, progress, task)
    base = results[BASELINE[0]][BASELINE[1]]["events_per_s"]
    for run in (run for by_variant in results.values() for run in by_variant.values()):
        run["ratio_to_baseline"] = run["events_per_s"] / base
        run["target_met"] = run["events_per_s"] >= TARGET_EVENTS_S
    return {"baseline": list(BASELINE), "target_events_per_s": TARGET_EVENTS_S, **results}


# -- 2. gateway requests/s, recording off vs on
async def throughput(
    session: aiohttp.ClientSession, targets: dict[str, oh.Target], pids: dict[str, int], cfg: Config, progress: Progress
) -> dict[str, Any]:
    """C clients in a closed loop, the gateways taking turns (ABBA...); CPU of each over the whole phase."""
    body = json.dumps(chat_payload(1)).encode()
    for target in targets.values():  # open the connections (client -> gateway -> upstream)
        await oh.load_segment(session, target, body, cfg.concurrency, None, 5)
    order = [list(targets)[0 if i % 4 in (0, 3) else 1] for i in range(cfg.segments * 2)]
    task = progress.add_task(f"2. C={cfg.concurrency}, off/on (segments)", total=len(order))
    cpu = {name: oh.cpu_seconds(pid) or 0 for name, pid in pids.items()}
    runs: dict[str, list[tuple[list[float], int, float]]] = {name: [] for name in targets}
    for name in order:
        runs[name].append(
            await oh.load_segment(session, targets[name], body, cfg.concurrency, cfg.duration_s / cfg.segments)
        )
        progress.advance(task)
    result: dict[str, Any] = {"concurrency": cfg.concurrency, "seconds_per_target": cfg.duration_s, "order": order}
    for name, segments in runs.items():
        latencies = [x for lat, _, _ in segments for x in lat]
        cpu_us = ((oh.cpu_seconds(pids[name]) or 0) - cpu[name]) / max(len(latencies), 1) * 1e6
        result[name] = {**oh.summarise(latencies), "errors": sum(seg[1] for seg in segments)}
        result[name] |= {
            "requests_per_s": len(latencies) / sum(seg[2] for seg in segments),
            "cpu_us_per_request": cpu_us,
        }
    result["drop"] = 1 - result["on"]["requests_per_s"] / result["off"]["requests_per_s"]
    return {**result, "target_drop": TARGET_DROP, "target_met": result["drop"] <= TARGET_DROP}


async def logged(session: aiohttp.ClientSession, url: str, redis_url: str) -> dict[str, Any]:
    """Requests the "on" gateway answered (its /metrics) and records in the tenant's log, once written."""
    async with session.get(f"{url}/metrics", headers=METRICS_AUTH) as resp:
        families = text_string_to_metric_families(await resp.text())
    samples = [s for f in families if f.name == "loragate_requests" for s in f.samples]
    answered = int(sum(s.value for s in samples if s.name.endswith("_total")))
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
                raise oh.BenchError(f"{base} answered HTTP {resp.status}: {(await resp.text())[:300]}")
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
        out[phase] = {name: {**oh.summarise(lat), "statuses": dict(st)} for name, (lat, st) in by_name.items()}
    out["durable_all_200"] = all(set(out[phase]["durable"]["statuses"]) == {200} for phase in samples)
    return out


# -- the run
def start_gateways(stack: RecordsStack, extra_env: dict[str, str]) -> dict[str, tuple[oh.Service, int]]:
    """Three gateways on one mock and one Redis: recording off; on (records in the plain Redis, so feedback
    goes through the fsynced spool: 202); durable (records and feedback in the durable Redis: 200)."""
    stack.start_mock()
    envs = {
        "off": {"LORAGATE_RECORD_COMPLETIONS": "false"},
        "on": {},
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
    stack: RecordsStack, gateways: dict[str, tuple[oh.Service, int]], cfg: Config, progress: Progress
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
            raise oh.BenchError(f"feedback durability is {found}, expected spool (on) and fsync-always (durable)")
        json_headers = {**headers, "Content-Type": "application/json"}
        targets = {name: oh.Target(name, f"{urls[name]}/v1/chat/completions", json_headers) for name in ("off", "on")}
        pids = {name: gateways[name][0].proc.pid for name in targets}
        result: dict[str, Any] = {"feedback_durability": found}
        result["throughput"] = await throughput(session, targets, pids, cfg, progress)
        result["logged"] = await logged(session, urls["on"], stack.redis_url("plain"))
        ids = {name: await completion_ids(session, urls[name], headers, 50) for name in ("durable", "on")}
        calls: dict[str, Call] = {name: feedback_call(urls[name], stack.api_key or "", ids[name]) for name in ids}
        calls["healthz"] = lambda session, _i: timed(session, "GET", f"{urls['durable']}/healthz")
        result["feedback"] = await feedback_bench(session, calls, cfg, progress)
    return result


def progress_bar() -> Progress:
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=oh.console, refresh_per_second=4)


# -- reporting ---------------------------------------------------------------------------------

FEEDBACK_LABELS = {
    "durable": "POST /v1/feedback, records Redis fsyncs (`appendfsync always`): 200",
    "on": "POST /v1/feedback, records Redis does not fsync (fsynced local spool): 202",
    "healthz": "GET /healthz, same gateway (floor)",
}


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def rows(items: list[list[Any]]) -> str:
    return "\n".join(f"| {' | '.join(map(str, item))} |" for item in items)


def markdown(report: dict[str, Any]) -> str:
    m, cfg, rec, t, log, fb = (report[k] for k in ("machine", "config", "recorder", "throughput", "logged", "feedback"))
    rec_rows = [
        [mode, v, f"{r['events_per_s']:,.0f}", f"{r['ratio_to_baseline']:.2f}", f"{r['cpu_us_per_event']:.0f}"]
        + [met(r["target_met"])]
        for mode in ("plain", "durable")
        for v, r in rec[mode].items()
    ]
    tput_rows = [
        [f"recording {n}", f"{t[n]['requests_per_s']:.0f}", f"{t[n]['p50_ms']:.2f}", f"{t[n]['p99_ms']:.2f}"]
        + [t[n]["errors"], f"{t[n]['cpu_us_per_request']:.0f}"]
        for n in ("off", "on")
    ]
    fb_rows = [
        [label, c, f"{fb[p][n]['p50_ms']:.2f}", f"{fb[p][n]['p99_ms']:.2f}"]
        + [", ".join(f"{s}: {k}" for s, k in sorted(fb[p][n]["statuses"].items()))]
        for p, c in (("sequential", 1), ("concurrent", fb["concurrency"]))
        for n, label in FEEDBACK_LABELS.items()
    ]
    return f"""# What recording costs

- Date: {report["date"]}; command: `{report["command"]}`
- Machine: {m["cores"]} cores ({m["cpu_model"]}), {m["platform"]}, Python {m["python"]}, redis-server \
{report["versions"].get("redis-server", "?")} on {report["filesystem"]}; load average \
{report["load_average_before"][0]:.2f} before, {report["load_average_after"][0]:.2f} after

## 1. Recorder throughput, one process (target >= {TARGET_EVENTS_S:,} events/s)

{cfg["events"]:,} chat records per row (system + user message, a vLLM `chat.completion` answer; one in ten with \
an e-mail and a phone number): `record()` of all, then wait until written; the stream length is checked. Baseline: \
{BASELINE[0]} Redis, {BASELINE[1]}. CPU: this process's, per event.

| Redis | Policy | events/s | / baseline | CPU us/event | target |
|---|---|---:|---:|---:|---|
{rows(rec_rows)}

## 2. Gateway requests/s, recording off vs on (target: at most {TARGET_DROP:.0%} lower)

{t["concurrency"]} concurrent non-stream chat requests, {t["seconds_per_target"]:g} s per gateway in \
{len(t["order"])} alternating segments; same mock upstream, same Redis.

| Gateway | requests/s | p50 ms | p99 ms | errors | gateway CPU us/request |
|---|---:|---:|---:|---:|---:|
{rows(tput_rows)}

Drop: **{t["drop"]:+.1%}**: {met(t["target_met"])}. In the "on" gateway's log: {log["records"]:,} records for \
{log["answered"]:,} answered requests ({log["ratio"]:.2%}; target >= {TARGET_LOGGED:.0%}: {met(log["target_met"])}).

## 3. Feedback latency, by durability

{fb["requests_per_target"]} requests per row, one at a time (the three taking turns), then with \
{fb["concurrency"]} concurrent clients. Durable feedback all 200: {met(fb["durable_all_200"])}.

| Request | clients | p50 ms | p99 ms | statuses |
|---|---:|---:|---:|---|
{rows(fb_rows)}
"""


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [3, 1.3, 2.5]})
    for k, mode in enumerate(("plain", "durable")):
        values = [report["recorder"][mode][v]["events_per_s"] for v in POLICIES]
        a.bar([x + (k - 0.5) * 0.4 for x in range(len(POLICIES))], values, 0.4, label=f"{mode} Redis")
    a.axhline(TARGET_EVENTS_S, color="red", linestyle="--", label="target")
    a.set(xticks=range(len(POLICIES)), xticklabels=list(POLICIES), ylabel="events/s", title="1. Recorder")
    t, fb = report["throughput"], report["feedback"]
    b.bar(["off", "on"], [t["off"]["requests_per_s"], t["on"]["requests_per_s"]], color=["grey", "C0"])
    b.set(ylabel="requests/s", title=f"2. Recording off/on ({-t['drop']:+.1%})")
    for k, phase in enumerate(("sequential", "concurrent")):
        p50 = [fb[phase][n]["p50_ms"] for n in FEEDBACK_LABELS]
        up = [fb[phase][n]["p99_ms"] - fb[phase][n]["p50_ms"] for n in FEEDBACK_LABELS]
        x = [i + (k - 0.5) * 0.4 for i in range(3)]
        c.bar(x, p50, 0.4, yerr=[[0] * 3, up], capsize=3, label=f"{phase}: p50 (bar) to p99")
    c.set(xticks=range(3), xticklabels=["fsync: 200", "spool: 202", "healthz"], ylabel="ms", title="3. Feedback")
    a.legend(fontsize=8)
    c.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"loragate recording: {report['machine']['cores']} cores, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    rec, t, log, fb = (report[k] for k in ("recorder", "throughput", "logged", "feedback"))
    slowest = min(r["events_per_s"] for mode in ("plain", "durable") for r in rec[mode].values())
    verdicts = [f"recorder >= {TARGET_EVENTS_S:,}/s everywhere: {slowest >= TARGET_EVENTS_S}"]
    verdicts += [f"drop <= {TARGET_DROP:.0%}: {t['target_met']}", f"logged: {log['target_met']}"]
    oh.console.print("; ".join(verdicts + [f"durable feedback all 200: {fb['durable_all_200']}"]))


# -- entry point
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.records", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--events", type=int, default=30_000, help="Recorder events per Redis and policy.")
    parser.add_argument("-d", "--duration", type=float, default=15.0, help="Seconds of load per gateway.")
    parser.add_argument("--segments", type=int, default=3, help="Load segments per gateway, alternating.")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="Concurrent clients (requests/s).")
    parser.add_argument("-f", "--feedback", type=int, default=500, help="Feedback requests per target and phase.")
    parser.add_argument("--feedback-concurrency", type=int, default=8, help="Concurrent feedback clients.")
    oh.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.events, args.segments, args.concurrency, args.feedback_concurrency) < 1 or args.feedback < 2:
        parser.error("counts must be at least 1 (--feedback at least 2)")
    if args.duration <= 0 or any("=" not in item for item in args.gateway_env):
        parser.error("--duration must be > 0, and --gateway-env KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = Config(args.events, args.duration, args.segments, args.concurrency, args.feedback, args.feedback_concurrency)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-records-"))
    stack = RecordsStack(workdir, extra_env)

    def body() -> None:
        with oh.console.status("starting redis-servers (plain, durable)"):
            stack.start_redis_server("plain")
            stack.start_redis_server("durable")
        with asyncio.Runner(loop_factory=oh.event_loop_factory()) as runner:
            with progress_bar() as progress:
                recorder = runner.run(recorder_bench(stack, cfg, progress))
            with oh.console.status("starting the mock upstream and three gateways"):
                gateways = start_gateways(stack, extra_env)
            with progress_bar() as progress:
                results = runner.run(gateway_benches(stack, gateways, cfg, progress))
        if any(service.proc.poll() is not None for service, _ in gateways.values()):
            raise oh.BenchError("a gateway exited during the run")
        report = {
            **oh.report_header("loadtest.records", stack, argv, load_before),
            "filesystem": filesystem(workdir),
            "versions": oh.versions(),
            "config": {**asdict(cfg), "env": extra_env},
            "recorder": recorder,
            **results,
            "wall_s": round(time.monotonic() - started, 1),
        }
        oh.publish(args.output_dir, "records", report, markdown, print_summary)
        plot(report, args.output_dir / "records.png")

    return oh.run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
