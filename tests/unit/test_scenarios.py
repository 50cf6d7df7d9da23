"""The load generator's pieces that need no server: Zipf popularity, the open and closed loops' schedules,
and the per-kind summary (latency, time to first token, inter-token latency)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from loadtest.load import run_closed, run_open
from loadtest.scenarios import Sample, summary, zipf_sequence


def test_zipf_popularity_falls_with_rank_and_s_zero_is_uniform() -> None:
    counts = Counter(zipf_sequence(20_000, 8, 1.1, seed=3))
    assert [k for k, _ in counts.most_common(3)] == [0, 1, 2]
    assert counts[0] / counts[7] == pytest.approx(8**1.1, rel=0.2)  # weight 1/rank^s
    flat = Counter(zipf_sequence(20_000, 8, 0.0, seed=3))
    assert max(flat.values()) / min(flat.values()) < 1.15
    assert zipf_sequence(50, 8, 1.1, seed=3) == zipf_sequence(50, 8, 1.1, seed=3), "seeded: the same sequence"


async def test_the_open_loop_keeps_its_schedule_and_skips_past_its_cap() -> None:
    sent: list[float] = []

    async def slow(due: float) -> None:
        sent.append(time.perf_counter() - due)
        await asyncio.sleep(2.0)

    skipped = await run_open(slow, rate=100, duration_s=0.3, max_in_flight=10)
    assert len(sent) == 10 and skipped == 20, "30 due; 10 in flight at most, the rest not sent"
    assert max(sent) < 1.0, "each sent when due, not two seconds after the one before it"


async def test_a_request_that_raises_is_not_lost_in_the_open_loop() -> None:
    async def broken(_: float) -> None:
        raise ValueError("a bug in the request")

    with pytest.raises(ValueError, match="a bug"):
        await run_open(broken, rate=50, duration_s=0.1)


async def test_the_closed_loop_keeps_its_concurrency() -> None:
    running, most = 0, 0

    async def one(_: float) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1

    await run_closed(one, concurrency=3, duration_s=0.2)
    assert most == 3


def test_the_summary_reads_streams_apart_and_leaves_errors_out_of_latency() -> None:
    samples = [
        Sample("chat stream", "t", "m", 0.0, 0.5, ttft_s=0.1, gaps_s=[0.02, 0.04]),
        Sample("chat stream", "t", "m", 1.0, 0.7, ttft_s=0.3, gaps_s=[0.06]),
        Sample("chat", "t", "m", 2.0, 0.4),
        Sample("chat", "t", "m", 3.0, 9.9, error="HTTP 503 engine_unavailable"),
        Sample("feedback", "t", "", 4.0, 0.01),
    ]
    out = summary(samples, seconds=10)
    assert out["chat"]["requests"] == 2 and out["chat"]["errors"] == 1
    assert out["chat"]["latency"]["max_ms"] == pytest.approx(400), "a failed request's time is not a latency"
    assert out["chat stream"]["ttft"]["p50_ms"] == pytest.approx(200)
    assert out["chat stream"]["inter_token"]["count"] == 3 and out["chat stream"]["inter_token"]["max_ms"] == 60
    assert "ttft" not in out["chat"] and "p95_ms" in out["chat"]["latency"]
    assert out["all completions"]["requests"] == 4 and out["all completions"]["per_s"] == pytest.approx(0.3)
    assert out["feedback"]["requests"] == 1
