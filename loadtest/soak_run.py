"""The soak's run (loadtest.soak): traffic through the OpenAI SDK, feedback, adapter churn through the admin
API, memory samples, and at the end what went missing in Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import redis.asyncio as aioredis
from openai import APIError, APIStatusError, AsyncOpenAI

from gateway import keys
from loadtest.engine import EngineStack
from loadtest.metrics import tree_rss
from loadtest.runner import console
from loadtest.services import BenchError

if TYPE_CHECKING:
    from loadtest.soak import SoakConfig, Tenant

TARGETS = ("q_proj", "v_proj")
CHURN = "churn"
KINDS = ("chat", "chat stream", "completion", "completion stream")
TOPICS = ("the sea", "coffee", "trains", "rain", "a library", "winter", "bread", "lighthouses")


def error_type(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return f"HTTP {exc.status_code} {getattr(exc, 'code', None) or type(exc).__name__}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, APIError) and not isinstance(exc, APIStatusError):
        return f"{type(exc).__name__} {getattr(exc, 'code', None) or ''}".strip()
    return type(exc).__name__


def adapter_archive(workdir: Path, base: Any, cfg: SoakConfig, seed: int) -> bytes:
    from adapters.synthetic import make_adapter, tarball

    folder = make_adapter(workdir / "raw" / str(seed), base, seed=seed, rank=cfg.rank, targets=TARGETS)
    return tarball(folder)


class Soak:
    """The run: traffic, feedback, adapter churn and memory samples, and what each of them gave."""

    def __init__(self, stack: EngineStack, cfg: SoakConfig, tenants: list[Tenant], base: Any) -> None:
        self.stack, self.cfg, self.tenants, self.base = stack, cfg, tenants, base
        self.url = f"http://127.0.0.1:{stack.gateway_port}"
        self.rng = random.Random(cfg.seed)
        self.samples: list[tuple[float, str, float, bool]] = []
        """(seconds since the start, kind, latency in seconds, answered)"""
        self.errors: Counter[str] = Counter()
        self.error_samples: list[dict[str, Any]] = []
        self.answered: dict[str, str] = {}
        """Completion id -> tenant, for every answered completion request."""
        self.acked: list[tuple[str, str, str, int]] = []
        """(tenant, completion id, user, status) of every acknowledged rating."""
        self.rss: list[dict[str, Any]] = []
        self.skipped = 0
        self.seed = 10_000
        self.t0 = time.perf_counter()
        self.http = httpx.AsyncClient(base_url=self.url, timeout=cfg.timeout_s)
        self.clients = {
            t.name: AsyncOpenAI(base_url=self.url + "/v1", api_key=t.key, max_retries=0, timeout=cfg.timeout_s)
            for t in tenants
        }

    async def close(self) -> None:
        await self.http.aclose()
        for client in self.clients.values():
            await client.close()

    def done(self, kind: str, started: float, exc: BaseException | None = None, what: str = "") -> None:
        now = time.perf_counter()
        self.samples.append((started - self.t0, kind, now - started, exc is None))
        if exc is not None:
            name = error_type(exc)
            self.errors[f"{kind}: {name}"] += 1
            if self.errors[f"{kind}: {name}"] <= 5:  # the first five of each type
                message = f"{type(exc).__name__}: {exc}"[:300]
                self.error_samples.append(
                    {"t_s": round(started - self.t0, 1), "kind": kind, "what": what, "error": message}
                )

    # -- admin API
    async def upload(self, tenant: Tenant, name: str) -> int:
        self.seed += 1
        body = await asyncio.to_thread(adapter_archive, self.stack.workdir, self.base, self.cfg, self.seed)
        started = time.perf_counter()
        try:
            resp = await self.http.post(
                f"/admin/tenants/{tenant.name}/adapters",
                params={"name": name},
                content=body,
                headers={"Authorization": f"Bearer {tenant.manage_key}", "Content-Type": "application/gzip"},
            )
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            self.done("upload", started, exc, f"{tenant.name}/{name}")
            raise
        self.done("upload", started)
        return int(resp.json()["version"])

    async def delete(self, tenant: Tenant, ref: str) -> None:
        started = time.perf_counter()
        headers = {"Authorization": f"Bearer {tenant.manage_key}"}
        try:
            (await self.http.delete(f"/admin/tenants/{tenant.name}/adapters/{ref}", headers=headers)).raise_for_status()
        except httpx.HTTPError as exc:
            self.done("delete", started, exc, f"{tenant.name}/{ref}")
            return
        self.done("delete", started)

    async def setup_adapters(self) -> None:
        for tenant in self.tenants:
            for k in range(self.cfg.adapters_per_tenant):
                version = await self.upload(tenant, f"a{k}")
                tenant.refs.append(f"a{k}@{version}")
                tenant.models.append(tenant.refs[-1] if k % 2 else f"a{k}")  # by version, and the bare name

    # -- traffic
    async def completion(self, tenant: Tenant, kind: str, model: str, user: str) -> str:
        """One request through the SDK, read to its end; the completion id."""
        client, topic = self.clients[tenant.name], self.rng.choice(TOPICS)
        common: dict[str, Any] = {"model": model, "max_tokens": self.cfg.max_tokens, "user": user}
        stream = kind.endswith("stream")
        if stream:
            common |= {"stream": True, "stream_options": {"include_usage": True}}
        if kind.startswith("chat"):
            messages: Any = [{"role": "user", "content": f"Write one sentence about {topic}."}]
            answer: Any = await client.chat.completions.create(messages=messages, **common)
        else:
            answer = await client.completions.create(prompt=f"A short note about {topic}:", **common)
        if not stream:
            if not answer.choices:
                raise BenchError(f"{model}: an answer without choices")
            return str(answer.id)
        ids, chunks = set(), 0
        async for chunk in answer:
            ids.add(chunk.id)
            chunks += bool(chunk.choices)
        if len(ids) != 1 or not chunks:
            raise BenchError(f"{model}: a stream with ids {sorted(ids)} and {chunks} chunks with choices")
        return ids.pop()

    async def feedback(self, tenant: Tenant, completion_id: str, user: str) -> None:
        body = {"completion_id": completion_id, "user": user, "thumbs": self.rng.choice(("up", "down"))}
        started = time.perf_counter()
        try:
            resp = await self.http.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {tenant.key}"})
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            self.done("feedback", started, exc, completion_id)
            return
        self.done("feedback", started)
        self.acked.append((tenant.name, completion_id, user, resp.status_code))

    async def one(self) -> None:
        rng, cfg = self.rng, self.cfg
        tenant = rng.choice(self.tenants)
        text = rng.random() < cfg.completion_share
        kind = KINDS[2 * text + (rng.random() < cfg.stream_share)]
        model = rng.choice(tenant.models + [CHURN] * bool(tenant.churn))
        user = f"user-{rng.randrange(cfg.users)}"
        started = time.perf_counter()
        try:
            completion_id = await self.completion(tenant, kind, model, user)
        except Exception as exc:  # any exception counts as an error, by its type
            self.done(kind, started, exc, f"{tenant.name} {model}")
            return
        self.done(kind, started)
        self.answered[completion_id] = tenant.name
        if rng.random() < cfg.feedback_share:
            await self.feedback(tenant, completion_id, user)

    async def traffic(self, duration_s: float) -> None:
        """`rate` requests per second on a fixed schedule; past `max_in_flight` a due request is skipped."""
        in_flight: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        for i in range(round(self.cfg.rate * duration_s)):
            if (delay := start + i / self.cfg.rate - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= self.cfg.max_in_flight:
                self.skipped += 1
                continue
            task = asyncio.create_task(self.one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)

    async def churn(self, duration_s: float) -> None:
        """Each cycle: a new `churn` version for the next tenant, then (half a cycle on) its oldest deleted."""
        half, end = self.cfg.churn_every_s / 2, time.perf_counter() + duration_s
        cycle = 0
        while time.perf_counter() + self.cfg.churn_every_s <= end:
            tenant = self.tenants[cycle % len(self.tenants)]
            cycle += 1
            try:
                tenant.churn.append(await self.upload(tenant, CHURN))
            except httpx.HTTPError:
                pass  # counted as an upload error
            await asyncio.sleep(half)
            if len(tenant.churn) > 1:
                await self.delete(tenant, f"{CHURN}@{tenant.churn.pop(0)}")
            await asyncio.sleep(half)

    # -- memory
    def rss_now(self) -> dict[str, Any]:
        """RSS of the gateway's tree without vLLM (gateway, record worker), and of vLLM's (its guard too)."""
        root = psutil.Process(self.stack.gateway.proc.pid if self.stack.gateway else 0)
        engine = set()
        for child in root.children(recursive=False):
            try:
                if "gateway.engine.guard" in " ".join(child.cmdline()):
                    engine |= {child.pid, *(p.pid for p in child.children(recursive=True))}
            except psutil.Error:
                continue
        every = tree_rss(root)["processes"]
        gateway = [p["rss"] for p in every if p["pid"] not in engine]
        vllm = sum(p["rss"] for p in every if p["pid"] in engine)
        return {"gateway": sum(gateway), "gateway_processes": len(gateway), "vllm": vllm}

    async def sampler(self, duration_s: float) -> None:
        end = time.perf_counter() + duration_s
        while True:
            sample = await asyncio.to_thread(self.rss_now)
            self.rss.append({"t_s": round(time.perf_counter() - self.t0, 2), **sample})
            if time.perf_counter() >= end:
                return
            await asyncio.sleep(min(self.cfg.sample_every_s, max(end - time.perf_counter(), 0.0)))

    async def run(self) -> None:
        duration_s = self.cfg.minutes * 60
        self.t0 = time.perf_counter()
        with console.status(f"soaking for {self.cfg.minutes:g} minutes"):
            await asyncio.gather(self.sampler(duration_s), self.traffic(duration_s), self.churn(duration_s))

    # -- the end: did anything go missing
    async def losses(self, wait_s: float = 60.0) -> dict[str, Any]:
        """Answered completions without a record, and acknowledged ratings not stored, once written."""
        redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{self.stack.redis_port}/0", decode_responses=True)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                async with redis.pipeline(transaction=False) as pipe:
                    for completion_id in self.answered:
                        pipe.exists(keys.completion(completion_id))
                    for tenant, completion_id, user, _ in self.acked:
                        pipe.hexists(keys.feedback(tenant, completion_id), user)
                    found = await pipe.execute()
                records, stored = sum(found[: len(self.answered)]), sum(found[len(self.answered) :])
                if (records, stored) == (len(self.answered), len(self.acked)) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            in_log = sum([await redis.xlen(keys.completion_log(t.name)) for t in self.tenants])
        finally:
            await redis.aclose()
        statuses = Counter(str(status) for *_, status in self.acked)
        return {
            "completion_requests": sum(1 for s in self.samples if s[1] in KINDS),
            "answered": len(self.answered),
            "answered_with_record": records,
            "log_records": in_log,
            "feedback_acknowledged": len(self.acked),
            "feedback_acknowledged_by_status": dict(statuses),
            "feedback_stored": stored,
        }
