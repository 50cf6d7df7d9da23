"""Mixed load through the real OpenAI SDK (AsyncOpenAI): each request a draw from a `Scenario`.

A draw picks a tenant (its own API key), chat or text completion, streamed or not, a model from the
tenant's list with Zipf popularity (the base, adapters by name or by version, an experiment alias), and
an end user; a share of the answers is rated through `POST /v1/feedback`. Each request becomes a
`Sample`: latency, and for streams the time to the first token and the gaps between tokens. Drive it with
`loadtest.load.run_open` (a rate) or `run_closed` (a concurrency):

    client = ScenarioClient(url, tenants, Scenario(stream_share=0.5, zipf_s=1.1))
    await run_closed(client.request, concurrency=4, duration_s=30)
    summary(client.samples, 30)

`answered` and `acked` say what the gateway must have logged: every answered completion and every
acknowledged rating (the soak checks them in Redis at the end).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from openai import APIError, APIStatusError, AsyncOpenAI

from loadtest.metrics import summarise

KINDS = ("chat", "chat stream", "completion", "completion stream")
TOPICS = ("the sea", "coffee", "trains", "rain", "a library", "winter", "bread", "lighthouses")


class ScenarioError(Exception):
    """An answer of the wrong shape (no choices, a stream with several ids)."""


@dataclass
class Scenario:
    """What one request of the mix is, by chance (one config object per load)."""

    stream_share: float = 0.5
    completion_share: float = 0.25
    """Share of text completions (`/v1/completions`); the rest are chat."""
    feedback_share: float = 0.3
    """Share of answers rated (thumbs up or down) through `POST /v1/feedback`."""
    zipf_s: float = 0.0
    """Popularity of a tenant's models, first most popular: weight 1/rank^s (0: uniform)."""
    max_tokens: int = 12
    users: int = 50
    seed: int = 0
    timeout_s: float = 120.0


class Caller(Protocol):
    """A tenant as the scenario calls it: its inference key and the models it calls (a live list)."""

    name: str
    key: str
    models: list[str]


@dataclass
class Sample:
    kind: str
    """One of KINDS, or "feedback"."""
    tenant: str
    model: str
    started_s: float
    """Seconds since the client was made."""
    latency_s: float
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    """Streams: seconds between consecutive events carrying text (inter-token latency)."""
    error: str | None = None


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def zipf_sequence(count: int, items: int, s: float, seed: int) -> list[int]:
    """`count` indices in range(items), index k drawn with weight 1/(k+1)^s."""
    return random.Random(seed).choices(range(items), weights=zipf_weights(items, s), k=count)


def error_type(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return f"HTTP {exc.status_code} {getattr(exc, 'code', None) or type(exc).__name__}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, APIError):
        return f"{type(exc).__name__} {getattr(exc, 'code', None) or ''}".strip()
    return type(exc).__name__


class ScenarioClient:
    """Sends draws of a scenario to one gateway; keeps every sample, and what the gateway must have logged."""

    def __init__(self, url: str, tenants: Sequence[Caller], scenario: Scenario) -> None:
        self.url, self.tenants, self.scenario = url, tenants, scenario
        self.rng = random.Random(scenario.seed)
        self.clients = {
            t.name: AsyncOpenAI(base_url=f"{url}/v1", api_key=t.key, max_retries=0, timeout=scenario.timeout_s)
            for t in tenants
        }
        self.http = httpx.AsyncClient(base_url=url, timeout=scenario.timeout_s)
        self.t0 = time.perf_counter()
        self.samples: list[Sample] = []
        self.errors: Counter[str] = Counter()
        """Failed requests by "kind: error type"."""
        self.error_samples: list[dict[str, Any]] = []
        self.answered: dict[str, str] = {}
        """Completion id -> tenant, for every answered completion request."""
        self.acked: list[tuple[str, str, str, int]] = []
        """(tenant, completion id, user, status) of every acknowledged rating."""

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        await self.http.aclose()

    def model_of(self, tenant: Caller) -> str:
        models = tenant.models
        return self.rng.choices(models, weights=zipf_weights(len(models), self.scenario.zipf_s))[0]

    async def request(self, due: float) -> None:
        """One draw: a completion request, read to its end, and perhaps a rating of it. A sample's latency
        runs from when it was sent (`due` is not used: with a rate these machines keep, requests go when
        due; the soak reports how many were skipped instead)."""
        rng, scenario = self.rng, self.scenario
        tenant = rng.choice(self.tenants)
        kind = KINDS[2 * (rng.random() < scenario.completion_share) + (rng.random() < scenario.stream_share)]
        model, user = self.model_of(tenant), f"user-{rng.randrange(scenario.users)}"
        sample = Sample(kind, tenant.name, model, time.perf_counter() - self.t0, 0.0)
        started = time.perf_counter()
        try:
            completion_id = await self._completion(tenant, kind, model, user, sample, started)
        except Exception as exc:  # any failure counts as an error, by its type
            self.failed(sample, exc)
            completion_id = None
        sample.latency_s = time.perf_counter() - started
        self.samples.append(sample)
        if completion_id is None:
            return
        self.answered[completion_id] = tenant.name
        if rng.random() < scenario.feedback_share:
            await self.rate(tenant, completion_id, user)

    async def _completion(
        self, tenant: Caller, kind: str, model: str, user: str, sample: Sample, started: float
    ) -> str:
        client, topic = self.clients[tenant.name], self.rng.choice(TOPICS)
        common: dict[str, Any] = {"model": model, "max_tokens": self.scenario.max_tokens, "user": user}
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
                raise ScenarioError(f"{model}: an answer without choices")
            return str(answer.id)
        ids, last, chunks = set(), None, 0
        async for chunk in answer:
            ids.add(chunk.id)
            chunks += bool(chunk.choices)
            if any(_text(choice) for choice in chunk.choices):
                now = time.perf_counter()
                if last is None:
                    sample.ttft_s = now - started
                else:
                    sample.gaps_s.append(now - last)
                last = now
        if len(ids) != 1 or not chunks:  # an empty answer is an answer (a stream without text has no TTFT)
            raise ScenarioError(f"{model}: a stream with ids {sorted(ids)} and {chunks} chunks with choices")
        return ids.pop()

    async def rate(self, tenant: Caller, completion_id: str, user: str) -> None:
        body = {"completion_id": completion_id, "user": user, "thumbs": self.rng.choice(("up", "down"))}
        sample = Sample("feedback", tenant.name, "", time.perf_counter() - self.t0, 0.0)
        started = time.perf_counter()
        try:
            resp = await self.http.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {tenant.key}"})
            resp.raise_for_status()
            self.acked.append((tenant.name, completion_id, user, resp.status_code))
        except httpx.HTTPError as exc:
            self.failed(sample, exc)
        sample.latency_s = time.perf_counter() - started
        self.samples.append(sample)

    def failed(self, sample: Sample, exc: BaseException) -> None:
        sample.error = error_type(exc)
        kind = f"{sample.kind}: {sample.error}"
        self.errors[kind] += 1
        if self.errors[kind] <= 5:  # the first five of each kind of request and type of error
            what = f"{sample.tenant} {sample.model}".strip()
            self.error_samples.append({"t_s": round(sample.started_s, 2), "kind": sample.kind, "what": what} | {
                "error": f"{type(exc).__name__}: {exc}"[:300]
            })  # fmt: skip


def _text(choice: Any) -> bool:
    delta = getattr(choice, "delta", None)
    return bool(getattr(delta, "content", None) if delta is not None else getattr(choice, "text", None))


def summary(samples: Sequence[Sample], seconds: float) -> dict[str, Any]:
    """Per kind and all together: requests, errors, throughput, latency p50/p95/p99, and for streams the
    time to first token and the inter-token latency (p50/p95/p99, ms)."""
    out: dict[str, Any] = {}
    for kind in (*KINDS, "feedback", "all completions"):
        chosen = [s for s in samples if s.kind == kind or (kind == "all completions" and s.kind in KINDS)]
        if not chosen:
            continue
        ok = [s for s in chosen if s.error is None]
        row: dict[str, Any] = {"requests": len(chosen), "errors": len(chosen) - len(ok)}
        row["per_s"] = len(ok) / seconds if seconds else None
        row["latency"] = summarise([s.latency_s for s in ok])
        if any(s.ttft_s is not None for s in ok):
            row["ttft"] = summarise([s.ttft_s for s in ok if s.ttft_s is not None])
            row["inter_token"] = summarise([gap for s in ok for gap in s.gaps_s])
        out[kind] = row
    return out
