"""Training data from a tenant's completion log and its users' feedback, as JSONL in TRL's dataset formats.

Each record of the log (`keys.completion_log`) is joined with the feedback of its completion
(`keys.feedback`); records nobody rated are left out.

Judgement of one completion: each feedback gives a value in [0, 1] (thumbs up 1, down 0, a score
`(score - score_min) / (score_max - score_min)` by the tenant's range when it was given (`score_range`; the
policy's now for one kept without it); a feedback with both gives
their mean); the completion's judgement is the mean over its feedbacks (several end users may rate
one completion), positive when >= 0.5. A feedback with only a correction does not judge. The latest
correction (by `created`) is the completion's ideal answer.

Formats (TRL's "conversational" type for chat records, "standard" text for text completions):

- sft (language modeling / prompt-completion): chat `{"messages": prompt + [assistant answer]}`,
  text `{"prompt", "completion"}`; the answer is the correction, else the completion's own text when
  judged positive, else there is no row.
- dpo (preference): `{"prompt", "chosen", "rejected"}`; a correction is chosen over the completion's
  text, and among completions of the same prompt every negative one is rejected against the best
  positive one. No pair twice.
- kto (unpaired preference): `{"prompt", "completion", "label"}`; one row per judged completion,
  plus one labelled true for a correction.

Prompts are as gateway.conversation keeps them (chat messages with their tool calls and results, or a text). A
completion that called tools answers with its calls (and its text, "" for none), and the rows of a request that
declared tools carry them as `tools` (JSON). Records stored without content (the tenant's policy), with a token
prompt, with no messages or a last one TRL cannot render (system), or with neither an answer nor a correction are
skipped and counted.

A completion's own text is an answer only when it is whole: its request ended `ok` (not an error, not a stream
the client cancelled), the log did not cut it (`truncated`) and the model was not stopped by its token limit
(finish_reason `length`) and it is the completion's only choice (a rating of `n` > 1 choices does not say which
it judged), as retraining reads it (training.sources). Otherwise its ratings judge nothing that can be trained on:
only a correction of it is exported, and a record without one is skipped and counted.

An export reads the log as it was when it began (up to its last entry then): a tenant writing fast
does not keep it reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from statistics import fmean
from typing import IO, Any, Literal

from pydantic import ValidationError
from redis.asyncio import Redis

from gateway import keys
from gateway.conversation import (
    Answer,
    Calls,
    Prompt,
    answer,
    prompt_key,
    prompt_of,
    tool_calls,
    tools_field,
    tools_of,
)
from gateway.dpo_pairs import POSITIVE, PreferencePairs
from gateway.records import CompletionRecord, CorrectionMessage, Feedback, LogPolicy, stored_feedback

log = logging.getLogger(__name__)

ExportFormat = Literal["sft", "dpo", "kto"]
FORMATS: tuple[ExportFormat, ...] = ("sft", "dpo", "kto")
MAX_SINCE = 1e13
"""Largest `since` (Unix seconds) an export takes: far past any record, and still a stream id in milliseconds."""


@dataclass(frozen=True)
class Example:
    """One record of the log with the feedback on its completion (oldest first)."""

    record: CompletionRecord
    feedback: list[Feedback]


@dataclass(frozen=True)
class ExportSummary:
    records_read: int
    with_feedback: int
    rows_written: int
    skipped: int
    """Records with feedback that give no row whatever the format: no content kept, a token prompt,
    no messages, or neither a whole answer (`whole_answer`) nor a correction."""


@dataclass(frozen=True)
class Sample:
    """What an example says, ready for rows."""

    prompt: Prompt
    key: str
    """The prompt's canonical JSON (with its tools): completions of the same prompt share it."""
    text: str | None
    """The completion's own answer ("" for one that only called tools); None for none."""
    judgement: float | None
    correction: str | None
    calls: Calls | None = None
    """The tools the completion called (its answer with `text`)."""
    tools: str | None = None
    """The request's tool definitions, as JSON."""
    correction_calls: Calls | None = None
    """The tools the correction calls (a correction message's `tool_calls`; its text is `correction`)."""

    def own_answer(self) -> Answer:
        return answer(self.prompt, self.text or "", self.calls)

    def corrected(self) -> Answer:
        return answer(self.prompt, self.correction or "", self.correction_calls)

    def row(self, **fields: Any) -> dict[str, Any]:
        """A row of this sample: `fields`, and its tools when the request had any."""
        return fields | tools_field(self.tools)


def feedback_value(feedback: Feedback, policy: LogPolicy) -> float | None:
    """The feedback's judgement in [0, 1]; None for a feedback that only corrects or comments."""
    values = []
    if feedback.thumbs is not None:
        values.append(1.0 if feedback.thumbs == "up" else 0.0)
    if feedback.score is not None:
        low, high = feedback.score_range or (policy.score_min, policy.score_max)  # the range it was given in
        normalised = (feedback.score - low) / (high - low)
        values.append(min(1.0, max(0.0, normalised)))
    return fmean(values) if values else None


def judgement(feedback: Iterable[Feedback], policy: LogPolicy) -> float | None:
    """The mean of the feedbacks' values; None when none of them judges."""
    values = [v for fb in feedback if (v := feedback_value(fb, policy)) is not None]
    return fmean(values) if values else None


def sample(example: Example, policy: LogPolicy, calls_corrected: bool = True) -> Sample | None:
    """What the example says (prompt, answer, judgement, latest correction: `latest_correction`); None when it gives
    no row whatever the format (see `ExportSummary.skipped`)."""
    record = example.record
    prompt = prompt_of(record)
    chat = isinstance(prompt, list)
    correction, correction_calls = latest_correction(example.feedback, chat, calls_corrected)
    calls = tool_calls(record.choices[0].tool_calls) if record.choices and chat else None
    text = record.text or ("" if calls else None)
    if prompt is None or (text is None and correction is None):
        return None
    tools, judged = tools_of(record), judgement(example.feedback, policy)
    return Sample(prompt, prompt_key(prompt, tools), text, judged, correction, calls, tools, correction_calls)


def latest_correction(feedback: Iterable[Feedback], chat: bool, calls: bool = True) -> tuple[str | None, Calls | None]:
    """The latest correction that gives an answer: its text, and the tools it calls (as rows keep them). On a text
    completion a message's content is its text and its calls are left out (a message of calls alone gives none, and an
    earlier correction is taken); with `calls` False, none that calls tools is taken (retraining scores text)."""
    for given in reversed(sorted((fb for fb in feedback if fb.correction), key=lambda fb: fb.created)):
        if not isinstance(given.correction, CorrectionMessage):
            return given.correction, None
        called = tool_calls([call.model_dump() for call in given.correction.tool_calls]) if chat else None
        text = given.correction.content or ""
        if (text or called) and (calls or not called):
            return text, called
    return None, None


def whole_answer(record: CompletionRecord) -> bool:
    """Whether the record's own text is a whole answer: not of a failed or cancelled request, not cut by the
    log, not stopped by the token limit, and the only one (`several_answers`)."""
    cut = record.truncated or bool(record.choices and record.choices[0].finish_reason == "length")
    return record.outcome == "ok" and not cut and not several_answers(record)


def several_answers(record: CompletionRecord) -> bool:
    """Whether the completion holds several choices (`n` > 1): a rating of it does not say which one it judged (the
    user may have picked the second), so none of them is its answer; only a correction of it is."""
    return len(record.choices or ()) > 1


def exportable(example: Example, policy: LogPolicy) -> Sample | None:
    """The example's sample with the completion's text (and its judgement) only when it is a whole answer;
    None when nothing is left to export."""
    found = sample(example, policy)
    if found is None or found.text is None or whole_answer(example.record):
        return found
    return replace(found, text=None, judgement=None) if found.correction is not None else None


def _sft(s: Sample) -> Iterator[dict[str, Any]]:
    if s.correction is not None:
        answer = s.corrected()
    elif s.text is not None and s.judgement is not None and s.judgement >= POSITIVE:
        answer = s.own_answer()
    else:
        return
    if isinstance(s.prompt, list) and isinstance(answer, list):
        yield s.row(messages=[*s.prompt, *answer])
    else:
        yield s.row(prompt=s.prompt, completion=answer)


def _kto(s: Sample) -> Iterator[dict[str, Any]]:
    if s.text is not None and s.judgement is not None:
        positive = s.judgement >= POSITIVE
        yield s.row(prompt=s.prompt, completion=s.own_answer(), label=positive)
        if positive and s.correction is not None and s.corrected() == s.own_answer():
            return
    if s.correction is not None:
        yield s.row(prompt=s.prompt, completion=s.corrected(), label=True)


def _pairs(pairs: PreferencePairs, samples: Iterable[Sample]) -> Iterator[dict[str, Any]]:
    """The correction pairs of `samples`; their rated answers are kept for `pairs.rest()`."""
    for s in samples:
        if s.correction is not None and s.text is not None:
            yield from pairs.correction(s.prompt, s.key, s.corrected(), s.own_answer(), s.tools)
        if s.text is not None and s.judgement is not None:
            pairs.rated(s.prompt, s.key, s.own_answer(), s.judgement, s.tools)


def _dpo(samples: Iterable[Sample]) -> Iterator[dict[str, Any]]:
    with PreferencePairs() as pairs:
        yield from _pairs(pairs, samples)
        yield from pairs.rest()


def rows(examples: Iterable[Example], fmt: ExportFormat, policy: LogPolicy) -> Iterator[dict[str, Any]]:
    """TRL-format rows of the examples; those with nothing to export are skipped. dpo pairs completions
    of the same prompt across all the examples, so its rows come once they are all read."""
    return _rows((s for e in examples if (s := exportable(e, policy)) is not None), fmt)


def _rows(samples: Iterable[Sample], fmt: ExportFormat) -> Iterator[dict[str, Any]]:
    if fmt == "dpo":
        yield from _dpo(samples)
        return
    one = _sft if fmt == "sft" else _kto
    for s in samples:
        yield from one(s)


def _record(fields: dict[str, str], entry_id: str) -> CompletionRecord | None:
    try:
        return CompletionRecord.model_validate_json(fields["r"])
    except (KeyError, ValidationError) as exc:
        log.warning("completion log entry %s unreadable, left out: %s", entry_id, exc)
        return None


def _records(entries: list[tuple[str, dict[str, str]]]) -> list[CompletionRecord]:
    return [r for entry_id, fields in entries if (r := _record(fields, entry_id)) is not None]


def _examples(records: list[CompletionRecord], stored: list[dict[str, str]]) -> list[Example]:
    return [Example(r, fb) for r, s in zip(records, stored, strict=True) if (fb := stored_feedback(s))]


async def _pages(
    redis: Redis, tenant: str, since: float | None, alias: str | None, page: int, endpoint: str | None = None
) -> AsyncIterator[tuple[int, list[Example]]]:
    """Per page of the log: the entries read, and the records among them that match and have feedback. The log
    is read up to its last entry when the read began: entries added meanwhile are left to the next export."""
    if page < 1:
        raise ValueError("page must be at least 1")
    check_since(since)
    stream, start = keys.completion_log(tenant), "-" if since is None else f"{max(0, int(since * 1000))}-0"
    last: list[tuple[str, dict[str, str]]] = await redis.xrevrange(stream, max="+", min="-", count=1)
    if not last:
        return
    end = last[0][0]
    while True:
        entries: list[tuple[str, dict[str, str]]] = await redis.xrange(stream, min=start, max=end, count=page)
        if not entries:
            return
        records = await asyncio.to_thread(_records, entries)
        records = [r for r in records if alias in (None, r.alias) and endpoint in (None, r.endpoint)]
        pipe = redis.pipeline(transaction=False)
        for record in records:
            pipe.hgetall(keys.feedback(tenant, record.id))
        stored: list[dict[str, str]] = await pipe.execute() if records else []
        examples = await asyncio.to_thread(_examples, records, stored)
        yield len(entries), examples
        if len(entries) < page or entries[-1][0] == end:
            return
        ms, seq = entries[-1][0].split("-")
        start = f"{ms}-{int(seq) + 1}"
        del entries, records, stored, examples  # this page's, released before the next one is read


def check_since(since: float | None) -> None:
    """`since` must be a Unix time an export can start from: a finite number of seconds, 0 to MAX_SINCE."""
    if since is not None and not 0 <= since <= MAX_SINCE:  # NaN too
        raise ValueError(f"since must be a Unix time in seconds, from 0 to {MAX_SINCE:.0e}, not {since!r}")


async def joined(
    redis: Redis, tenant: str, *, since: float | None = None, alias: str | None = None, page: int = 500
) -> AsyncIterator[Example]:
    """Records of the tenant's log (oldest first, added from `since` (unix seconds) on, only those of
    `alias` when given), each with its feedback; records without feedback are skipped. The log is read
    in pages of `page` entries, and a page's feedback hashes in one pipeline."""
    async for _, examples in _pages(redis, tenant, since, alias, page):
        for example in examples:
            yield example


def _write(out: IO[str], batch: Iterator[dict[str, Any]], stop: threading.Event) -> int:
    """Write the rows; stop at the next one once `stop` is set (the export was cancelled). The rows' generator is closed
    here whatever happens (a pairs' cursor is then released in this thread, not where the error is handled)."""
    written = 0
    try:
        for row in batch:
            if stop.is_set():
                break
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    finally:
        close = getattr(batch, "close", None)
        if close is not None:
            close()
    return written


async def export(
    redis: Redis,
    tenant: str,
    fmt: ExportFormat,
    out: IO[str],
    policy: LogPolicy,
    *,
    since: float | None = None,
    alias: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    page: int = 500,
    endpoint: str | None = None,
) -> ExportSummary:
    """Write the rows as JSONL to `out`; `progress(records_read, rows_written)` after every page (dpo writes
    the pairs of rated answers after the last page, then reports once more). `endpoint` ("chat" or
    "completions") keeps one kind of record: TRL cannot train on a file mixing conversational and text rows."""
    read = with_feedback = written = skipped = 0
    pairs = PreferencePairs() if fmt == "dpo" else None
    # One thread writes the rows and makes the pairs, and closes them after its last call: an export cancelled while
    # that thread works (a client gone, a shutdown) must not close their database under it, and returns once that
    # thread is done (its current row): nothing touches `out` after `export` returns, which the caller then closes.
    thread, stop = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export"), threading.Event()
    loop = asyncio.get_running_loop()

    def finish() -> None:
        if pairs is not None:
            pairs.close()

    try:
        async for count, examples in _pages(redis, tenant, since, alias, page, endpoint):
            usable = [s for e in examples if (s := exportable(e, policy)) is not None]  # cheap: parsed in a thread
            read, with_feedback = read + count, with_feedback + len(examples)
            skipped += len(examples) - len(usable)
            made = _pairs(pairs, usable) if pairs is not None else _rows(usable, fmt)
            written += await loop.run_in_executor(thread, _write, out, made, stop)
            if progress is not None:
                progress(read, written)
            del examples, usable, made  # this page's, released before the next one is read
        if pairs is not None:
            written += await loop.run_in_executor(thread, _write, out, pairs.rest(stop), stop)
            if progress is not None:
                progress(read, written)
    finally:
        stop.set()
        finished = loop.run_in_executor(thread, finish)
        thread.shutdown(wait=False)
        await asyncio.shield(finished)
    return ExportSummary(read, with_feedback, written, skipped)
