"""The eval gate of a retraining run: the candidate adapter, the version now serving and the base each
answer the test split through the gateway (temperature 0), the answers are scored with the configured
metrics (training.metrics), and `decide` applies the publish rule: the candidate must beat the serving
version (the base when the alias has none) by `publish_margin` on the primary metric and must not
drop by more than `max_regression` on the regression set. `training.eval_report` writes the evidence
(eval_report.json and eval_report.md).

Failed requests are kept, not raised: a failed answer counts as wrong on every metric, is left out
of the latency percentiles, and is counted in `Scores.errors`. That is fair to the candidate's own failures,
not to the bar's: when the model the candidate is compared with fails on any prompt, there is no verdict.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.conversation import as_sent
from training.config import RetrainConfig
from training.metrics import metric_means

Prompt = str | list[dict[str, Any]]
"""A chat prompt (messages, sent to /v1/chat/completions) or a text prompt (sent to /v1/completions)."""
Progress = Callable[[int, int], None]
"""Called with (answered, total) after each answer."""
EPSILON = 1e-9
"""Slack in the publish rule's comparisons, so that 0.15 >= 0.10 + 0.05 holds in floating point."""


class EvalRow(BaseModel):
    """A line of eval.jsonl ({prompt, reference}) or of the regression set ({prompt, completion})."""

    model_config = ConfigDict(frozen=True)

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[dict[str, Any]], Field(min_length=1)]
    reference: str
    tools: Annotated[list[dict[str, Any]], Field(min_length=1)] | None = None
    """The tool definitions a chat prompt is asked with (as the request that made it declared them: a list, or its JSON
    as dataset rows carry it)."""

    @field_validator("tools", mode="before")
    @classmethod
    def _tools_of_a_row(cls, tools: Any) -> Any:
        return json.loads(tools) if isinstance(tools, str) else tools

    @model_validator(mode="before")
    @classmethod
    def _completion_is_the_reference(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "reference" in data or "completion" not in data:
            return data
        completion = data["completion"]
        if isinstance(completion, list):  # TRL's conversational form: the assistant's messages
            completion = "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
        return {**data, "reference": completion}

    @field_validator("prompt")
    @classmethod
    def _messages_have_roles(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list) and not all("role" in message for message in prompt):
            raise ValueError("every message of a chat prompt needs a role")
        return prompt

    @model_validator(mode="after")
    def _tools_only_with_messages(self) -> EvalRow:
        if self.tools is not None and isinstance(self.prompt, str):
            raise ValueError("tools go with a chat prompt (messages), not a text prompt")
        return self


def load_rows(path: str | Path) -> list[EvalRow]:
    """The rows of a JSONL file (blank lines skipped); ValueError naming the line of a bad one."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(EvalRow.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{number}: not an eval row ({{prompt, reference|completion}}): {exc}") from exc
    return rows


class Answer(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    latency_ms: float
    error: str | None = None
    """Why there is no answer ("" then stands for it); None for an answer."""
    unavailable: bool = False
    """The request failed for no fault of the model: rate-limited (429: the tenant's quota, spent by its own traffic),
    no engine or state to serve it (503: a replica restarting, Redis away), the connection lost or timed out. Not a
    502, which an adapter that cannot load, or that fails its engine, gets."""


async def answer_one(
    client: openai.AsyncOpenAI,
    model: str,
    prompt: Prompt,
    *,
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> Answer:
    """One greedy (temperature 0) answer, a chat prompt asked with its `tools` (an answer that calls one has no text);
    a failed request becomes an Answer with its error."""
    start = time.perf_counter()
    try:
        if isinstance(prompt, str):
            completion = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_headers=extra_headers
            )
            texts = [choice.text for choice in completion.choices]
        else:
            declared: dict[str, Any] = {"tools": tools} if tools else {}  # none: left out (openai 1.x has no `omit`)
            chat = await client.chat.completions.create(
                model=model,
                messages=cast("list[ChatCompletionMessageParam]", as_sent(prompt)),
                max_tokens=max_tokens,
                temperature=0,
                extra_headers=extra_headers,
                **declared,
            )
            texts = [choice.message.content or "" for choice in chat.choices]
    except openai.OpenAIError as exc:
        error: str | None = f"{type(exc).__name__}: {exc}"
        texts, unavailable = [""], _unavailable(exc)
    else:
        error, unavailable = (None if texts else "the response has no choices"), False
    latency_ms = (time.perf_counter() - start) * 1000
    return Answer(text=texts[0] if texts else "", latency_ms=latency_ms, error=error, unavailable=unavailable)


def _unavailable(exc: openai.OpenAIError) -> bool:
    """Whether a failed request says nothing of the model (Answer.unavailable)."""
    if isinstance(exc, openai.APIConnectionError):  # its timeout too
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503)


async def answer_all(
    client: openai.AsyncOpenAI,
    model: str,
    rows: Sequence[EvalRow],
    *,
    max_tokens: int,
    concurrency: int = 4,
    extra_headers: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> list[Answer]:
    """The model's answers to the rows' prompts (each with its tools), in their order, at most `concurrency`
    requests at a time.

    Give the client `max_retries=0` to count every failure rather than retry it into the latencies.
    """
    semaphore = asyncio.Semaphore(concurrency)
    answered = [0]

    async def one(row: EvalRow) -> Answer:
        async with semaphore:
            answer = await answer_one(
                client, model, row.prompt, max_tokens=max_tokens, tools=row.tools, extra_headers=extra_headers
            )
        answered[0] += 1
        if progress is not None:
            progress(answered[0], len(rows))
        return answer

    return list(await asyncio.gather(*(one(row) for row in rows)))


class Scores(BaseModel):
    n: int
    errors: int
    failed: list[int] = Field(default_factory=list)
    """Which prompts' answers failed (their indices)."""
    unavailable: list[int] = Field(default_factory=list)
    """Of those, the ones whose request failed for no fault of the model (Answer.unavailable)."""
    first_error: str | None = None
    """The first failed answer's error, as the client said it (an outage named rather than counted only)."""
    metrics: dict[str, float]
    """Each configured metric's mean over all n prompts (failed answers score 0)."""
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    """Over the answers that did not fail; None when all failed."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def score(answers: Sequence[Answer], references: Sequence[str], config: RetrainConfig) -> Scores:
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    latencies = [answer.latency_ms for answer in answers if answer.error is None]
    return Scores(
        n=len(answers),
        errors=len(answers) - len(latencies),
        failed=[i for i, answer in enumerate(answers) if answer.error is not None],
        unavailable=[i for i, answer in enumerate(answers) if answer.unavailable],
        first_error=next((answer.error[:300] for answer in answers if answer.error is not None), None),
        metrics=metric_means([answer.text for answer in answers], references, config),
        latency_p50_ms=percentile(latencies, 50) if latencies else None,
        latency_p95_ms=percentile(latencies, 95) if latencies else None,
    )


class Decision(BaseModel):
    publish: bool
    reasons: list[str]
    unjudged: bool = False
    """No verdict: the model the candidate is measured against failed on some prompts (`comparison_failures`).
    Not a rejection of the candidate: the run refuses to go on, and its eval can be asked again."""


def comparison_failures(
    candidate: Scores, serving: Scores, name: str, regression: tuple[Scores, Scores] | None
) -> list[str]:
    """Why the candidate cannot be judged: the model it is compared with failed on prompts the candidate answered,
    on the test split or the regression set (a failed answer scores 0, so the candidate would "win" against answers
    that never came: a version that is down, a replica that errs), or the candidate failed on every prompt and the
    other model on some (an outage while they were asked one after the other). A prompt both fail on (one over the
    context, say) scores 0 for both and is no reason: it would fail the same way whenever the eval were asked again.
    No threshold above zero: on a test split of a few dozen prompts one failure moves the mean by as much as
    `publish_margin`, and asking again costs one eval. So too where the candidate's own requests failed for no
    fault of its answers (Scores.unavailable) on prompts the other model answered: scored 0, a better candidate was
    rejected, and its run ended, for two 429s."""
    who = "the version now serving" if name == "current" else "the base"
    pairs = [("the test split", candidate, serving)]
    if regression is not None:
        pairs.append(("the regression set", *regression))
    reasons = []
    for where, ours, theirs in pairs:
        only_theirs = set(theirs.failed) - set(ours.failed)
        only_ours = set(ours.unavailable) - set(theirs.failed)
        if only_theirs:
            reasons.append(
                f"{who} failed on {len(only_theirs)} of {theirs.n} prompts of {where} that the candidate answered "
                f"({theirs.first_error}): the candidate is not judged against answers that never came"
            )
        elif ours.n and len(ours.failed) == ours.n and theirs.failed:  # e.g. vLLM went down while they were asked
            reasons.append(
                f"the candidate failed on all {ours.n} prompts of {where} and {who} on {len(theirs.failed)}: an "
                f"outage, not a verdict ({ours.first_error})"
            )
        elif only_ours:  # asked last, the candidate meets a quota its tenant's traffic spent, a replica restarting
            reasons.append(
                f"the candidate's requests failed on {len(only_ours)} of {ours.n} prompts of {where} that {who} "
                f"answered, for no fault of its own ({ours.first_error}): rate-limited, no engine free or a lost "
                "connection is no verdict on it"
            )
    return reasons


def decide(
    candidate: Scores,
    current: Scores | None,
    base: Scores,
    regression: tuple[Scores, Scores] | None,
    config: RetrainConfig,
) -> Decision:
    """The publish rule. `current` is None when the alias serves the base, which is then the bar;
    `regression` is (candidate, serving version) scored on the regression set, None without one. No verdict
    (`unjudged`) when the bar failed where the candidate answered, or the candidate's requests failed for no fault of
    its answers (`comparison_failures`); the candidate's other failures count as wrong answers."""
    primary, margin = config.primary_metric, config.publish_margin
    serving, name = (current, "current") if current is not None else (base, "base")
    unjudged = comparison_failures(candidate, serving, name, regression)
    if unjudged:
        return Decision(publish=False, reasons=unjudged, unjudged=True)
    if candidate.errors >= candidate.n:
        return Decision(publish=False, reasons=[f"the candidate failed on all {candidate.n} prompts"])
    ours, theirs = candidate.metrics[primary], serving.metrics[primary]
    beats = ours + EPSILON >= theirs + margin
    sign = ">=" if beats else "<"
    reasons = [f"{primary} {ours:.3f} {sign} {name} {theirs:.3f} + margin {margin:.3f}"]
    if current is not None:
        reasons.append(f"{primary} {ours:.3f} vs base {base.metrics[primary]:.3f}")
    holds = True
    if regression is not None:
        ours_r, theirs_r = regression[0].metrics[primary], regression[1].metrics[primary]
        drop = theirs_r - ours_r
        holds = drop <= config.max_regression + EPSILON
        sign = "<=" if holds else ">"
        reasons.append(
            f"regression set: {primary} {ours_r:.3f} vs {name} {theirs_r:.3f}, "
            f"drop {max(drop, 0.0):.3f} {sign} allowed {config.max_regression:.3f}"
        )
    if candidate.errors:
        reasons.append(f"the candidate failed on {candidate.errors} of {candidate.n} prompts (scored as wrong)")
    return Decision(publish=beats and holds, reasons=reasons)


class RegressionScores(BaseModel):
    candidate: Scores
    serving: Scores
    """The version now serving, or the base when the alias has none."""


class Example(BaseModel):
    prompt: Prompt
    reference: str
    base: str
    current: str | None
    candidate: str


class EvalReport(BaseModel):
    primary_metric: str
    models: dict[str, str]
    """Model names asked, by role: base, current (absent without one), candidate."""
    candidate: Scores
    current: Scores | None
    base: Scores
    regression: RegressionScores | None
    decision: Decision
    examples: list[Example]


def _shown(answer: Answer) -> str:
    return answer.text if answer.error is None else f"[error: {answer.error}]"


def choose_examples(rows: Sequence[EvalRow], answers: dict[str, list[Answer]], count: int) -> list[Example]:
    """`count` rows side by side, first those where the candidate answers unlike the serving version."""
    serving = answers.get("current") or answers["base"]

    def same(i: int) -> bool:
        return answers["candidate"][i].text.strip() == serving[i].text.strip()

    chosen = sorted(range(len(rows)), key=same)[:count]
    return [
        Example(
            prompt=rows[i].prompt,
            reference=rows[i].reference,
            base=_shown(answers["base"][i]),
            current=_shown(answers["current"][i]) if "current" in answers else None,
            candidate=_shown(answers["candidate"][i]),
        )
        for i in chosen
    ]


async def evaluate(
    client: openai.AsyncOpenAI,
    rows: Sequence[EvalRow],
    config: RetrainConfig,
    *,
    candidate: str,
    base: str,
    current: str | None = None,
    regression_rows: Sequence[EvalRow] = (),
    extra_headers: dict[str, str] | None = None,
    concurrency: int = 4,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalReport:
    """Asks each model (one after the other, so their latencies do not mix; the base first, which warms
    the engine up) and decides.

    `current` is the serving version's model name, None when the alias serves the base; `progress`
    is called with (what is being asked, answered, total).
    """
    if not rows:
        raise ValueError("no test rows to evaluate on")
    models = {"base": base} | ({"current": current} if current else {}) | {"candidate": candidate}

    async def ask(label: str, model: str, asked: Sequence[EvalRow]) -> list[Answer]:
        report = functools.partial(progress, label) if progress is not None else None
        return await answer_all(
            client,
            model,
            asked,
            max_tokens=config.max_new_tokens,
            concurrency=concurrency,
            extra_headers=extra_headers,
            progress=report,
        )

    references = [row.reference for row in rows]
    answers = {role: await ask(role, model, rows) for role, model in models.items()}
    scores = {role: score(answers[role], references, config) for role in models}
    regression = None
    if regression_rows:
        expected = [row.reference for row in regression_rows]
        regression = RegressionScores(
            candidate=score(await ask("regression: candidate", candidate, regression_rows), expected, config),
            serving=score(await ask("regression: serving", current or base, regression_rows), expected, config),
        )
    pair = (regression.candidate, regression.serving) if regression else None
    return EvalReport(
        primary_metric=config.primary_metric,
        models=models,
        candidate=scores["candidate"],
        current=scores.get("current"),
        base=scores["base"],
        regression=regression,
        decision=decide(scores["candidate"], scores.get("current"), scores["base"], pair, config),
        examples=choose_examples(rows, answers, config.examples_in_report),
    )
