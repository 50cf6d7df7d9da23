"""The records benchmark's account of where recording's cost goes (loadtest/records_report.py)."""

from __future__ import annotations

from loadtest.metrics import machine_busy_seconds
from loadtest.records_report import throughput_rows, where_the_drop_goes


def side(own: float, tree: float, redis: float, machine: float, rate: float = 3500) -> dict[str, float]:
    return {
        "requests_per_s": rate,
        "cpu_us_per_request": own,
        "tree_cpu_us_per_request": tree,
        "redis_cpu_us_per_request": redis,
        "machine_cpu_us_per_request": machine,
        "machine_busy": machine * rate / 2e6,
    }


def test_each_process_share_of_what_recording_adds_and_the_drop_it_predicts() -> None:
    off, on = side(272, 272, 1, 546, 1800), side(295, 336, 18, 636, 1600)  # +23 gateway, +41 record process, +17 Redis
    text = where_the_drop_goes({"off": off, "on": on, "drop": 0.11})
    assert "**+90 µs**" in text and "546 → 636" in text
    assert "+23 in the gateway process**, +41 in its record process, +17 in Redis, +9 elsewhere" in text
    assert "The limit was the machine (49% / 51% busy)" in text  # the gateway process about half a core
    assert f"predicts a drop of {1 - 546 / 636:.1%} (measured: 11.0%)" in text


def test_a_gateway_process_at_a_whole_core_is_the_limit() -> None:
    off, on = side(270, 270, 1, 330, 3700), side(300, 345, 17, 410, 3300)  # one core each, the machine 61% / 68%
    text = where_the_drop_goes({"off": off, "on": on, "drop": 0.108})
    assert "The limit was the gateway process (100% / 99% of a core)" in text
    assert f"predicts a drop of {1 - 270 / 300:.1%} (measured: 10.8%)" in text


def test_a_report_from_before_the_machine_was_counted_says_nothing() -> None:
    old = {"cpu_us_per_request": 272, "tree_cpu_us_per_request": 272}
    assert where_the_drop_goes({"off": old, "on": old, "drop": 0.1}) == ""


def test_the_machine_busy_time_grows_with_work() -> None:
    before = machine_busy_seconds()
    total = sum(i * i for i in range(3_000_000))  # about 0.2 s of one core
    assert total > 0 and machine_busy_seconds() > before


def test_each_concurrency_shows_both_sides_their_processes_and_the_drop() -> None:
    def run(clients: int, off_rates: list[float], on_rates: list[float], drop: float) -> dict[str, object]:
        sides = {"off": side(170, 171, 1, 230), "on": side(184, 210, 19, 300)}
        for (name, rates), latency in zip((("off", off_rates), ("on", on_rates)), (2.7, 3.0), strict=True):
            sides[name] |= {"per_process_requests_per_s": rates, "p50_ms": latency, "p99_ms": latency * 2, "errors": 0}
        return {"concurrency": clients, **sides, "drop": drop}

    low, high = run(16, [5700, 5800], [5100, 5200], 0.11), run(64, [5850, 5900], [5500, 5560], 0.06)
    table = throughput_rows({**high, "by_concurrency": [low, high]})
    assert [row[:2] for row in table] == [
        [16, "recording off"],
        [16, "recording on"],
        [64, "recording off"],
        [64, "recording on"],
    ]
    assert table[3][3] == "5,500 / 5,560" and table[3][4] == "+6.0%" and table[2][4] == ""
    assert table[1][4] == "+11.0%" and table[1][8] == "184"
    assert throughput_rows(high)[1][4] == "+6.0%"  # a report with one concurrency only
