"""The comparison's loaded phases run in turns over the targets; each target's segments are pooled."""

from __future__ import annotations

import pytest

from loadtest.compare import Config
from loadtest.load import LoadResult


def test_segments_pool_latencies_counts_time_and_cpu() -> None:
    first = LoadResult([0.001, 0.002], errors=1, dropped=2, elapsed_s=2.0, cpu_s=0.5, first_error="E1")
    second = LoadResult([0.003], errors=0, dropped=1, elapsed_s=1.0, cpu_s=0.25, first_error="E2")
    whole = LoadResult.combined([first, second]).summary()
    assert whole["requests_per_s"] == pytest.approx(1.0)  # 3 requests over 3 s, not the mean of 1 and 1
    assert whole["cpu_ms_per_request"] == pytest.approx(250.0)
    assert (whole["errors"], whole["dropped"], whole["first_error"]) == (1, 3, "E1")
    assert whole["max_ms"] == pytest.approx(3.0)


def test_cpu_is_unknown_when_a_segment_could_not_measure_it() -> None:
    parts = [LoadResult([0.001], elapsed_s=1.0, cpu_s=0.1), LoadResult([0.001], elapsed_s=1.0)]
    for order in (parts, parts[::-1]):
        assert LoadResult.combined(order).summary()["cpu_ms_per_request"] is None


def test_phase_rounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="phase_rounds"):
        Config(phase_rounds=0)
