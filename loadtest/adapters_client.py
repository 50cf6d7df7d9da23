"""The adapters benchmark's client (loadtest.adapters): requests through the gateway and straight to its vLLM
(loading adapters into vLLM directly), time to first token, and the gateway's adapter-load histogram."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from loadtest.engine import METRICS_KEY, EngineStack, messages, nonce
from loadtest.metrics import Samples, metric_sum, parse_prometheus
from loadtest.services import BenchError

if TYPE_CHECKING:
    from loadtest.adapters_run import AdapterSet


class Client:
    """Requests to the gateway and straight to its vLLM, with one keep-alive aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, stack: EngineStack, adapters: AdapterSet) -> None:
        self.session = session
        self.gateway = f"http://127.0.0.1:{stack.gateway_port}"
        self.engine = f"http://127.0.0.1:{stack.engine_port}"
        self.gateway_headers = {"Authorization": f"Bearer {stack.api_key}"}
        self.adapters = adapters
        self.direct_loaded: set[str] = set()
        self.direct_locks: dict[str, asyncio.Lock] = {}
        self.direct_load_s: dict[str, float] = {}

    def target(self, via: str) -> tuple[str, dict[str, str]]:
        if via == "gateway":
            return self.gateway + "/v1/chat/completions", self.gateway_headers
        return self.engine + "/v1/chat/completions", {}

    async def load_direct(self, vllm_name: str, store_name: str) -> float:
        """Load an adapter straight into vLLM once (per-name lock); the time it took, 0 if loaded."""
        if vllm_name in self.direct_loaded:
            return 0.0
        lock = self.direct_locks.setdefault(vllm_name, asyncio.Lock())
        async with lock:
            if vllm_name in self.direct_loaded:
                return 0.0
            started = time.perf_counter()
            payload = {"lora_name": vllm_name, "lora_path": self.adapters.paths[store_name]}
            async with self.session.post(self.engine + "/v1/load_lora_adapter", json=payload) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise BenchError(f"vLLM could not load {vllm_name}: HTTP {resp.status} {text[:300]}")
            seconds = time.perf_counter() - started
            self.direct_loaded.add(vllm_name)
            self.direct_load_s[vllm_name] = seconds
            return seconds

    async def ttft(self, via: str, model: str, index: int) -> dict[str, float]:
        """One streamed request, max_tokens=1: seconds to the first token and to the end."""
        url, headers = self.target(via)
        body = {"model": model, "messages": messages(nonce(), index), "max_tokens": 1, "temperature": 0, "stream": True}
        started = time.perf_counter()
        first = None
        async with self.session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                raise BenchError(f"{via} {model}: HTTP {resp.status} {(await resp.text())[:300]}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                if first is None:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BenchError(f"{via} {model}: stream error {chunk['error']}")
                    choice = (chunk.get("choices") or [{}])[0]
                    if (choice.get("delta") or {}).get("content") or choice.get("text"):
                        first = time.perf_counter()
        end = time.perf_counter()
        return {"ttft_s": (first or end) - started, "total_s": end - started}

    async def complete(self, via: str, model: str, body: dict[str, Any]) -> tuple[int, float]:
        """One non-stream request: (completion tokens, seconds)."""
        url, headers = self.target(via)
        started = time.perf_counter()
        async with self.session.post(url, json={**body, "model": model}, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise BenchError(f"{via} {model}: HTTP {resp.status} {raw[:300]!r}")
        seconds = time.perf_counter() - started
        return int(json.loads(raw)["usage"]["completion_tokens"]), seconds

    async def metrics(self) -> Samples:
        headers = {"Authorization": f"Bearer {METRICS_KEY}"}
        async with self.session.get(self.gateway + "/metrics", headers=headers) as resp:
            return parse_prometheus(await resp.text())


def load_histogram(samples: Samples) -> dict[str, Any]:
    """loragate_adapter_load_seconds summed over adapters: cumulative bucket counts, count, sum."""
    buckets: dict[str, float] = {}
    for labels, value in samples.get("loragate_adapter_load_seconds_bucket", []):
        buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + value
    ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))
    count = metric_sum(samples, "loragate_adapter_load_seconds_count")
    total = metric_sum(samples, "loragate_adapter_load_seconds_sum")
    return {
        "buckets": [{"le": le, "count": int(n)} for le, n in ordered],
        "count": int(count),
        "sum_s": total,
        "mean_ms": total / count * 1000 if count else None,
    }


def histogram_quantile(hist: dict[str, Any], q: float) -> float | None:
    """Upper bound (le, in ms) of the bucket the q-quantile falls in: what the histogram can say."""
    if not hist["count"]:
        return None
    for bucket in hist["buckets"]:
        if bucket["count"] >= q * hist["count"]:
            return float(bucket["le"]) * 1000
    return None
