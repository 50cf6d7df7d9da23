"""The soak benchmark's pure figures: the memory verdict (slopes, "flat" by its stated criterion) and the
requests by kind."""

from __future__ import annotations

import random

import pytest

from loadtest.soak_report import MIB, memory_verdict, summarise_requests


def samples(per_hour_mib: float, warm_up_mib: float = 0.0, noise_mib: float = 0.0) -> list[dict[str, float]]:
    """Ten minutes every 5 s: a gateway growing by `per_hour_mib`, after `warm_up_mib` gained in its first
    minute; vLLM steady at 2 GiB."""
    rng = random.Random(1)
    out = []
    for i in range(121):
        t = i * 5.0
        warm = warm_up_mib * min(t / 60, 1.0)
        mib = 200 + warm + per_hour_mib * t / 3600 + rng.uniform(-noise_mib, noise_mib)
        out.append({"t_s": t, "gateway": mib * MIB, "vllm": 2048 * MIB})
    return out


def test_a_steady_gateway_is_flat_even_after_a_warm_up_step() -> None:
    verdict = memory_verdict(samples(0.0, warm_up_mib=30), flat_mib_per_h=10)
    assert verdict["flat"] is True
    assert verdict["gateway"]["second_half"]["slope"] == pytest.approx(0.0, abs=1e-6)
    assert verdict["gateway"]["whole"]["slope"] > 10  # the warm-up alone would look like growth
    assert verdict["gateway"]["start_mib"] == pytest.approx(200)
    assert verdict["gateway"]["end_mib"] == pytest.approx(230)
    assert verdict["vllm"]["whole"]["slope"] == pytest.approx(0.0, abs=1e-6)
    assert "below 10 MiB/h" in verdict["criterion"]


def test_a_leak_is_measured_in_mib_per_hour_and_is_not_flat() -> None:
    verdict = memory_verdict(samples(60.0, noise_mib=0.5), flat_mib_per_h=10)
    assert verdict["flat"] is False
    assert verdict["gateway"]["whole"]["slope"] == pytest.approx(60, abs=3)
    assert verdict["gateway"]["second_half"]["slope"] == pytest.approx(60, abs=8)


def test_a_shrinking_gateway_is_flat_and_too_few_samples_give_no_verdict() -> None:
    assert memory_verdict(samples(-40.0), flat_mib_per_h=10)["flat"] is True
    few = memory_verdict(samples(0.0)[:2], flat_mib_per_h=10)
    assert few["flat"] is None and few["gateway"]["second_half"] is None
    assert memory_verdict([], flat_mib_per_h=10)["flat"] is None


def test_a_smoke_run_too_short_to_judge_gets_no_verdict_but_its_slopes() -> None:
    quick = [s for s in samples(60.0) if s["t_s"] <= 90]  # `--quick`: 1.5 minutes
    verdict = memory_verdict(quick, flat_mib_per_h=10)
    assert verdict["flat"] is None, "a minute and a half judges nothing"
    assert verdict["gateway"]["second_half"]["slope"] == pytest.approx(60, abs=1e-6)
    five = [s for s in samples(60.0) if s["t_s"] <= 300]
    assert memory_verdict(five, flat_mib_per_h=10)["flat"] is False


def test_requests_by_kind_count_failures_apart_from_the_latency_of_answers() -> None:
    runs = [
        (1.0, "chat", 0.2, True),
        (2.0, "chat", 0.4, True),
        (3.0, "chat", 9.0, False),
        (12.0, "feedback", 0.01, True),
    ]
    summary = summarise_requests(runs, duration_s=20)
    chat = summary["by_kind"]["chat"]
    assert (chat["requests"], chat["answered"], chat["failed"]) == (3, 2, 1)
    assert chat["p50_ms"] == pytest.approx(300)
    assert summary["by_kind"]["feedback"]["answered"] == 1
    first, second = summary["timeline"]
    assert first["per_s"] == pytest.approx(0.2)  # two answered completions in the first 10 s
    assert second["per_s"] == 0  # feedback is not a completion
