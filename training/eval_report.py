"""The evidence of an eval gate, written next to the run: eval_report.json (the whole `EvalReport`) and
eval_report.md (the metrics of base, current and candidate side by side, the decision and its reasons,
and example answers)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.evaluate import EvalReport, Prompt, Scores

CELL_CHARS = 240
"""Longest text in a cell of the Markdown report's examples."""


def _cell(text: str, limit: int = CELL_CHARS) -> str:
    """Text for one Markdown table cell: shortened, one line, pipes escaped."""
    short = text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
    return short.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {_content(m.get('content'))}" for m in prompt)


def _content(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content)


def _row(label: str, cells: Sequence[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


def markdown_table(report: EvalReport) -> str:
    """Metrics (rows) of base, current and candidate (columns), then latency, errors and the regression set."""
    columns = (report.base, report.current, report.candidate)

    def cells(value: Callable[[Scores], str]) -> list[str]:
        return ["–" if scores is None else value(scores) for scores in columns]

    lines = ["| metric | base | current | candidate |", "|---|---:|---:|---:|"]
    for name in report.candidate.metrics:
        label = f"**{name}** (primary)" if name == report.primary_metric else name
        lines.append(_row(label, cells(functools.partial(_metric_cell, name))))
    lines.append(_row("latency p50 (ms)", cells(lambda s: _number(s.latency_p50_ms, 0))))
    lines.append(_row("latency p95 (ms)", cells(lambda s: _number(s.latency_p95_ms, 0))))
    lines.append(_row("errors", cells(lambda s: f"{s.errors}/{s.n}")))
    if report.regression is not None:
        primary, regression = report.primary_metric, report.regression
        serving = _number(regression.serving.metrics[primary])
        before = ["–", serving] if report.current is not None else [serving, "–"]
        candidate = _number(regression.candidate.metrics[primary])
        lines.append(_row(f"{primary} on the regression set (n={regression.candidate.n})", [*before, candidate]))
    return "\n".join(lines)


def _metric_cell(name: str, scores: Scores) -> str:
    return _number(scores.metrics.get(name))


def markdown_report(report: EvalReport) -> str:
    models = ", ".join(f"{role} `{name}`" for role, name in report.models.items())
    decision = report.decision
    verdict = "publish" if decision.publish else "none (ask again)" if decision.unjudged else "do not publish"
    lines = ["# Eval report", "", f"Models: {models}.", "", markdown_table(report), "", f"## Decision: {verdict}", ""]
    lines += [f"- {reason}" for reason in report.decision.reasons]
    lines += ["", "## Examples"]
    for number, example in enumerate(report.examples, start=1):
        answers = [example.reference, example.base, example.current or "–", example.candidate]
        lines += [
            "",
            f"### {number}",
            "",
            f"**Prompt:** {_cell(_prompt_text(example.prompt), 2 * CELL_CHARS)}",
            "",
            "| reference | base | current | candidate |",
            "|---|---|---|---|",
            "| " + " | ".join(_cell(text) for text in answers) + " |",
        ]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, folder: str | Path) -> tuple[Path, Path]:
    """Writes eval_report.json and eval_report.md into the folder (made if missing); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / "eval_report.json", folder / "eval_report.md"
    json_path.write_text(report.model_dump_json(indent=2) + "\n")
    markdown_path.write_text(markdown_report(report))
    return json_path, markdown_path


def each_tenth(say: Callable[[str], None]) -> Callable[[str, int, int], None]:
    """The eval's progress (training.evaluate's `progress`) as lines for a run's log: each model's answers at every
    tenth and at the end (a test set of hundreds of prompts took minutes a model on CPU with nothing shown)."""

    def report(what: str, done: int, total: int) -> None:
        if done == total or done % max(total // 10, 1) == 0:
            say(f"eval {what}: {done}/{total}")

    return report
