"""The retraining loop's data: a tenant's rated completions (or a JSONL file of TRL rows) cleaned, split by
prompt and written in TRL's formats, with a data card naming the result by a content hash.

Sources give gateway.export's `Sample`s (a prompt, an answer judged or not, and/or a correction), oldest
first, without empty answers or answers cut short (finish_reason "length", or cut by the log). `build`
keeps one kind of prompt (chat or text: TRL trains on one), redacts PII, groups prompts (exact, then near
duplicates: word 3-shingle Jaccard over a chat prompt's non-system messages, as a system prompt shared by
all would make every pair alike, and only under alike system prompts; a group pools its answers), balances
labels by downsampling, and splits the groups by a hash of (seed, group), so that no prompt is in two splits.
A group's reference is its latest correction, else its best-rated positive answer; it gives all three kinds:
sft the reference, dpo the reference over each answer it beats, kto each judged answer with its label and
each correction (true). The test split's references are the eval gate's: a dataset without one is refused.

Only `from_feedback` and `collect` are async; the rest is synchronous CPU and file work (async callers use
asyncio.to_thread).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from types import MappingProxyType
from typing import Any

from gateway.conversation import Prompt, answer, as_sent, message_of, prompt_key, tools_field
from gateway.export import Sample
from gateway.redaction import Redactor, redact_value
from training.config import RetrainConfig
from training.near_duplicates import near_pairs, same_system, shingles, system_shingles
from training.sources import Loaded

Row = dict[str, Any]
KINDS = ("sft", "dpo", "kto")
SPLITS = ("train", "validation", "test")
EVAL_FILE = "eval.jsonl"
"""Test prompts with a reference, for the evaluator: {"prompt": messages or text, "reference": text}, and the request's
`tools` where it declared some (asked with them)."""
SETTINGS = ("seed", "split", "near_duplicate_threshold", "redact_pii", "label_pattern", "endpoint", "min_examples")
"""The config fields a data card records."""
FILTERS = MappingProxyType(
    {
        "unusable": "records with feedback but no usable prompt or answer (no content kept, token prompt, ...)",
        "empty_answer": "answers (or corrections) left out as empty",
        "truncated_answer": "answers left out as cut short (finish_reason 'length', or cut by the log)",
        "unfinished_answer": "answers left out as unfinished (the request failed, or its client cancelled the stream)",
        "several_answers": "answers left out as one of several choices (n > 1: a rating does not say which it judged)",
        "tool_call_answer": "answers and corrections left out as calls of tools (the eval scores text)",
        "other_endpoint": "samples of the other kind of prompt (chat vs text)",
        "exact_duplicate_prompts": "samples whose prompt repeats an earlier one (answers pooled under it)",
        "near_duplicate_prompts": "distinct prompts folded into a near-duplicate group (answers pooled)",
        "label_balance": "prompt groups left out to balance the labels",
    }
)
"""What each filter of the data card counts, in the order they run."""


class NotEnoughData(ValueError):
    """Fewer usable training examples than config.min_examples, or (`reason`) no test prompt the eval gate
    could score: refused before the fit, which would otherwise be spent on a run that cannot end."""

    def __init__(
        self, method: str, usable: int, required: int, filtered: dict[str, int], reason: str | None = None
    ) -> None:
        self.usable, self.required, self.filtered = usable, required, filtered
        removed = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in filtered.items() if n) or "nothing"
        reason = reason or f"{usable} usable {method} examples in the train split, min_examples asks for {required}"
        super().__init__(f"not enough data: {reason} (filtered out: {removed})")


def _no_references(test_prompts: int) -> str:
    """Why a dataset whose test split has no reference is refused (with KTO, thumbs-down alone train, but the
    gate scores answers against references: corrections or positively rated answers)."""
    if not test_prompts:
        return "the test split has no prompts, so the eval gate would have nothing to score the candidate on"
    return (
        f"none of the {test_prompts} prompts of the test split has a reference (a correction or a positively "
        "rated answer), so the eval gate would have nothing to score the candidate on; collect corrections or "
        "positive ratings"
    )


@dataclass(frozen=True)
class DataCard:
    dataset_hash: str
    """sha256 over the split files and eval.jsonl (names, lengths and bytes, in a fixed order)."""
    method: str
    source: dict[str, str]
    records_read: int
    with_feedback: int
    examples: dict[str, int]
    """Examples of each kind, all splits together."""
    splits: dict[str, dict[str, int]]
    """Per split: prompt groups and examples of each kind."""
    eval_rows: int
    filters: dict[str, int]
    redactions: dict[str, int]
    labels: dict[str, Any] | None
    """With a label_pattern: prompt groups per label before and after balancing, and unlabelled ones."""
    files: dict[str, str]
    """sha256 of each data file."""
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"# Dataset {self.dataset_hash[:12]}", "", f"- dataset_hash: `{self.dataset_hash}`"]
        lines += [f"- method: {self.method}; source: " + ", ".join(f"{k} {v}" for k, v in self.source.items())]
        lines += [f"- records read: {self.records_read}; with feedback: {self.with_feedback}"]
        lines += ["- examples: " + ", ".join(f"{kind} {n}" for kind, n in self.examples.items())]
        lines += [
            f"- {name}: " + ", ".join(f"{k} {n}" for k, n in counts.items()) for name, counts in self.splits.items()
        ]
        lines += [f"- {EVAL_FILE}: {self.eval_rows} test prompts with a reference", "", "## Filters", ""]
        lines += [f"- {name}: {n} {FILTERS[name]}" for name, n in self.filters.items()]
        if self.settings.get("redact_pii"):
            lines += ["- PII redacted: " + (", ".join(f"{k} {n}" for k, n in self.redactions.items()) or "none found")]
        if self.labels is not None:
            lines += ["", "## Labels (prompt groups before -> after balancing)", ""]
            lines += [f"- {k}: {n} -> {self.labels['after'][k]}" for k, n in self.labels["before"].items()]
            lines += [f"- (unlabelled): {self.labels['unlabelled']}"]
        lines += ["", "## Settings", ""] + [f"- {k}: {v!r}" for k, v in self.settings.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BuiltDataset:
    rows: dict[str, dict[str, list[Row]]]
    """split -> kind -> TRL rows."""
    files: dict[str, str]
    """File name -> canonical JSONL text: the config.method rows of each split, and eval.jsonl."""
    card: DataCard


@dataclass(frozen=True)
class _Group:
    """One prompt group, ready for rows."""

    id: str
    prompt: Prompt
    tools: str | None
    """The request's tool definitions (canonical JSON), which the eval gate asks with."""
    reference: str | None
    sft: list[Row]
    dpo: list[Row]
    kto: list[Row]


def _one_kind(samples: list[Sample], endpoint: str | None, filters: dict[str, int]) -> list[Sample]:
    chat = sum(isinstance(s.prompt, list) for s in samples)
    keep_chat = endpoint == "chat" if endpoint else chat >= len(samples) - chat
    kept = [s for s in samples if isinstance(s.prompt, list) == keep_chat]
    filters["other_endpoint"] = len(samples) - len(kept)
    return kept


def _redacted(samples: list[Sample], counts: Counter[str], phone_region: str) -> list[Sample]:
    redactor = Redactor(phone_region=phone_region)

    def clean(value: Any) -> Any:
        cleaned, found = redact_value(redactor, value)
        counts.update(found)
        return cleaned

    def clean_prompt(prompt: Prompt) -> Prompt:
        """Messages redacted with their calls' arguments as the JSON text they were sent as (a number in them is found
        too: an object's numbers are not strings to redact), then read back as rows hold them."""
        if isinstance(prompt, str):
            return str(clean(prompt))
        return [kept for message in clean(as_sent(prompt)) if (kept := message_of(message))]

    return [
        Sample(
            p := clean_prompt(s.prompt),
            prompt_key(p, s.tools),
            clean(s.text),
            s.judgement,
            clean(s.correction),
            None,
            s.tools,
        )
        for s in samples
    ]


def _grouped(samples: list[Sample], threshold: float, filters: dict[str, int]) -> list[list[Sample]]:
    """Samples by prompt group (exact, then near duplicates), each group and its samples oldest first."""
    by_key: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_key.setdefault(s.key, []).append(i)
    filters["exact_duplicate_prompts"] = len(samples) - len(by_key)
    exact = list(by_key.values())
    parent = list(range(len(exact)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    if threshold < 1:
        prompts = [samples[ids[0]].prompt for ids in exact]
        systems = [system_shingles(prompt) for prompt in prompts]
        tools = [samples[ids[0]].tools for ids in exact]
        for i, j in near_pairs([shingles(prompt) for prompt in prompts], threshold):
            if not same_system(systems[i], systems[j], threshold) or tools[i] != tools[j]:
                continue  # one user message under two instructions, or tools: answers that are not interchangeable
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
        filters["near_duplicate_prompts"] = len(exact) - len({root(i) for i in range(len(exact))})
    merged: dict[int, list[int]] = {}
    for i, ids in enumerate(exact):
        merged.setdefault(root(i), []).extend(ids)
    return [[samples[i] for i in sorted(ids)] for ids in merged.values()]


def _prepared(group: list[Sample]) -> _Group:
    judged: dict[str, list[float]] = {}
    corrected: set[str] = set()
    for s in group:
        if s.text is not None:
            judged.setdefault(s.text, []).extend([] if s.judgement is None else [s.judgement])
            if s.correction is not None and s.correction != s.text:
                corrected.add(s.text)
    means = {text: fmean(values) for text, values in judged.items() if values}
    rejected = corrected | {text for text, mean in means.items() if mean < 0.5}
    """Corrected in some row, or rated down as an answer (a model trained on a correction answers with it, and the
    users who rate that answer down judge the correction)."""
    corrections = [(s, s.correction) for s in group if s.correction is not None]
    reference: str | None
    if corrections:  # the latest that was never itself rejected (`chosen` against one row, `rejected` in another)
        unrejected = [(s, c) for s, c in corrections if c not in rejected]
        origin, reference = unrejected[-1] if unrejected else (corrections[-1][0], None)  # all: no reference
        worse = [t for t in judged if t != reference and t in rejected]
    else:
        reference = max((t for t in means if means[t] >= 0.5), key=lambda t: means[t], default=None)
        origin = next((s for s in group if s.text == reference), group[0])
        worse = [t for t in means if reference is not None and means[t] < means[reference]]
    prompt = origin.prompt
    head = {"prompt": prompt, **tools_field(origin.tools)}
    labels = {t: means[t] >= 0.5 for t in means} | {c: c not in rejected for _, c in corrections}
    chosen = [] if reference is None else [reference]
    # each correction against the answer it corrects (a JSONL row's own pair), as well as the reference against
    # every worse answer: a group's earlier corrections were lost, and a pair whose rejected was the reference
    pairs = dict.fromkeys(
        [(c, t) for c in chosen for t in worse] + [(c, s.text) for s, c in corrections if s.text and c != s.text]
    )
    return _Group(
        group[0].key,
        prompt,
        origin.tools,
        reference,
        sft=[head | {"completion": answer(prompt, c)} for c in chosen],
        dpo=[head | {"chosen": answer(prompt, c), "rejected": answer(prompt, t)} for c, t in pairs],
        kto=[head | {"completion": answer(prompt, t), "label": label} for t, label in labels.items()],
    )


def _balanced(
    groups: list[_Group], pattern: re.Pattern[str], seed: int, filters: dict[str, int]
) -> tuple[list[_Group], dict[str, Any]]:
    by_label: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        found = pattern.search(g.reference) if g.reference is not None else None
        if found is not None and found.group(1) is not None:
            by_label.setdefault(found.group(1), []).append(i)
    before = {label: len(ids) for label, ids in sorted(by_label.items())}
    minority = min(before.values(), default=0)
    dropped: set[int] = set()
    for label, ids in sorted(by_label.items()):
        ranked = sorted(ids, key=lambda i: groups[i].id)
        kept = set(random.Random(f"{seed}:{label}").sample(ranked, minority))
        dropped.update(i for i in ids if i not in kept)
    filters["label_balance"] = len(dropped)
    unlabelled = len(groups) - sum(before.values())
    labels = {"before": before, "after": {k: min(n, minority) for k, n in before.items()}, "unlabelled": unlabelled}
    return [g for i, g in enumerate(groups) if i not in dropped], labels


def _split(groups: list[_Group], shares: list[float], seed: int) -> dict[str, list[_Group]]:
    ordered = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}\0{g.id}".encode()).hexdigest())
    n = len(ordered)
    validation, test = (max(int(n >= 3), int(n * share + 0.5)) for share in shares[1:])
    return dict(
        zip(SPLITS, (ordered[validation + test :], ordered[test : validation + test], ordered[:test]), strict=True)
    )


def _with_validation(splits: dict[str, list[_Group]], method: str) -> dict[str, list[_Group]]:
    """The splits, with one more prompt group moved from train to validation where validation would give the method
    no example and train has two such groups at least: the fit refuses an empty validation split, and the dataset
    step took one (8 DPO pairs among 30 prompts could all fall in train; the run had to start again)."""
    train, validation = splits["train"], splits["validation"]
    useful = [g for g in train if getattr(g, method)]
    if any(getattr(g, method) for g in validation) or len(useful) < 2:
        return splits
    return {**splits, "train": [g for g in train if g is not useful[0]], "validation": [*validation, useful[0]]}


def _jsonl(rows: Iterable[Row]) -> str:
    return "".join(json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for row in rows)


def build(loaded: Loaded, config: RetrainConfig) -> BuiltDataset:
    """Clean, group, balance and split the samples, and render the files and their card. Pure and
    synchronous CPU work. NotEnoughData when the train split has fewer than config.min_examples, or when no
    test prompt has a reference for the eval gate."""
    filters = dict(loaded.dropped)
    samples = _one_kind(loaded.samples, config.endpoint, filters)
    redactions: Counter[str] = Counter()
    if config.redact_pii:
        samples = _redacted(samples, redactions, loaded.phone_region)
    groups = [_prepared(g) for g in _grouped(samples, config.near_duplicate_threshold, filters)]
    labels = None
    if config.label_pattern:
        groups, labels = _balanced(groups, re.compile(config.label_pattern), config.seed, filters)
    filters = {name: filters[name] for name in FILTERS if name in filters}
    splits = _with_validation(_split(groups, config.split, config.seed), config.method)
    rows = {
        name: {kind: [r for g in part for r in getattr(g, kind)] for kind in KINDS} for name, part in splits.items()
    }
    usable = len(rows["train"][config.method])
    if usable < config.min_examples:
        raise NotEnoughData(config.method, usable, config.min_examples, filters)
    eval_rows = [
        {"prompt": g.prompt, **tools_field(g.tools), "reference": g.reference}
        for g in splits["test"]
        if g.reference is not None
    ]
    if not eval_rows:
        reason = _no_references(len(splits["test"]))
        raise NotEnoughData(config.method, usable, config.min_examples, filters, reason=reason)
    files = {f"{name}.jsonl": _jsonl(rows[name][config.method]) for name in SPLITS} | {EVAL_FILE: _jsonl(eval_rows)}
    digest = hashlib.sha256()
    for name, text in files.items():
        data = text.encode()
        digest.update(f"{name}\n{len(data)}\n".encode() + data)
    settings = {k: getattr(config, k) for k in SETTINGS}
    card = DataCard(
        dataset_hash=digest.hexdigest(),
        method=config.method,
        source=loaded.source,
        records_read=loaded.records_read,
        with_feedback=loaded.with_feedback,
        examples={kind: sum(len(rows[name][kind]) for name in SPLITS) for kind in KINDS},
        splits={name: {"prompts": len(splits[name])} | {k: len(rows[name][k]) for k in KINDS} for name in SPLITS},
        eval_rows=len(eval_rows),
        filters=filters,
        redactions=dict(sorted(redactions.items())),
        labels=labels,
        files={name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()},
        settings=settings,
    )
    return BuiltDataset(rows, files, card)


def _write_file(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def write(built: BuiltDataset, folder: str | Path) -> DataCard:
    """The files and data_card.json / data_card.md into `folder`, which must not exist yet or be empty
    (FileExistsError). Atomic: written into a temporary folder beside it, renamed onto it once complete;
    a failure leaves nothing. Synchronous file work."""
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for name, text in built.files.items():
            _write_file(staging / name, text)
        _write_file(staging / "data_card.json", json.dumps(built.card.to_dict(), indent=2, ensure_ascii=False) + "\n")
        _write_file(staging / "data_card.md", built.card.markdown())
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return built.card
