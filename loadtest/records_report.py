"""The records benchmark's report (loadtest.records): its targets (met / not met), the Markdown tables, the plot
and a summary line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.records_run import BASELINE, POLICIES, TARGET_DROP, TARGET_EVENTS_S, TARGET_LOGGED
from loadtest.runner import console

FEEDBACK_LABELS = {
    "durable": "POST /v1/feedback, records Redis fsyncs (`appendfsync always`): 200",
    "on": "POST /v1/feedback, records Redis does not fsync (fsynced local spool): 202",
    "healthz": "GET /healthz, same gateway (floor)",
}


TPUT_HEAD = (
    "| clients | Gateway | requests/s | per process | drop | p50 ms | p99 ms | errors | CPU us/request: gateway "
    "| with record process | Redis | machine |\n|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def rows(items: list[list[Any]]) -> str:
    return "\n".join(f"| {' | '.join(map(str, item))} |" for item in items)


def markdown(report: dict[str, Any]) -> str:
    m, cfg, rec, t, log, fb = (report[k] for k in ("machine", "config", "recorder", "throughput", "logged", "feedback"))
    rec_rows = [
        [mode, v, f"{r['events_per_s']:,.0f}", f"{r['ratio_to_baseline']:.2f}", f"{r['cpu_us_per_event']:.0f}"]
        + [f"{r.get('redis_cpu_us_per_event', 0):.0f}", met(r["target_met"])]
        for mode in ("plain", "durable")
        for v, r in rec[mode].items()
    ]
    fb_rows = [
        [label, c, f"{fb[p][n]['p50_ms']:.2f}", f"{fb[p][n]['p99_ms']:.2f}"]
        + [", ".join(f"{s}: {k}" for s, k in sorted(fb[p][n]["statuses"].items()))]
        for p, c in (("sequential", 1), ("concurrent", fb["concurrency"]))
        for n, label in FEEDBACK_LABELS.items()
    ]
    return f"""# What recording costs

- Date: {report["date"]}; command: `{report["command"]}`
- Machine: {m["cores"]} cores ({m["cpu_model"]}), {m["platform"]}, Python {m["python"]}, redis-server \
{report["versions"].get("redis-server", "?")} on {report["filesystem"]}; load average \
{report["load_average_before"][0]:.2f} before, {report["load_average_after"][0]:.2f} after

## 1. Recorder throughput, one gateway process (target >= {TARGET_EVENTS_S:,} events/s)

{cfg["events"]:,} chat records per row (system + user message, a vLLM `chat.completion` answer; one in ten with \
an e-mail and a phone number): `record()` of all, then wait until written; the stream length is checked. Built and \
written by one record process, but where the row says more (`LORAGATE_RECORD_WORKERS`). The record path \
(redaction, building) {compiled_text(rec)}. Baseline: {BASELINE[0]} Redis, {BASELINE[1]}. CPU per event: this \
process's and its record processes', and the Redis server's.

| Redis | Policy | events/s | / baseline | CPU us/event | Redis CPU us/event | target |
|---|---|---:|---:|---:|---:|---|
{rows(rec_rows)}

## 2. Gateway requests/s, recording off vs on (target: at most {TARGET_DROP:.0%} lower)

Non-stream chat requests from {" and then ".join(str(run["concurrency"]) for run in concurrency_runs(t))} \
concurrent clients, {t["seconds_per_target"]:g} s per side and concurrency: each side is two gateway processes, \
which take turns with the other side's in {len(t["order"])} segments (two processes of one build can differ by 3-4%); \
same mock upstream, same Redis. The drop is judged at {t["concurrency"]} clients, where the gateway process is busy \
all the time: the gateway's capacity. CPU per request: the side's gateway processes (and their record processes), \
Redis's and the whole machine's in its segments.

{TPUT_HEAD}
{rows(throughput_rows(t))}

{where_the_drop_goes(t)}

Drop at {t["concurrency"]} clients: **{t["drop"]:+.1%}**: {met(t["target_met"])}. In the "on" gateways' log: \
{log["records"]:,} records for \
{log["answered"]:,} answered requests ({log["ratio"]:.2%}; target >= {TARGET_LOGGED:.0%}: {met(log["target_met"])}).

## 3. Feedback latency, by durability

{fb["requests_per_target"]} requests per row, one at a time (the three taking turns), then with \
{fb["concurrency"]} concurrent clients. Durable feedback all 200: {met(fb["durable_all_200"])}.

| Request | clients | p50 ms | p99 ms | statuses |
|---|---:|---:|---:|---|
{rows(fb_rows)}
"""


def concurrency_runs(t: dict[str, Any]) -> list[dict[str, Any]]:
    """Section 2's runs, one per concurrency (a report from before `by_concurrency`: its one)."""
    runs: list[dict[str, Any]] = t.get("by_concurrency", [t])
    return runs


def throughput_rows(t: dict[str, Any]) -> list[list[Any]]:
    """Section 2's rows: each concurrency's two sides."""
    return [
        [run["concurrency"], f"recording {n}", f"{r['requests_per_s']:.0f}", processes(r), drop_text(run, n)]
        + [f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", r["errors"], f"{r['cpu_us_per_request']:.0f}"]
        + [f"{r.get('tree_cpu_us_per_request', 0):.0f}", f"{r.get('redis_cpu_us_per_request', 0):.0f}"]
        + [f"{r.get('machine_cpu_us_per_request', 0):.0f}"]
        for run in concurrency_runs(t)
        for n, r in ((n, run[n]) for n in ("off", "on"))
    ]


def processes(side: dict[str, Any]) -> str:
    return " / ".join(f"{rate:,.0f}" for rate in side.get("per_process_requests_per_s", []))


def drop_text(run: dict[str, Any], side: str) -> str:
    return f"{run['drop']:+.1%}" if side == "on" else ""


def compiled_text(rec: dict[str, Any]) -> str:
    if not rec.get("compiled"):
        return "ran as Python (not compiled: `gateway.native`)"
    return (
        "ran compiled (mypyc, `gateway.native`); the rows marked Python ran the same record process with "
        "`LORAGATE_NATIVE=0` (the modules the compiled ones are built from), each beside its compiled row, which "
        "of the two first taking turns"
    )


def where_the_drop_goes(t: dict[str, Any]) -> str:
    """What recording adds to each process's CPU per request, which resource was the limit (the gateway process, one
    core at most, or the whole machine), and the drop that resource's CPU per request alone would predict."""
    off, on = t["off"], t["on"]
    if not off.get("machine_cpu_us_per_request") or not on.get("machine_cpu_us_per_request"):
        return ""  # a report from before the machine's CPU was counted
    gateway = on["cpu_us_per_request"] - off["cpu_us_per_request"]
    record = (on["tree_cpu_us_per_request"] - on["cpu_us_per_request"]) - (
        off["tree_cpu_us_per_request"] - off["cpu_us_per_request"]
    )
    redis = on["redis_cpu_us_per_request"] - off["redis_cpu_us_per_request"]
    machine = on["machine_cpu_us_per_request"] - off["machine_cpu_us_per_request"]
    busy = {n: side["cpu_us_per_request"] * side["requests_per_s"] / 1e6 for n, side in (("off", off), ("on", on))}
    if min(busy.values()) >= 0.9:  # one event loop, one core: it is the limit
        limit, key = f"the gateway process ({busy['off']:.0%} / {busy['on']:.0%} of a core)", "cpu_us_per_request"
    else:
        key = "machine_cpu_us_per_request"
        limit = f"the machine ({off['machine_busy']:.0%} / {on['machine_busy']:.0%} busy)"
    return (
        f"Where the drop goes: recording on adds **{machine:+.0f} µs** of the whole machine's CPU per request "
        f"({off['machine_cpu_us_per_request']:.0f} → {on['machine_cpu_us_per_request']:.0f}; the machine "
        f"{off['machine_busy']:.0%} / {on['machine_busy']:.0%} busy): **{gateway:+.0f} in the gateway process**, "
        f"{record:+.0f} in its record process, {redis:+.0f} in Redis, {machine - gateway - record - redis:+.0f} "
        f"elsewhere (the client, the mock upstream, the kernel). The limit was {limit}: its CPU per request alone "
        f"predicts a drop of {1 - off[key] / on[key]:.1%} (measured: {t['drop']:.1%})."
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [3, 1.3, 2.5]})
    for k, mode in enumerate(("plain", "durable")):
        values = [report["recorder"][mode][v]["events_per_s"] for v in POLICIES]
        a.bar([x + (k - 0.5) * 0.4 for x in range(len(POLICIES))], values, 0.4, label=f"{mode} Redis")
    a.axhline(TARGET_EVENTS_S, color="red", linestyle="--", label="target")
    a.set(xticks=range(len(POLICIES)), xticklabels=list(POLICIES), ylabel="events/s", title="1. Recorder")
    t, fb = report["throughput"], report["feedback"]
    for k, run in enumerate(concurrency_runs(t)):
        x = [k * 2.5, k * 2.5 + 1]
        b.bar(x, [run["off"]["requests_per_s"], run["on"]["requests_per_s"]], color=["grey", "C0"])
        b.text(x[1], run["on"]["requests_per_s"], f"{-run['drop']:+.1%}", ha="center", va="bottom", fontsize=8)
    labels = [f"{run['concurrency']}: {n}" for run in concurrency_runs(t) for n in ("off", "on")]
    ticks = [k * 2.5 + j for k in range(len(labels) // 2) for j in (0, 1)]
    b.set_xticks(ticks, labels, fontsize=7)
    b.set(ylabel="requests/s", title="2. Recording off/on (clients: side)")
    for k, phase in enumerate(("sequential", "concurrent")):
        p50 = [fb[phase][n]["p50_ms"] for n in FEEDBACK_LABELS]
        up = [fb[phase][n]["p99_ms"] - fb[phase][n]["p50_ms"] for n in FEEDBACK_LABELS]
        x = [i + (k - 0.5) * 0.4 for i in range(3)]
        c.bar(x, p50, 0.4, yerr=[[0] * 3, up], capsize=3, label=f"{phase}: p50 (bar) to p99")
    c.set(xticks=range(3), xticklabels=["fsync: 200", "spool: 202", "healthz"], ylabel="ms", title="3. Feedback")
    a.legend(fontsize=8)
    c.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"loragate recording: {report['machine']['cores']} cores, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict[str, Any]) -> None:
    rec, t, log, fb = (report[k] for k in ("recorder", "throughput", "logged", "feedback"))
    slowest = min(r["events_per_s"] for mode in ("plain", "durable") for r in rec[mode].values())
    verdicts = [f"recorder >= {TARGET_EVENTS_S:,}/s everywhere: {slowest >= TARGET_EVENTS_S}"]
    verdicts += [f"drop <= {TARGET_DROP:.0%}: {t['target_met']}", f"logged: {log['target_met']}"]
    console.print("; ".join(verdicts + [f"durable feedback all 200: {fb['durable_all_200']}"]))
