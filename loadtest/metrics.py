"""What the benchmarks measure with: latency statistics (and a paired bootstrap interval), CPU time of processes,
Prometheus text."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Prometheus samples by sample name (`x_total`, `x_bucket`, ...): (labels, value) for each series."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 1]."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarise(latencies_s: Sequence[float]) -> dict[str, float]:
    """Latency statistics in milliseconds."""
    values = sorted(x * 1000 for x in latencies_s)
    return {
        "count": len(values),
        "mean_ms": statistics.fmean(values) if values else math.nan,
        "min_ms": values[0] if values else math.nan,
        "p50_ms": percentile(values, 0.50),
        "p90_ms": percentile(values, 0.90),
        "p95_ms": percentile(values, 0.95),
        "p99_ms": percentile(values, 0.99),
        "max_ms": values[-1] if values else math.nan,
    }


def stats(values: np.ndarray) -> dict[str, float]:
    p50, p95, p99 = (float(x) for x in np.percentile(values, [50, 95, 99]))
    return {"count": int(values.size), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": float(values.mean())}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> list[float]:
    """95% interval of p50(b) - p50(a), resampling the rounds' request slots (a[i] and b[i] were sent
    side by side, so they are resampled together)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for done in range(0, resamples, 100):
        idx = rng.integers(0, a.size, size=(min(100, resamples - done), a.size))
        diffs.append(np.median(b[idx], axis=1) - np.median(a[idx], axis=1))
    low, high = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return [float(low), float(high)]


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        node: Any = run
        for key in path:
            node = node[key]
        values.append(node)
    return statistics.median(values)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and every live descendant (workers, record processes)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent working (every core), from /proc/stat: user (a guest's time is counted in it
    already), nice, system, interrupts; not idle, I/O wait, or steal (the hypervisor running something else)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)


def tree_rss(root: psutil.Process) -> dict[str, Any]:
    """RSS of a process and all its descendants, in bytes, with each process's share."""
    procs = [root, *root.children(recursive=True)]
    per = []
    for proc in procs:
        try:
            per.append({"pid": proc.pid, "name": proc.name(), "rss": proc.memory_info().rss})
        except psutil.Error:
            continue
    return {"rss": sum(p["rss"] for p in per), "processes": per}


def parse_prometheus(text: str) -> Samples:
    """Prometheus text exposition, parsed by prometheus_client."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the series of `name` whose labels include `labels`."""
    return sum(value for lab, value in samples.get(name, []) if all(lab.get(k) == v for k, v in labels.items()))
