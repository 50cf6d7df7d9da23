"""Where a retraining run's examples come from: the tenant's completion log joined with its feedback
(gateway.export), or a JSONL file of rows in TRL's formats. Either way, samples without a usable answer
are counted and dropped; an answer cut short (finish_reason "length", or cut by the log) or unfinished (an
error, a stream its client cancelled) is dropped but its correction kept, as exports do (gateway.export)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydantic_core
from redis.asyncio import Redis

from gateway import keys
from gateway.conversation import Calls, Messages, message_of, prompt_key, tools_json
from gateway.export import Example, Sample, joined, sample, several_answers, whole_answer
from gateway.records import CorrectionMessage, LogPolicy
from gateway.tenants import TenantStore
from training.config import RetrainConfig


@dataclass(frozen=True)
class Loaded:
    """What a source gave: its samples (oldest first) and what was counted and dropped reading it."""

    samples: list[Sample]
    source: dict[str, str]
    records_read: int
    with_feedback: int
    dropped: dict[str, int]
    phone_region: str = "US"
    """Where the samples' phone numbers without +country code are from (the tenant's, for its feedback)."""


def _kept(s: Sample, left_out: str | None, dropped: Counter[str]) -> Sample | None:
    """The sample without an answer that calls tools (the eval scores text), an empty answer, or one `left_out` (why:
    cut short, unfinished), or an empty correction; None when nothing is left."""
    if s.calls:
        dropped["tool_call_answer"] += 1
        s = replace(s, text=None, judgement=None, calls=None)
    if s.text is not None and (left_out or not s.text.strip()):
        dropped["empty_answer" if not s.text.strip() else left_out or "empty_answer"] += 1
        s = replace(s, text=None, judgement=None)
    if s.correction is not None and not s.correction.strip():
        dropped["empty_answer"] += 1
        s = replace(s, correction=None)
    return s if s.text is not None or s.correction is not None else None


def _calls(correction: str | CorrectionMessage | None) -> bool:
    return isinstance(correction, CorrectionMessage) and bool(correction.tool_calls)


def from_examples(examples: Sequence[Example], policy: LogPolicy) -> Loaded:
    """Samples of joined log records (`policy` gives the score range); synchronous."""
    names = ("unusable", "empty_answer", "truncated_answer", "unfinished_answer", "several_answers", "tool_call_answer")
    samples, dropped = [], Counter(dict.fromkeys(names, 0))
    for example in examples:
        found = sample(example, policy, calls_corrected=False)  # the latest correction without calls of tools
        calling = example.record.endpoint == "chat" and any(_calls(fb.correction) for fb in example.feedback)
        dropped["tool_call_answer"] += calling
        if found is None:
            dropped["unusable"] += not calling
            continue
        record = example.record
        unfinished = record.outcome != "ok"  # an error, or a stream its client cancelled: a part of an answer
        several = "several_answers" if several_answers(record) else None  # n > 1: which one the rating judged?
        left_out = (
            "unfinished_answer" if unfinished else several or (None if whole_answer(record) else "truncated_answer")
        )
        if (kept := _kept(found, left_out, dropped)) is not None:
            samples.append(kept)
    return Loaded(samples, {}, len(examples), len(examples), dict(dropped))


async def from_feedback(
    redis: Redis, tenant: str, *, alias: str | None = None, policy: LogPolicy | None = None
) -> Loaded:
    """The tenant's rated completions (of `alias` only, when given). `policy` defaults to the tenant's own;
    records_read is the length of the log when the read began."""
    if policy is None:
        policy = (await TenantStore(redis).get(tenant)).logging
    records_read = int(await redis.xlen(keys.completion_log(tenant)))
    examples = [example async for example in joined(redis, tenant, alias=alias)]
    loaded = await asyncio.to_thread(from_examples, examples, policy)
    source = {"kind": "feedback", "tenant": tenant} | ({"alias": alias} if alias else {})
    return replace(
        loaded, source=source, records_read=max(records_read, loaded.with_feedback), phone_region=policy.phone_region
    )


def _messages(value: Any) -> Messages:
    """A row's messages as exports keep them (gateway.conversation: with their tool calls and results)."""
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str | None)
        for m in value
    ):
        raise ValueError("messages must be a list of {role, content} with string content")
    return [kept if (kept := message_of(m)) else {"role": m["role"], "content": ""} for m in value]


def _answer(value: Any) -> tuple[str, Calls | None]:
    """An answer's text and the tools it called."""
    if isinstance(value, str):
        return value, None
    messages = _messages(value)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError("a conversational answer is one assistant message")
    return messages[0]["content"], messages[0].get("tool_calls")


def _from_row(row: Any, dropped: Counter[str]) -> Sample:
    """The row's sample; a chosen answer that calls tools is left out (counted), its row kept as a rated answer."""
    if not isinstance(row, dict):
        raise ValueError("a row is a JSON object")
    tools = tools_json(row.get("tools"))
    if "messages" in row:
        messages = _messages(row["messages"])
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError("messages must be a prompt and then an assistant answer")
        text, calls = _answer(messages[-1:])
        return Sample(messages[:-1], prompt_key(messages[:-1], tools), text, 1.0, None, calls, tools)
    prompt = row["prompt"] if isinstance(row.get("prompt"), str) else _messages(row.get("prompt"))
    if not prompt:
        raise ValueError("prompt is empty")
    if "chosen" in row and "rejected" in row:
        (rejected, calls), (chosen, chosen_calls) = _answer(row["rejected"]), _answer(row["chosen"])
        if chosen_calls:
            dropped["tool_call_answer"] += 1
        correction = None if chosen_calls else chosen
        return Sample(prompt, prompt_key(prompt, tools), rejected, 0.0, correction, calls, tools)
    if "completion" in row:
        label = row.get("label", True)
        if not isinstance(label, bool):
            raise ValueError("label must be true or false")
        text, calls = _answer(row["completion"])
        return Sample(prompt, prompt_key(prompt, tools), text, float(label), None, calls, tools)
    raise ValueError("not a TRL row: messages, prompt+completion(+label) or prompt+chosen+rejected expected")


def from_jsonl(path: str | Path) -> Loaded:
    """Samples of a JSONL file of TRL rows; ValueError naming the line of a malformed one. Synchronous."""
    samples, dropped, read = [], Counter({"empty_answer": 0, "tool_call_answer": 0}), 0
    if not Path(path).is_file():  # an OSError would be told as Redis or the gateway out of reach
        raise ValueError(f"jsonl_path {str(path)!r} is not a file")
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            read += 1
            try:
                found = _from_row(pydantic_core.from_json(line), dropped)  # json.loads takes a lone surrogate
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            if (kept := _kept(found, None, dropped)) is not None:
                samples.append(kept)
    return Loaded(samples, {"kind": "jsonl", "path": str(path)}, read, read, dict(dropped))


async def collect(
    redis: Redis, tenant: str, config: RetrainConfig, *, alias: str | None = None, policy: LogPolicy | None = None
) -> Loaded:
    """The run's source: config.jsonl_path (read in a thread) when config.source is jsonl, else the log."""
    if config.source == "jsonl":
        return await asyncio.to_thread(from_jsonl, config.jsonl_path or "")
    return await from_feedback(redis, tenant, alias=alias, policy=policy)
