"""An async load generator for OpenAI-style chat requests: sequential, closed-loop and open-loop.

- `sequential`: one request at a time to several targets in rotating (or, given a seeded random, shuffled)
  order, so drift in the machine's load hits every target alike; the latency of each request.
- `closed_loop`: C keep-alive connections, each sending its next request when the last one is answered,
  for a fixed time: what a target can serve (requests/s) when it is the bottleneck. It runs on
  loadtest.wire (a raw asyncio protocol: through a gateway about 45 µs of client CPU per request where
  aiohttp took 150), so the client takes as little as it can of the cores it shares with the target.
- `open_loop`: requests sent on a fixed schedule (R per second) whether or not earlier ones are
  answered; each latency runs from the time the request was due, not from when it was sent, so a
  target that falls behind shows it (no coordinated omission). In-flight requests are capped; past the
  cap a request is counted as dropped.

`run_closed` and `run_open` drive any request: the aiohttp targets here (sequential and open loop: the
OpenAI SDK costs the client more CPU per request than the gateways under test do on these machines), and
the OpenAI SDK's mixed scenarios of loadtest.scenarios (the soak). Every request is read to its end and
must answer 200 to count.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadtest import wire
from loadtest.metrics import summarise, tree_cpu_seconds

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Write one friendly sentence greeting a new user of our service."},
]


def chat_bodies(model: str, users: int) -> list[bytes]:
    """Small non-stream chat requests naming `model`, one per end user (`user`), to send in turn."""
    base: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 64, "temperature": 0.7}
    return [json.dumps({**base, "user": f"user-{i:05d}"}).encode() for i in range(max(users, 1))]


@dataclass
class Target:
    name: str
    url: str
    """The chat completions URL."""
    headers: dict[str, str]
    bodies: list[bytes]
    pid: int | None = None
    """The process (and its children) whose CPU time is charged to this target."""
    method: str = "POST"
    """GET targets (e.g. /v1/models) send no body: give them `bodies=[b""]`."""
    sent: int = 0

    def body(self) -> bytes:
        self.sent += 1
        return self.bodies[self.sent % len(self.bodies)]


class RequestFailed(Exception):
    """A request answered something other than 200."""


async def call(session: aiohttp.ClientSession, target: Target) -> float:
    """One request read to its end; its latency in seconds."""
    started = time.perf_counter()
    async with session.request(target.method, target.url, data=target.body() or None, headers=target.headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise RequestFailed(f"{target.name}: HTTP {resp.status} {raw[:200]!r}")
    return time.perf_counter() - started


FAILURES = (RequestFailed, aiohttp.ClientError, TimeoutError)


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    dropped: int = 0
    elapsed_s: float = 0.0
    cpu_s: float | None = None
    first_error: str | None = None

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:300]

    @classmethod
    def combined(cls, parts: list[LoadResult]) -> LoadResult:
        """One phase's result from its segments (run in turns with other targets'): latencies pooled, counts, time
        and CPU summed."""
        whole = cls()
        for part in parts:
            whole.latencies_s += part.latencies_s
            whole.errors, whole.dropped = whole.errors + part.errors, whole.dropped + part.dropped
            whole.elapsed_s += part.elapsed_s
            whole.first_error = whole.first_error or part.first_error
        cpu = [part.cpu_s for part in parts]
        whole.cpu_s = sum(c for c in cpu if c is not None) if parts and None not in cpu else None
        return whole

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_s)
        out: dict[str, Any] = {**summarise(self.latencies_s), "errors": self.errors, "dropped": self.dropped}
        out["requests_per_s"] = done / self.elapsed_s if self.elapsed_s else None
        out["cpu_ms_per_request"] = self.cpu_s / done * 1000 if self.cpu_s is not None and done else None
        if self.first_error:
            out["first_error"] = self.first_error
        return out


async def metered(target: Target, run: Callable[[LoadResult], Any], settle_s: float = 0.0) -> LoadResult:
    """Run one phase against `target`, charging it the CPU time its process tree spent meanwhile and for `settle_s`
    after (what it still does for the phase once the load stops: its record process writing the last records)."""
    result = LoadResult()
    before = tree_cpu_seconds(target.pid) if target.pid else None
    started = time.perf_counter()
    await run(result)
    result.elapsed_s = time.perf_counter() - started
    await asyncio.sleep(settle_s)
    if before is not None and target.pid:
        result.cpu_s = tree_cpu_seconds(target.pid) - before
    return result


async def sequential(
    session: aiohttp.ClientSession, targets: list[Target], rounds: int, shuffle: random.Random | None = None
) -> dict[str, LoadResult]:
    """`rounds` requests per target, one at a time; each round visits every target, the order rotating (with
    `shuffle`: in an order of its own, so no target always follows the same one)."""
    results = {target.name: LoadResult() for target in targets}
    for i in range(rounds):
        k = i % len(targets)
        for target in shuffle.sample(targets, len(targets)) if shuffle else targets[k:] + targets[:k]:
            try:
                results[target.name].latencies_s.append(await call(session, target))
            except FAILURES as exc:
                results[target.name].failed(exc)
    for result in results.values():
        result.elapsed_s = sum(result.latencies_s)
    return results


Due = Callable[[float], Coroutine[Any, Any, None]]
"""One request of a load, given when it was due (perf_counter seconds); it records its own outcome."""


async def run_closed(request: Due, concurrency: int, duration_s: float) -> None:
    """`concurrency` clients, each sending its next request when the last one is answered, until the time is up."""
    deadline = time.perf_counter() + duration_s

    async def client() -> None:
        while (due := time.perf_counter()) < deadline:
            await request(due)

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def run_open(request: Due, rate: float, duration_s: float, max_in_flight: int = 512) -> int:
    """Requests on a fixed schedule (`rate` per second) whether or not earlier ones are answered; past
    `max_in_flight` a due request is not sent. Returns how many were not sent. Each request is given when
    it was due (`recording` measures latency from then); one that raises, rather than record its failure,
    is a bug: the first such exception is raised at the end."""
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []
    dropped = 0

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            failures.append(exc)  # a request that did not record its own failure: a bug, raised below

    start = time.perf_counter()
    for i in range(round(rate * duration_s)):
        due = start + i / rate
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            dropped += 1
            continue
        task = asyncio.create_task(request(due))
        in_flight.add(task)
        task.add_done_callback(done)
    if in_flight:
        await asyncio.wait(in_flight)
    if failures:
        raise failures[0]
    return dropped


def recording(session: aiohttp.ClientSession, target: Target, result: LoadResult) -> Due:
    """A request to `target` whose latency (from when it was due) or failure goes into `result`."""

    async def request(due: float) -> None:
        try:
            await call(session, target)
            result.latencies_s.append(time.perf_counter() - due)
        except FAILURES as exc:
            result.failed(exc)

    return request


async def closed_loop(
    session: aiohttp.ClientSession, target: Target, concurrency: int, duration_s: float, settle_s: float = 0.0
) -> LoadResult:
    """`concurrency` connections of loadtest.wire in a closed loop for `duration_s` (`session` is not used);
    the bodies rotate on from where `target.body()` left them. `elapsed_s` runs from the first request
    sent (the connections open) to the last answer; the CPU charged covers the whole phase and `settle_s` after."""
    address, requests = wire.build(target.method, target.url, target.headers, target.bodies)
    first = (target.sent + 1) % len(requests)
    outcome = wire.WireResult()

    async def run(result: LoadResult) -> None:
        nonlocal outcome
        outcome = await wire.closed_loop(address, requests[first:] + requests[:first], concurrency, duration_s)
        result.latencies_s, result.errors = outcome.latencies_s, outcome.errors
        result.first_error = f"{target.name}: {outcome.first_error}" if outcome.first_error else None

    result = await metered(target, run, settle_s)
    result.elapsed_s = outcome.elapsed_s
    target.sent += len(result.latencies_s) + result.errors
    return result


async def open_loop(
    session: aiohttp.ClientSession, target: Target, rate: float, duration_s: float, max_in_flight: int = 512
) -> LoadResult:
    async def run(result: LoadResult) -> None:
        result.dropped = await run_open(recording(session, target, result), rate, duration_s, max_in_flight)

    return await metered(target, run)
