"""The retraining dataset builder: sources, cleaning, grouping, balance, split, rows, card and atomic writes.
Most tests build from in-memory samples; one reads a real Redis."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.export import Example, Prompt, Sample
from gateway.records import (
    Choice,
    CompletionRecord,
    CorrectionCall,
    CorrectionFunction,
    CorrectionMessage,
    Feedback,
    LogPolicy,
)
from gateway.tenants import TenantStore
from training import dataset
from training.config import RetrainConfig
from training.dataset import NotEnoughData, build, write
from training.near_duplicates import near_pairs, shingles
from training.sources import Loaded, from_examples, from_feedback, from_jsonl

IDS = itertools.count()
SYSTEM = {"role": "system", "content": "You triage support tickets. " + " ".join(f"rule{i}" for i in range(60))}


def config(**fields: Any) -> RetrainConfig:
    return RetrainConfig(**{"min_examples": 1, **fields})


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sample(
    prompt: Prompt, text: str | None = None, judgement: float | None = 1.0, correction: str | None = None
) -> Sample:
    key = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Sample(prompt, key, text, judgement, correction)


PADDING = [sample(user(f"padding question {n}"), f"padding answer {n}") for n in range(3)]
"""Three more prompt groups with a reference, so that a small dataset has a test split for the eval gate."""


def loaded(*samples: Sample) -> Loaded:
    return Loaded(list(samples), {"kind": "test"}, len(samples) + 1, len(samples), {})


def record(text: str | None = "ok", finish_reason: str = "stop", **fields: Any) -> CompletionRecord:
    n = next(IDS)
    fields.setdefault("request", {"messages": user(f"question {n}")})
    return CompletionRecord(
        id=f"chatcmpl-{n}",
        request_id=f"r{n}",
        tenant=fields.pop("tenant", "acme"),
        endpoint="chat",
        model="m",
        choices=None if text is None else [Choice(index=0, text=text, finish_reason=finish_reason)],
        status=200,
        outcome=fields.pop("outcome", "ok"),
        created=1000.0 + n,
        **fields,
    )


JSONL_DROPPED = {"empty_answer": 1, "tool_call_answer": 0}


WEATHER_CALL = CorrectionCall(function=CorrectionFunction(name="weather", arguments="{}"))


def called() -> CompletionRecord:
    """A completion that called a tool."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    return record(None).model_copy(update={"choices": [Choice(index=0, tool_calls=[call], finish_reason="tool_calls")]})


def rated(r: CompletionRecord, **fields: Any) -> Example:
    return Example(r, [Feedback(completion_id=r.id, created=r.created + 1, **fields)])


def later_calls(r: CompletionRecord) -> Example:
    """Rated down and corrected in words, then corrected again with a call of a tool by another user."""
    first = Feedback(completion_id=r.id, user="a", created=r.created + 1, thumbs="down", correction="It rains.")
    calls = CorrectionMessage(tool_calls=[WEATHER_CALL])
    return Example(r, [first, Feedback(completion_id=r.id, user="b", created=r.created + 2, correction=calls)])


def all_rows(built: dataset.BuiltDataset, kind: str) -> list[dict[str, Any]]:
    return [row for split in dataset.SPLITS for row in built.rows[split][kind]]


def test_exact_and_near_duplicate_prompts_form_one_group_with_their_answers_pooled() -> None:
    long = " ".join(f"word{i}" for i in range(80))
    samples = [
        sample("What is the capital of France?", "Paris."),
        sample("What is the capital of France?", "Paris!"),  # exact duplicate prompt
        sample("what is the capital of FRANCE", "Paris", 0.0),  # near (the same words)
        sample("What is the capital of Spain?", "Madrid."),
        sample(long, "a"),
        sample(long.replace("word40", "other"), "b", 0.0),  # Jaccard 75/81 over 3-shingles
    ]
    built = build(loaded(*samples), config())
    assert built.card.filters["exact_duplicate_prompts"] == 1
    assert built.card.filters["near_duplicate_prompts"] == 2
    assert sorted(r["completion"] for r in all_rows(built, "sft")) == ["Madrid.", "Paris.", "a"]
    assert sorted((r["chosen"], r["rejected"]) for r in all_rows(built, "dpo")) == [("Paris.", "Paris"), ("a", "b")]
    assert len(all_rows(built, "kto")) == 6
    assert sum(built.card.splits[split]["prompts"] for split in dataset.SPLITS) == 3
    exact_only = build(loaded(*samples), config(near_duplicate_threshold=1.0)).card
    assert "near_duplicate_prompts" not in exact_only.filters
    assert sum(exact_only.splits[split]["prompts"] for split in dataset.SPLITS) == 5


def test_a_shared_system_prompt_does_not_make_prompts_near_duplicates() -> None:
    issues = ["VPN down", "no ink", "disk full"]
    samples = [sample([SYSTEM, *user(f"Ticket {n}: {issue}")], "P2") for n, issue in enumerate(issues)]
    assert build(loaded(*samples), config()).card.filters["near_duplicate_prompts"] == 0


def test_prompts_without_words_are_not_near_duplicates_of_each_other() -> None:
    """Prompts such as "🙂" and "???" have no word to shingle: each is its own shingle, not the empty one that made
    them all alike (and paired one prompt's answer against another's in DPO)."""
    prompts = ["🙂", "???", "!!!", "🙂 🙂"]
    assert len({shingles(user(p)) for p in prompts}) == 4 and shingles("??? ") == shingles(" ???")
    samples = [sample(user(p), f"answer {n}", 0.0 if n % 2 else 1.0) for n, p in enumerate(prompts)]
    built = build(loaded(*samples, *PADDING), config())
    assert built.card.filters["near_duplicate_prompts"] == 0
    assert [r for r in all_rows(built, "dpo") if r["prompt"][0]["content"] in prompts] == []
    twice = build(loaded(sample(user("?? ?"), "a"), sample(user("?? ?"), "b"), *PADDING), config())
    assert twice.card.filters["exact_duplicate_prompts"] == 1, "the same prompt twice is still one group"


def test_one_user_message_under_other_instructions_is_another_group() -> None:
    """Near duplicates are judged on the user's messages (a shared system prompt would make everything alike), but
    only under alike system prompts: an answer in French is no rejected version of an answer in JSON."""
    ticket = user("Ticket: the VPN is down again since this morning")

    def under(system: str, answer: str, judgement: float) -> Sample:
        return sample([{"role": "system", "content": system}, *ticket], answer, judgement)

    apart = [under("Answer in French.", "Le VPN", 1.0), under("Answer in JSON.", '{"vpn": "down"}', 0.0)]
    built = build(loaded(*apart, *PADDING), config())
    assert built.card.filters["near_duplicate_prompts"] == 0 and all_rows(built, "dpo") == []
    dated = [under(SYSTEM["content"] + f" Today is 2026-12-0{day}.", f"P{day}", 1.0 - day / 4) for day in (1, 3)]
    together = build(loaded(*dated, *PADDING), config())
    assert together.card.filters["near_duplicate_prompts"] == 1, "a long system prompt whose date changed: alike"
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in all_rows(together, "dpo")] == [
        ("P1", "P3")
    ]


def test_near_pairs_are_exactly_the_pairs_at_or_above_the_threshold() -> None:
    rng = random.Random(7)
    sets = [frozenset(rng.sample(range(14), rng.randint(1, 10))) for _ in range(200)]
    shingles = [frozenset(map(str, s)) for s in sets]
    for threshold in ("0.5", "0.7", "0.9"):
        pairs = itertools.combinations(range(len(sets)), 2)
        brute = {
            (i, j) for i, j in pairs if Fraction(len(sets[i] & sets[j]), len(sets[i] | sets[j])) >= Fraction(threshold)
        }
        assert brute and set(near_pairs(shingles, float(threshold))) == brute
    # J = 14/25 exactly, and 0.56 * 25 is 14.000000000000002 in floats; the pair shares none of A's 11 rarest tokens
    common = frozenset(f"c{i}" for i in range(14))
    assert list(near_pairs([common | {f"a{i}" for i in range(11)}, common], 0.56)) == [(0, 1)]


def test_empty_and_truncated_answers_are_dropped_and_corrections_kept() -> None:
    examples = [
        rated(record("fine answer"), thumbs="up"),
        rated(record("cut off mid", "length"), thumbs="up"),
        rated(record("cut off too", "length"), thumbs="down", correction="the whole answer"),
        rated(record("   "), thumbs="up"),
        rated(record("long", truncated=True), thumbs="up"),
        rated(record(request=None, text=None), thumbs="up"),  # the tenant keeps no content
        rated(record("half an answ", outcome="cancelled"), thumbs="up"),  # its client went away mid-stream
        rated(called(), thumbs="up"),  # an answer that calls a tool: the eval scores text
        rated(called(), thumbs="down", correction="It is sunny."),
        rated(record("Sunny?"), thumbs="down", correction=CorrectionMessage(content="", tool_calls=[WEATHER_CALL])),
        later_calls(record("Rain?")),
        rated(record("one of two"), thumbs="up"),  # n = 2 (below): which one did the user like?
        rated(record("one of two more"), thumbs="down", correction="C"),
    ]
    for example in examples[-2:]:
        example.record.choices = [*(example.record.choices or []), Choice(index=1, text="the second")]
    got = from_examples(examples, LogPolicy())
    dropped = {"unusable": 1, "empty_answer": 1, "truncated_answer": 3, "unfinished_answer": 1, "tool_call_answer": 4}
    dropped["several_answers"] = 2
    assert got.dropped == dropped, "a correction that calls a tool, too: its rated answer stays"
    assert [(s.text, s.correction) for s in got.samples] == [
        ("fine answer", None),
        (None, "the whole answer"),
        (None, "It is sunny."),
        ("Sunny?", None),
        ("Rain?", "It rains."),  # a text correction before one that calls a tool: taken
        (None, "C"),  # of several choices, only the correction says what the answer should be
    ]
    padded = Loaded([*got.samples, *PADDING], got.source, got.records_read, got.with_feedback, got.dropped)
    built = build(padded, config())
    kto = [r["completion"][0]["content"] for r in all_rows(built, "kto")]
    kept = ["C", "It is sunny.", "It rains.", "Rain?", "Sunny?", "fine answer", "the whole answer"]
    assert sorted(a for a in kto if not a.startswith("padding")) == kept
    dpo = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in all_rows(built, "dpo")]
    assert dpo == [("It rains.", "Rain?")], "no pair of C with either of the two choices"
    assert built.card.filters["truncated_answer"] == 3 and built.card.with_feedback == 13
    assert built.card.filters["several_answers"] == 2


def test_pii_is_redacted_in_prompts_answers_and_corrections(tmp_path: Path) -> None:
    samples = [
        sample(user("Mail jane.doe@example.com about it"), "Done, wrote jane.doe@example.com", 0.0, "Ask 10.1.2.3"),
        sample(user("Another question"), "Answer.", 0.0, "Better."),
        sample(user("Third question"), "Answer.", 0.0, "Better."),
    ]
    card = write(build(loaded(*samples), config(method="dpo")), tmp_path / "out")
    text = "".join((tmp_path / "out" / name).read_text() for name in ("train.jsonl", "validation.jsonl", "test.jsonl"))
    assert "jane.doe" not in text and "10.1.2.3" not in text and "[EMAIL]" in text and "[IP]" in text
    assert card.redactions == {"email": 2, "ip": 1}
    kept = build(loaded(*samples), config(method="dpo", redact_pii=False))
    assert "jane.doe@example.com" in "".join(kept.files.values()) and kept.card.redactions == {}


def severities(counts: dict[str, int]) -> list[Sample]:
    n = itertools.count()
    return [sample(f"ticket {next(n)}", f"SEVERITY: {label}") for label, k in counts.items() for _ in range(k)]


def test_labels_are_balanced_by_downsampling_the_majorities_by_seed() -> None:
    samples = [*severities({"P1": 12, "P2": 4, "P3": 6}), sample("ticket x", "no idea"), sample("ticket y", "none")]
    built = build(loaded(*samples), config(label_pattern=r"SEVERITY: (P[1-4])"))
    assert built.card.labels == {
        "before": {"P1": 12, "P2": 4, "P3": 6},
        "after": {"P1": 4, "P2": 4, "P3": 4},
        "unlabelled": 2,
    }
    assert built.card.filters["label_balance"] == 10
    answers = [r["completion"] for r in all_rows(built, "sft")]
    assert sorted(answers.count(f"SEVERITY: {p}") for p in ("P1", "P2", "P3")) == [4, 4, 4]

    def p1_prompts(seed: int) -> set[str]:
        again = build(loaded(*samples), config(label_pattern=r"SEVERITY: (P[1-4])", seed=seed))
        return {r["prompt"] for r in all_rows(again, "sft") if r["completion"] == "SEVERITY: P1"}

    assert p1_prompts(42) == p1_prompts(42) != p1_prompts(7)


def test_split_is_by_prompt_group_deterministic_per_seed_and_about_80_10_10() -> None:
    rng = random.Random(1)
    samples = []
    for n in range(300):
        prompt = f"ticket {n}: " + " ".join(f"w{rng.randrange(50)}" for _ in range(20))
        samples += [sample(prompt, "a"), sample(prompt, "b", 0.0), sample(prompt.upper() + "!", "c")]
    built = build(loaded(*samples), config(redact_pii=False))
    tickets = {split: {r["prompt"].split()[1] for r in built.rows[split]["kto"]} for split in dataset.SPLITS}
    assert [len(tickets[split]) for split in dataset.SPLITS] == [240, 30, 30]
    assert not tickets["train"] & tickets["validation"] and not tickets["train"] & tickets["test"]
    assert not tickets["validation"] & tickets["test"]
    assert build(loaded(*samples), config(redact_pii=False)).files == built.files
    assert build(loaded(*samples), config(redact_pii=False, seed=7)).files["test.jsonl"] != built.files["test.jsonl"]


def preference_data(chat: bool) -> list[Sample]:
    def p(text: str) -> Prompt:
        return user(text) if chat else text

    return [
        sample(p("capital of France"), "Lyon", 0.0, "Paris"),
        sample(p("capital of France"), "Paris, France", 0.9),
        sample(p("capital of Spain"), "Madrid", 0.8),
        sample(p("capital of Spain"), "Madrid!", 0.6),
        sample(p("capital of Spain"), "Rome", 0.2),
        sample(p("capital of Italy"), "Rome", None, "Rome, Italy"),
    ]


def test_dpo_prefers_the_reference_and_kto_labels_every_answer() -> None:
    built = build(loaded(*preference_data(chat=False)), config())
    assert sorted((r["prompt"], r["completion"]) for r in all_rows(built, "sft")) == [
        ("capital of France", "Paris"),
        ("capital of Italy", "Rome, Italy"),
        ("capital of Spain", "Madrid"),
    ]
    assert sorted((r["chosen"], r["rejected"]) for r in all_rows(built, "dpo")) == [
        ("Madrid", "Madrid!"),
        ("Madrid", "Rome"),
        ("Paris", "Lyon"),
        ("Rome, Italy", "Rome"),
    ]
    assert sorted((r["completion"], r["label"]) for r in all_rows(built, "kto")) == [
        ("Lyon", False),
        ("Madrid", True),
        ("Madrid!", True),
        ("Paris", True),
        ("Paris, France", True),
        ("Rome", False),
        ("Rome, Italy", True),
    ]


@pytest.mark.parametrize("chat", [True, False])
def test_rows_have_the_shapes_of_trls_formats(chat: bool, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    columns = {
        "sft": {"prompt", "completion"},
        "dpo": {"prompt", "chosen", "rejected"},
        "kto": {"prompt", "completion", "label"},
    }
    answer: Any = list if chat else str
    for method, wanted in columns.items():
        built = build(loaded(*preference_data(chat)), config(method=method))
        rows = all_rows(built, method)
        assert rows and all(set(row) == wanted for row in rows)
        for row in rows:
            assert isinstance(row["prompt"], answer) and all(
                isinstance(row[c], answer) for c in wanted - {"prompt", "label"}
            )
            if chat:
                assert all(set(m) == {"role", "content"} for m in row["prompt"])
                assert all(row[c][0]["role"] == "assistant" and len(row[c]) == 1 for c in wanted - {"prompt", "label"})
            assert type(row.get("label", True)) is bool
        write(built, tmp_path / method)
        loaded_rows = datasets.Dataset.from_json(str(tmp_path / method / "train.jsonl"), cache_dir=str(tmp_path / "c"))
        assert set(loaded_rows.column_names) == wanted and len(loaded_rows) == len(built.rows["train"][method])
        for line in (tmp_path / method / "eval.jsonl").read_text().splitlines():
            assert set(json.loads(line)) == {"prompt", "reference"}


def test_card_counts_and_hash_are_stable_and_follow_the_data(tmp_path: Path) -> None:
    samples = [sample(f"question {n}", f"answer {n}", 1.0 if n % 3 else 0.0) for n in range(40)]
    first, second = (write(build(loaded(*samples), config()), tmp_path / name) for name in ("a", "b"))
    assert first == second
    assert (tmp_path / "a" / "data_card.json").read_text() == (tmp_path / "b" / "data_card.json").read_text()
    assert (tmp_path / "a" / "data_card.md").read_text().startswith(f"# Dataset {first.dataset_hash[:12]}")
    digest = hashlib.sha256()
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "eval.jsonl"):
        data = (tmp_path / "a" / name).read_bytes()
        digest.update(f"{name}\n{len(data)}\n".encode() + data)
        assert first.files[name] == hashlib.sha256(data).hexdigest()
    assert first.dataset_hash == digest.hexdigest()
    assert (first.records_read, first.with_feedback) == (41, 40)
    assert first.examples == {"sft": 26, "dpo": 0, "kto": 40}
    assert [first.splits[s]["prompts"] for s in dataset.SPLITS] == [32, 4, 4]
    assert sum(first.splits[s]["sft"] for s in dataset.SPLITS) == 26
    assert first.eval_rows == sum(1 for _ in (tmp_path / "a" / "eval.jsonl").open()) == first.splits["test"]["sft"]
    changed = [*samples[:-1], sample("question 39", "another answer")]
    assert build(loaded(*changed), config()).card.dataset_hash != first.dataset_hash


def test_too_little_data_is_refused_saying_how_much_and_what_was_filtered() -> None:
    samples = [sample(f"q{n}", "yes") for n in range(9)] + [sample("q1", "again")]
    with pytest.raises(NotEnoughData) as refused:
        build(loaded(*samples), config(min_examples=40))
    assert (refused.value.usable, refused.value.required) == (7, 40)
    assert str(refused.value) == (
        "not enough data: 7 usable sft examples in the train split, min_examples asks for 40 "
        "(filtered out: 1 exact duplicate prompts)"
    )


def test_a_dataset_the_eval_gate_could_not_score_is_refused_before_the_fit() -> None:
    """KTO trains on thumbs-down alone, but the gate scores answers against references (corrections, answers rated
    up): with none in the test split the fit would be wasted, the eval failing after it."""
    downs = [sample(f"question {n}", f"wrong answer {n}", 0.0) for n in range(40)]
    with pytest.raises(NotEnoughData, match="none of the 4 prompts of the test split has a reference") as refused:
        build(loaded(*downs), config(method="kto"))
    assert refused.value.usable == 32
    with pytest.raises(NotEnoughData, match="the test split has no prompts"):
        build(loaded(sample("q1", "a"), sample("q2", "b")), config())
    mixed = [sample(f"question {n}", f"answer {n}", float(n % 2)) for n in range(40)]
    assert build(loaded(*mixed), config(method="kto")).card.eval_rows, "some thumbs up: references to score on"


@pytest.mark.parametrize("chat", [True, False])
def test_jsonl_rows_of_each_trl_format(chat: bool, tmp_path: Path) -> None:
    def p(text: str) -> Any:
        return user(text) if chat else text

    def a(text: str) -> Any:
        return assistant(text) if chat else text

    rows = [
        {"prompt": p("q2"), "completion": a("a2")},
        {"prompt": p("q3"), "chosen": a("good"), "rejected": a("bad")},
        {"prompt": p("q4"), "completion": a("wrong"), "label": False},
        {"prompt": p("q5"), "completion": a("")},
    ]
    if chat:
        rows.append({"messages": [SYSTEM, *user("q1"), *assistant("a1")]})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    got = from_jsonl(path)
    assert (got.records_read, got.dropped, got.source["kind"]) == (len(rows), JSONL_DROPPED, "jsonl")
    built = build(got, config(method="kto"))
    assert all_rows(built, "dpo") == [{"prompt": p("q3"), "chosen": a("good"), "rejected": a("bad")}]
    sft = sorted(json.dumps(r["completion"]) for r in all_rows(built, "sft"))
    assert sft == sorted(json.dumps(a(t)) for t in ["a2", "good", *(["a1"] if chat else [])])
    negatives = sorted(json.dumps(r["completion"]) for r in all_rows(built, "kto") if not r["label"])
    assert negatives == [json.dumps(a("bad")), json.dumps(a("wrong"))]


def test_every_preference_pair_of_a_jsonl_file_is_kept_and_no_rejected_answer_is_the_reference(tmp_path: Path) -> None:
    """Two rows of one prompt, Paris over Lyon and Lyon over Marseille: only the last row's pair was kept, and SFT
    trained on Lyon, an answer the file rejects against Paris; Paris was lost."""
    ask = user("Capital of France?")
    rows = [
        {"prompt": ask, "chosen": assistant("Paris"), "rejected": assistant("Lyon")},
        {"prompt": ask, "chosen": assistant("Lyon"), "rejected": assistant("Marseille")},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    built = build(loaded(*from_jsonl(path).samples, *PADDING), config(method="dpo"))
    pairs = {
        (r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in all_rows(built, "dpo") if r["prompt"] == ask
    }
    assert {("Paris", "Lyon"), ("Lyon", "Marseille")} <= pairs, pairs
    assert ("Lyon", "Paris") not in pairs
    sft = [r["completion"][0]["content"] for r in all_rows(built, "sft") if r["prompt"] == ask]
    assert sft == ["Paris"], "the reference is a chosen answer never rejected"
    rows.append({"prompt": ask, "chosen": assistant("Marseille"), "rejected": assistant("Paris")})  # a cycle
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    built = build(loaded(*from_jsonl(path).samples, *PADDING), config(method="dpo"))
    assert not [r for r in all_rows(built, "sft") if r["prompt"] == ask], "every chosen answer is rejected once"
    assert len([r for r in all_rows(built, "dpo") if r["prompt"] == ask]) == 3, "each row's own pair"


def test_a_correction_rated_down_or_corrected_later_is_neither_the_reference_nor_labelled_good() -> None:
    """A model trained on a correction answers with it, and users then rate that answer: a correction rated down
    (or corrected) since was the reference, SFT's example and the eval's bar, and KTO's `True` over its own
    thumbs down."""
    ask = user("How do I reset my password?")
    later = [sample(ask, "A", 0.0, "C"), sample(ask, "C", 0.0, "D")]  # C was answered, rated down and corrected
    twice = [sample(ask, "A", 0.0, "C"), sample(ask, "C", 0.0), sample(ask, "C", 0.0)]  # C rated down twice
    for samples, reference in ((later, "D"), (twice, None)):
        built = build(loaded(*samples, *PADDING), config())

        def mine(kind: str) -> list[dict[str, Any]]:
            return [r for r in all_rows(built, kind) if r["prompt"] == ask]  # noqa: B023

        labels = {r["completion"][0]["content"]: r["label"] for r in mine("kto")}
        assert labels["C"] is False and labels["A"] is False, labels
        assert [r["completion"][0]["content"] for r in mine("sft")] == ([reference] if reference else [])
        pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in mine("dpo")}
        assert ("C", "A") in pairs, "a correction is still preferred to the answer it corrects"


def test_a_malformed_jsonl_row_is_an_error_naming_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q", "label": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a TRL row"):
        from_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: messages must be a prompt and then an assistant answer"):
        from_jsonl(tmp_path / "bad.jsonl")


def test_a_jsonl_row_with_a_lone_surrogate_is_an_error_naming_its_line(tmp_path: Path) -> None:
    """`json.loads` takes `"\\ud83d"`, which no text can be encoded from: the dataset step failed on it later with no
    file or line named."""
    lines = ['{"prompt": "q", "completion": "a"}', '{"prompt": "\\ud83d", "completion": "a"}']
    (tmp_path / "odd.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"odd\.jsonl:2: "):
        from_jsonl(tmp_path / "odd.jsonl")


def test_a_validation_split_gets_an_example_of_the_method_where_train_has_two() -> None:
    """8 of 30 prompts give a DPO pair: a split could leave none in validation, which the dataset step took and the
    fit refused (the run had to start again). One such group moves from train to validation; the test split stays."""
    samples = [
        sample(user(f"ticket {i} about printer {i * 7}"), *((f"bad {i}", 0.0, f"good {i}") if i < 8 else (f"ok {i}",)))
        for i in range(30)
    ]
    for seed in range(40):
        built = build(loaded(*samples), config(method="dpo", seed=seed))
        assert built.rows["validation"]["dpo"] and built.rows["train"]["dpo"], seed
        assert sum(len(rows["dpo"]) for rows in built.rows.values()) == 8, "every pair in one split or another"


def test_one_kind_of_prompt_is_kept() -> None:
    samples = [sample(user(f"q{n}"), "a") for n in range(4)] + [sample(f"text prompt {n}", "a") for n in range(3)]
    assert build(loaded(*samples), config()).card.filters["other_endpoint"] == 3
    only_text = build(loaded(*samples), config(endpoint="completions"))
    assert only_text.card.filters["other_endpoint"] == 4
    assert all(row["prompt"].startswith("text prompt") for row in all_rows(only_text, "sft"))


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = build(loaded(*[sample(f"q{n}", "a") for n in range(5)]), config())
    calls = itertools.count()
    real = dataset._write_file

    def failing(path: Path, text: str) -> None:
        if next(calls) == 3:
            raise OSError("disk full")
        real(path, text)

    monkeypatch.setattr(dataset, "_write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        write(built, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    write(built, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "data_card.json",
        "data_card.md",
        "eval.jsonl",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    with pytest.raises(FileExistsError):
        write(built, tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


async def test_from_feedback_reads_the_tenant_log_with_its_policy(redis: aioredis.Redis) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    await TenantStore(redis).create(tenant, logging=LogPolicy(score_min=1.0, score_max=5.0))
    logged: list[tuple[CompletionRecord, dict[str, Any] | None]] = [
        (record(tenant=tenant, alias="a"), {"score": 4.0}),  # 0.75: positive
        (record("meh", tenant=tenant, alias="a"), {"score": 2.0, "correction": "better"}),
        (record(tenant=tenant, alias="b"), {"thumbs": "down"}),
        (record(tenant=tenant, alias="a"), None),  # unrated
    ]
    for r, feedback in logged:
        await redis.xadd(keys.completion_log(tenant), {"r": r.model_dump_json()})
        if feedback:
            fb = Feedback(completion_id=r.id, created=r.created + 1, **feedback)
            await redis.hset(keys.feedback(tenant, r.id), "", fb.model_dump_json())
    got = await from_feedback(redis, tenant, alias="a")
    assert (got.records_read, got.with_feedback, got.source) == (
        4,
        2,
        {"kind": "feedback", "tenant": tenant, "alias": "a"},
    )
    assert [(s.text, s.judgement, s.correction) for s in got.samples] == [("ok", 0.75, None), ("meh", 0.25, "better")]
    assert len((await from_feedback(redis, tenant)).samples) == 3
    assert got.phone_region == "US"


async def test_a_dataset_reads_phone_numbers_in_its_tenants_region(redis: aioredis.Redis) -> None:
    """Records kept before the tenant set its region, read again: `020 7946 0958` is a GB number."""
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    await TenantStore(redis).create(tenant, logging=LogPolicy(phone_region="gb"))
    for n in range(4):
        r = record(f"Call 020 7946 0958 about {n}.", tenant=tenant)
        await redis.xadd(keys.completion_log(tenant), {"r": r.model_dump_json()})
        fb = Feedback(completion_id=r.id, created=r.created + 1, thumbs="up")
        await redis.hset(keys.feedback(tenant, r.id), "", fb.model_dump_json())
    got = await from_feedback(redis, tenant)
    assert got.phone_region == "GB"
    built = build(got, config())
    assert "7946" not in "".join(built.files.values()) and built.card.redactions == {"phone": 4}


def test_an_exported_tool_conversation_trains_as_exported(tmp_path: Path) -> None:
    """A JSONL export's tool calls and results stay in the prompt and its tools in the rows; an answer that calls a
    tool is left out (the eval scores text). The same question without tools is another prompt, PII redacted or not,
    and no near duplicate of it either."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    tools = json.dumps([{"type": "function", "function": {"name": "weather"}}])
    asked = [*user("Weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", **call}]}]
    after = [*asked, {"role": "tool", "content": "18 C", "tool_call_id": "c1"}]
    calling = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    rows = [
        {
            "messages": [*user("Weather in Paris?"), *calling],
            "tools": tools,
        },
        {"messages": [*after, *assistant("It is 18 C.")], "tools": tools},
        {"prompt": after, "completion": assistant("It is cold."), "label": False, "tools": tools},
        {"prompt": after, "completion": assistant("I cannot tell."), "label": False},  # without the tools
        {"prompt": user("Oslo?"), "chosen": calling, "rejected": assistant("No idea."), "tools": tools},
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    got = from_jsonl(path)
    assert got.dropped == {"empty_answer": 0, "tool_call_answer": 2}, "a chosen call: its row's rejected answer stays"
    assert (got.samples[-1].text, got.samples[-1].judgement, got.samples[-1].correction) == ("No idea.", 0.0, None)
    assert [(s.prompt, s.text, s.tools) for s in got.samples[:1]] == [
        (after, "It is 18 C.", json.dumps(json.loads(tools), sort_keys=True))
    ]
    for redact in (False, True):
        built = build(
            Loaded([*got.samples, *PADDING], got.source, 4, 4, got.dropped),
            config(redact_pii=redact),
        )
        filters = built.card.filters
        assert (filters["exact_duplicate_prompts"], filters["near_duplicate_prompts"]) == (1, 0), (
            "the two rows after the call; not the one without tools"
        )
        (pair,) = all_rows(built, "dpo")
        assert pair == {
            "prompt": after,
            "tools": got.samples[0].tools,
            "chosen": assistant("It is 18 C."),
            "rejected": assistant("It is cold."),
        }


def test_the_eval_rows_carry_the_tools_their_prompts_were_asked_with() -> None:
    """The eval gate asks each test prompt as its request was made: with the tools it declared (the answer it scores
    may differ when the model can call one), and a prompt that declared none without."""
    tools = json.dumps([{"type": "function", "function": {"name": "weather"}}], sort_keys=True)
    samples = [
        Sample(p, f"{tools if n % 2 else ''}{p}", f"Sunny in city {n}.", 1.0, None, None, tools if n % 2 else None)
        for n in range(40)
        for p in [user(f"What is the weather in city {n} today? " + " ".join(f"w{n}x{i}" for i in range(12)))]
    ]
    built = build(loaded(*samples), config())
    rows = [json.loads(line) for line in built.files[dataset.EVAL_FILE].splitlines()]
    asked = {row["prompt"][0]["content"]: row.get("tools") for row in rows}
    declared = {s.prompt[0]["content"]: s.tools for s in samples}
    assert rows and {text: declared[text] for text in asked} == asked
    assert {tools, None} <= set(asked.values()), "some of the test prompts declared tools, some did not"


def test_numbers_in_a_prompts_tool_call_arguments_are_redacted_too(tmp_path: Path) -> None:
    """Rows hold a call's arguments as an object, whose numbers are no strings: a phone number written as one is
    found all the same (redacted in the JSON text the call was sent as), and the arguments stay an object."""
    call = {"type": "function", "function": {"name": "notify", "arguments": {"phone": 2025550143, "n": 3}}}
    asked = [*user("Tell ann"), {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", **call}]}]
    after = [*asked, {"role": "tool", "content": "sent", "tool_call_id": "c1"}]
    path = tmp_path / "calls.jsonl"
    path.write_text(json.dumps({"messages": [*after, *assistant("Ann is told.")]}) + "\n")
    got = from_jsonl(path)
    built = build(Loaded([*got.samples, *PADDING], got.source, 4, 4, got.dropped), config(redact_pii=True))
    (row,) = [r for r in all_rows(built, "sft") if r["prompt"][0]["content"] == "Tell ann"]
    assert row["prompt"][1]["tool_calls"][0]["function"]["arguments"] == {"phone": "[PHONE]", "n": 3}
    assert "2025550143" not in "".join(built.files.values()) and built.card.redactions == {"phone": 1}


def test_the_tools_a_prompt_called_are_words_of_it_for_near_duplicates() -> None:
    """Two conversations alike but for the tool they called are not near duplicates (their answers are not
    interchangeable)."""

    def called(name: str) -> list[dict[str, Any]]:
        call = {"type": "function", "function": {"name": name, "arguments": {"order": 1}}}
        said = {"role": "assistant", "content": "", "tool_calls": [call]}
        return [*user("Please help with my order 1"), said, {"role": "tool", "content": "done", "tool_call_id": "c"}]

    cancel, refund = shingles(called("cancel_order")), shingles(called("refund_order"))
    assert cancel != refund and list(near_pairs([cancel, refund], 0.9)) == []
