"""The retraining benchmark's report (loadtest.retraining): the CPU in a line, the throughput and loop tables,
the loop's steps as a plot, the parts kept from the last run, and the files it writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loadtest.reports import write_atomic
from loadtest.runner import console

STEPS = ("users", "train CLI", "dataset", "fit", "eval", "publish", "canary")
"""The loop's steps in order; "train CLI" is `loragate train run` besides its four steps (imports, summary)."""


def cpu_line(info: dict[str, Any]) -> str:
    vectors = f"AVX-512 ({', '.join(info['avx512'])})" if info["avx512"] else "AVX2 only" if info["avx2"] else "no AVX2"
    return f"{info['model']}, {info['cores']} cores, {vectors}" + (", AMX" if info["amx"] else "")


def throughput_lines(part: dict[str, Any]) -> list[str]:
    lines = [
        "## Training throughput (1 epoch)" + (f" (measured {part['measured']})" if "measured" in part else ""),
        "",
        f"{part['examples']} demo tickets with their ideal answers (TRL prompt/completion) through training.dataset "
        f"and training.train, precision **{part['precision']}** (training.hardware). Inside the epoch only "
        "(loading, evaluation and checkpoints excluded).",
        "",
        "| Config | Examples | Examples/s | Tokens/s | Tokens/ex. | lr, batch, max_length, r | Epoch s | Wall s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in part["configs"].items():
        c = r["config"]
        lines.append(
            f"| {name} | {r['train_examples']} | **{r['examples_per_s']:.2f}** | **{r['tokens_per_s']:.0f}** | "
            f"{r['tokens_per_example']:.0f} | {c['learning_rate']:g}, {c['batch_size']}, {c['max_length']}, "
            f"{c['lora_r']} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |"
        )
    return [*lines, ""]


def loop_lines(part: dict[str, Any], target_s: float) -> list[str]:
    steps, demo, run, n = part["steps_s"], part["demo"], part["run"], part["demo"].get("tickets")
    train, card, loop_s = run.get("train") or {}, run.get("data_card") or {}, max(part["loop_s"], 1e-9)
    splits = ", ".join(f"{k} {v.get(card.get('method'))}" for k, v in (card.get("splits") or {}).items())
    lines = [
        f"## The loop: {n} feedback events to a promoted canary"
        + (f" (measured {part['measured']})" if "measured" in part else ""),
        "",
        f"`python -m demo --tickets {n}` against {part['redis_servers']} redis-server(s) and `loragate serve` with "
        f"its vLLM (ready in {part['startup_s']:.0f} s, not counted). Canary {demo.get('canary')}: "
        f"**{demo.get('status', 'undecided')}** after {len(demo.get('canary_rounds', []))} rounds of "
        f"{part['canary_round']} tickets.",
        "",
        "| Step | Seconds | Share of the loop |",
        "|---|---:|---:|",
        *(f"| {k} | {v:.1f} | {'' if k == 'users' else f'{v / loop_s:.0%}'} |" for k, v in steps.items()),
        f"| **from {n} events to promoted** | **{part['loop_s']:.0f}** | |",
        f"| with the users phase | {part['with_users_s']:.0f} | |",
        "",
        f"**{part['verdict']}** (target {target_s / 60:.0f} min): {part['loop_s'] / 60:.1f} min from {n} feedback "
        f"events to a promoted canary; {part['with_users_s'] / 60:.1f} min with the simulated users sending them.",
        "",
        f"Users before retraining: {demo.get('before')}. Dataset (examples): {splits}. Fit: "
        f"{train.get('train_examples')} examples x {len(train.get('epochs') or [])} epochs, "
        f"{train.get('examples_per_s', 0):.2f} examples/s, {train.get('tokens_per_s', 0):.0f} tokens/s "
        f"({train.get('precision')}). Eval: {card.get('eval_rows')} test prompts through the gateway.",
    ]
    if part["demo_exit_code"]:
        lines += ["", f"**The demo failed** (exit code {part['demo_exit_code']}); its output is in the console log."]
    return [*lines, "", (run.get("eval") or {}).get("table", ""), ""]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Retraining on this CPU",
        "",
        f"{report['date']} · `{report['command']}` · {cpu_line(report['cpu'])} · load average "
        f"{report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} after · "
        f"other vLLM servers running: {report['other_vllm_servers']}",
        "",
    ]
    if "throughput" in report:
        lines += throughput_lines(report["throughput"])
    if "loop" in report:
        lines += loop_lines(report["loop"], report["config"]["target_s"])
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """The loop's steps as stacked bars (from the events; with the users phase) against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loop, target_s = report["loop"], report["config"]["target_s"]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    rows = [("from events", [s for s in STEPS if s != "users"]), ("with users", list(STEPS))]
    for y, (_, steps) in enumerate(rows):
        left = 0.0
        for step in steps:
            width = loop["steps_s"][step]
            ax.barh(y, width, left=left, color=f"C{STEPS.index(step)}", label=step if y else None)
            if width > 15:
                ax.text(left + width / 2, y, f"{width:.0f}", ha="center", va="center", fontsize=8)
            left += width
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.axvline(target_s, color="red", linestyle="--", label=f"target {target_s:.0f} s")
    ax.set_xlabel("seconds")
    ax.set_title(f"{loop['demo'].get('tickets')} feedback events to a promoted canary: {loop['verdict']} · "
                 f"{cpu_line(report['cpu'])}", fontsize=9)  # fmt: skip
    ax.legend(ncol=8, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def earlier(output_dir: Path, skipped: list[str]) -> dict[str, Any]:
    """The parts this run skips, from the last report (each with the date it was measured), if there is one."""
    try:
        old = json.loads((output_dir / "retraining.json").read_text())
    except (OSError, ValueError):
        return {}
    return {part: old[part] | {"measured": old[part].get("measured", old["date"])} for part in skipped if part in old}


def publish_report(output_dir: Path, report: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "retraining.json", json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    write_atomic(output_dir / "retraining.md", text)
    if "loop" in report:
        plot(report, output_dir / "retraining.png")
    print(text)
    console.print(f"wrote {os.path.relpath(output_dir)}/retraining.{{md,json,png}} in {report['wall_s']:.0f} s")
