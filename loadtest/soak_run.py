"""The soak's run (loadtest.soak): traffic and feedback through the OpenAI SDK (a loadtest.scenarios mix,
open loop), adapter churn through the admin API, memory samples, and at the end what went missing in Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import redis.asyncio as aioredis

from gateway import keys
from loadtest.engine import EngineStack
from loadtest.load import run_open
from loadtest.metrics import tree_rss
from loadtest.runner import console
from loadtest.scenarios import KINDS, ScenarioClient, error_type

if TYPE_CHECKING:
    from loadtest.soak import SoakConfig, Tenant

TARGETS = ("q_proj", "v_proj")
CHURN = "churn"


def adapter_archive(workdir: Path, base: Any, cfg: SoakConfig, seed: int) -> bytes:
    from adapters.synthetic import make_adapter, tarball

    folder = make_adapter(workdir / "raw" / str(seed), base, seed=seed, rank=cfg.rank, targets=TARGETS)
    return tarball(folder)


class Soak:
    """The run: traffic, feedback, adapter churn and memory samples, and what each of them gave."""

    def __init__(self, stack: EngineStack, cfg: SoakConfig, tenants: list[Tenant], base: Any) -> None:
        self.stack, self.cfg, self.tenants, self.base = stack, cfg, tenants, base
        self.url = f"http://127.0.0.1:{stack.gateway_port}"
        self.samples: list[tuple[float, str, float, bool]] = []
        """(seconds since the start, kind, latency in seconds, answered)"""
        self.errors: Counter[str] = Counter()
        self.error_samples: list[dict[str, Any]] = []
        self.rss: list[dict[str, Any]] = []
        self.skipped = 0
        self.seed = 10_000
        self.t0 = time.perf_counter()
        self.http = httpx.AsyncClient(base_url=self.url, timeout=cfg.timeout_s)
        self.load = ScenarioClient(self.url, tenants, cfg.scenario())

    async def close(self) -> None:
        await self.http.aclose()
        await self.load.close()

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

    # -- traffic: a scenario through the OpenAI SDK, open loop
    async def traffic(self, duration_s: float) -> None:
        """`rate` requests per second on a fixed schedule; past `max_in_flight` a due request is skipped."""
        self.skipped = await run_open(self.load.request, self.cfg.rate, duration_s, self.cfg.max_in_flight)

    def timeline(self) -> list[tuple[float, str, float, bool]]:
        """Every request (completions, ratings, uploads, deletes): (start, kind, latency, answered)."""
        traffic = [(s.started_s, s.kind, s.latency_s, s.error is None) for s in self.load.samples]  # same clock
        return sorted(traffic + self.samples)

    async def churn(self, duration_s: float) -> None:
        """Each cycle: a new `churn` version for the next tenant, then (half a cycle on) its oldest deleted."""
        half, end = self.cfg.churn_every_s / 2, time.perf_counter() + duration_s
        cycle = 0
        while time.perf_counter() + self.cfg.churn_every_s <= end:
            tenant = self.tenants[cycle % len(self.tenants)]
            cycle += 1
            try:
                tenant.churn.append(await self.upload(tenant, CHURN))
                if CHURN not in tenant.models:
                    tenant.models.append(CHURN)  # its traffic calls the newest live version from now on
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
        self.t0 = self.load.t0 = time.perf_counter()  # one clock for the traffic's samples and the churn's
        with console.status(f"soaking for {self.cfg.minutes:g} minutes"):
            await asyncio.gather(self.sampler(duration_s), self.traffic(duration_s), self.churn(duration_s))

    # -- the end: did anything go missing
    async def losses(self, wait_s: float = 60.0) -> dict[str, Any]:
        """Answered completions without a record, and acknowledged ratings not stored, once written."""
        redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{self.stack.redis_port}/0", decode_responses=True)
        try:
            deadline, answered, acked = time.monotonic() + wait_s, self.load.answered, self.load.acked
            while True:
                async with redis.pipeline(transaction=False) as pipe:
                    for completion_id in answered:
                        pipe.exists(keys.completion(completion_id))
                    for tenant, completion_id, user, _ in acked:
                        pipe.hexists(keys.feedback(tenant, completion_id), user)
                    found = await pipe.execute()
                records, stored = sum(found[: len(answered)]), sum(found[len(answered) :])
                if (records, stored) == (len(answered), len(acked)) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            in_log = sum([await redis.xlen(keys.completion_log(t.name)) for t in self.tenants])
        finally:
            await redis.aclose()
        statuses = Counter(str(status) for *_, status in acked)
        return {
            "completion_requests": sum(1 for s in self.load.samples if s.kind in KINDS),
            "answered": len(answered),
            "answered_with_record": records,
            "log_records": in_log,
            "feedback_acknowledged": len(acked),
            "feedback_acknowledged_by_status": dict(statuses),
            "feedback_stored": stored,
        }
