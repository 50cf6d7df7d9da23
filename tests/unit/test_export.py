"""Exports of the completion log joined with feedback, against a real Redis; the JSONL is then loaded
with `datasets` and passed through TRL's own format checks with the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from typer.testing import CliRunner

from gateway import keys
from gateway.cli import app as cli
from gateway.conversation import tool_calls
from gateway.dpo_pairs import PreferencePairs
from gateway.export import (
    FORMATS,
    MAX_SINCE,
    Example,
    ExportFormat,
    export,
    feedback_value,
    joined,
    judgement,
    rows,
)
from gateway.records import Choice, CompletionRecord, CorrectionMessage, Feedback, FeedbackIn, LogPolicy
from gateway.tenants import Tenant
from tests.conftest import ROOT, RedisServer, free_port, sync_redis_client
from tests.unit.conftest import emptied

POLICY = LogPolicy()
FIVE_STARS = LogPolicy(score_min=1.0, score_max=5.0)
SYSTEM = {"role": "system", "content": "Be brief."}
QUESTION = "What is the capital of France?"
IDS = itertools.count()
WEATHER = {"name": "weather", "arguments": '{"city": "Paris"}'}
PARSED = {"name": "weather", "arguments": {"city": "Paris"}}
"""WEATHER as rows hold it: its arguments an object, as chat templates read them."""
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server that keeps nothing on disk, for the exports of logs of 40-80 MB, which measure an export's
    memory, not a disk. Written to the session's Redis (AOF fsynced before every answer), such a log set off an AOF
    rewrite, and in CI, its disk busy, an XRANGE of it then went unanswered for a minute (11 tries of 5 s)."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("plain-redis"))
    server.start("plain")
    yield server
    server.stop()


@pytest.fixture
async def plain(plain_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with emptied(plain_server) as client:
        yield client


def chat(
    tenant: str = "acme", text: str | None = "Paris.", *, messages: list[dict[str, Any]] | None = None, **fields: Any
) -> CompletionRecord:
    messages = messages if messages is not None else [SYSTEM, {"role": "user", "content": QUESTION}]
    n = next(IDS)
    return CompletionRecord(
        id=f"chatcmpl-{n}",
        request_id=f"r{n}",
        tenant=tenant,
        endpoint="chat",
        model="m",
        request={"messages": messages, "temperature": 0},
        choices=None if text is None else [Choice(index=0, text=text, finish_reason="stop")],
        status=200,
        outcome="ok",
        created=1000.0 + n,
        **fields,
    )


def text_record(
    tenant: str = "acme", prompt: Any = "The sky is", text: str = " blue.", **fields: Any
) -> CompletionRecord:
    n = next(IDS)
    return CompletionRecord(
        id=f"cmpl-{n}",
        request_id=f"r{n}",
        tenant=tenant,
        endpoint="completions",
        model="m",
        request={"prompt": prompt},
        choices=[Choice(index=0, text=text)],
        status=200,
        outcome="ok",
        created=1000.0 + n,
        **fields,
    )


def fb(record: CompletionRecord, user: str | None = None, created: float = 0.0, **fields: Any) -> Feedback:
    return Feedback(completion_id=record.id, user=user, created=created or record.created + 1, **fields)


async def log(redis: aioredis.Redis, record: CompletionRecord, *feedback: Feedback, ms: int | None = None) -> None:
    """The record into the tenant's log (at `ms` when given), and its feedback, as the gateway stores them."""
    await redis.xadd(keys.completion_log(record.tenant), {"r": record.model_dump_json()}, id=f"{ms}-0" if ms else "*")
    for f in feedback:
        await redis.hset(keys.feedback(record.tenant, record.id), f.user or "", f.model_dump_json())


async def log_many(redis: aioredis.Redis, rated: Iterable[tuple[CompletionRecord, Feedback]], mb: int = 4) -> None:
    """Rated records into their log, in pipelines of about `mb` MB each: one pipeline of 80 MB outlasted the
    client's 5 s write timeout on a loaded machine (written to the session's Redis, which fsyncs every write)."""
    pipe, size = redis.pipeline(transaction=False), 0
    for record, rating in rated:
        raw = record.model_dump_json()
        pipe.xadd(keys.completion_log(record.tenant), {"r": raw})
        pipe.hset(keys.feedback(record.tenant, record.id), rating.user or "", rating.model_dump_json())
        size += len(raw)
        if size >= mb << 20:
            await pipe.execute()
            size = 0
    await pipe.execute()


def rated(record: CompletionRecord, **fields: Any) -> Example:
    return Example(record, [fb(record, **fields)])


def good(record: CompletionRecord) -> Example:
    return rated(record, thumbs="up")


def bad(record: CompletionRecord) -> Example:
    return rated(record, thumbs="down")


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


PROMPT = [SYSTEM, {"role": "user", "content": QUESTION}]


async def test_join_skips_unrated_records_and_filters_by_alias_and_since(redis: aioredis.Redis, tenant: str) -> None:
    records = [chat(tenant, alias="a" if i % 2 else "b") for i in range(7)]
    for i, record in enumerate(records):
        await log(redis, record, *([] if i == 3 else [fb(record, thumbs="up")]), ms=(i + 1) * 1000)
    got = [e.record.id async for e in joined(redis, tenant, page=2)]
    assert got == [r.id for i, r in enumerate(records) if i != 3]
    assert [e.record.id async for e in joined(redis, tenant, alias="a", page=2)] == [records[1].id, records[5].id]
    assert [e.record.id async for e in joined(redis, tenant, since=4.5, page=3)] == [r.id for r in records[4:]]
    assert [e.record.id async for e in joined(redis, tenant, since=5.0, alias="b")] == [records[4].id, records[6].id]
    assert [e async for e in joined(redis, "nobody")] == []


async def test_several_users_are_averaged_with_scores_in_the_policy_range(redis: aioredis.Redis, tenant: str) -> None:
    record = chat(tenant)
    feedback = [
        fb(record, "ann", score=5.0),  # 1
        fb(record, "bob", thumbs="down"),  # 0
        fb(record, "cy", thumbs="up", score=3.0),  # (1 + 0.5) / 2
        fb(record, None, correction="Paris, France.", comment="no rating"),
    ]
    await log(redis, record, *feedback)
    [example] = [e async for e in joined(redis, tenant)]
    assert sorted(f.user or "" for f in example.feedback) == ["", "ann", "bob", "cy"]
    assert [feedback_value(f, FIVE_STARS) for f in feedback] == [1.0, 0.0, 0.75, None]
    assert judgement(example.feedback, FIVE_STARS) == pytest.approx(1.75 / 3)
    assert judgement(example.feedback, POLICY) == pytest.approx((1 + 0 + 1) / 3)  # scores above 1 count as 1
    assert judgement([feedback[3]], FIVE_STARS) is None
    assert feedback_value(fb(record, score=2.0), FIVE_STARS) == 0.25
    [kto] = [r for r in rows([example], "kto", FIVE_STARS) if r["completion"] == assistant("Paris.")]
    assert kto["label"] is True
    two_users_down = Example(record, [fb(record, "a", score=2.0), fb(record, "b", score=3.0)])  # 0.25 and 0.5
    assert [r["label"] for r in rows([two_users_down], "kto", FIVE_STARS)] == [False]


def test_sft_rows() -> None:
    parts: list[dict[str, Any]] = [
        {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": WEATHER}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c2", "type": "function"}]},  # no function: none
    ]
    liked, disliked, corrected = chat(text="Yes."), chat(text="No."), chat(text="Lyon.")
    examples = [
        good(liked),
        bad(disliked),
        Example(
            corrected,
            [
                fb(corrected, "a", thumbs="down", correction="Old.", created=1.0),
                fb(corrected, "b", correction="Paris.", created=2.0),
            ],
        ),
        good(chat(messages=parts, text="It is sunny.", user="end-user")),
        good(text_record(text=" blue.")),
        bad(text_record(prompt="Two plus two is", text=" five.")),
    ]
    assert list(rows(examples, "sft", POLICY)) == [
        {"messages": [*PROMPT, *assistant("Yes.")]},
        {"messages": [*PROMPT, *assistant("Paris.")]},  # the latest correction
        {
            "messages": [
                {"role": "system", "content": "Be\nbrief."},
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"id": "c1", "type": "function", "function": PARSED}],
                },
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                *assistant("It is sunny."),
            ]
        },
        {"prompt": "The sky is", "completion": " blue."},
    ]


def test_dpo_rows_pair_corrections_and_completions_of_the_same_prompt() -> None:
    reordered = [{"content": m["content"], "role": m["role"]} for m in PROMPT]  # same prompt, other key order
    other = [{"role": "user", "content": "Hi"}]
    corrected = chat(text="Lyon.")
    examples = [
        bad(chat(text="Berlin.")),
        rated(corrected, thumbs="down", correction="Paris."),
        rated(chat(text="Paris, I think."), score=0.75),
        good(chat(messages=reordered, text="Paris.")),
        bad(chat(messages=reordered, text="Berlin.")),  # the same pair again
        rated(chat(text="Paris!"), score=0.5),  # positive, not the best
        bad(chat(messages=other, text="Bye.")),  # no positive for this prompt
        rated(chat(text="Same."), correction="Same."),  # the correction is the answer
        bad(text_record(text=" green.")),
        good(text_record(text=" blue.")),
    ]
    assert list(rows(examples, "dpo", POLICY)) == [
        {"prompt": PROMPT, "chosen": assistant("Paris."), "rejected": assistant("Lyon.")},
        {"prompt": PROMPT, "chosen": assistant("Paris."), "rejected": assistant("Berlin.")},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ]


def test_kto_rows_label_every_judged_completion_and_add_corrections() -> None:
    corrected, confirmed = chat(text="Lyon."), chat(text="Paris.")
    examples = [
        good(chat(text="Paris.")),
        bad(chat(text="Berlin.")),
        rated(corrected, thumbs="down", correction="Paris."),
        rated(confirmed, thumbs="up", correction="Paris."),  # one row, not two
        rated(chat(text="Hm."), comment="no opinion", correction="Paris."),
        bad(text_record(text=" green.")),
    ]
    assert list(rows(examples, "kto", POLICY)) == [
        {"prompt": PROMPT, "completion": assistant("Paris."), "label": True},
        {"prompt": PROMPT, "completion": assistant("Berlin."), "label": False},
        {"prompt": PROMPT, "completion": assistant("Lyon."), "label": False},
        {"prompt": PROMPT, "completion": assistant("Paris."), "label": True},
        {"prompt": PROMPT, "completion": assistant("Paris."), "label": True},
        {"prompt": PROMPT, "completion": assistant("Paris."), "label": True},
        {"prompt": "The sky is", "completion": " green.", "label": False},
    ]


async def export_in_a_process(redis_server: RedisServer, tenant: str, path: Path, page: int, traced: bool) -> Any:
    """A DPO export to `path` by a process of its own (a clean interpreter: nothing an earlier test left running in
    this one, a thread or a pytest-xdist worker's own, is counted): what it read and wrote, how much its resident
    memory grew (its peak), and with `traced` the peak of what Python allocated (tracemalloc)."""
    run = [sys.executable, "-c", _EXPORT_PEAK, redis_server.url, tenant, str(path), str(page), str(traced)]
    done = await asyncio.to_thread(subprocess.run, run, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_a_dpo_export_keeps_each_prompt_once_not_each_record(
    plain: aioredis.Redis, plain_server: RedisServer, tenant: str, tmp_path: Path
) -> None:
    """DPO pairs a prompt's answers once all are read; what waits until then is each prompt once and its answers'
    texts, not every record's whole prompt: 2,000 rated records sharing a 20 kB system prompt (40 MB of prompts)
    are exported within a few pages' worth of memory."""
    system = {"role": "system", "content": "Follow the support policy. " * 800}
    messages = [system, {"role": "user", "content": QUESTION}]
    records = (chat(tenant, text=f"Answer {i}.", messages=messages) for i in range(2000))
    await log_many(plain, ((r, fb(r, thumbs="down" if i % 10 else "up")) for i, r in enumerate(records)))
    measured = await export_in_a_process(plain_server, tenant, tmp_path / "dpo.jsonl", 100, traced=True)  # rows: 36 MB
    assert measured["read"] == 2000 and measured["rows"] == 1800
    with (tmp_path / "dpo.jsonl").open() as written:
        assert json.loads(next(written))["chosen"] == assistant("Answer 0.")
    # 7.8 MiB alone, 17.2 once beside the rest of the suite on 2 cores (a page read in more pieces); every record's
    # prompt kept would be 40 MB more
    assert measured["traced"] < 24 << 20, f"peak {measured['traced'] / 2**20:.1f} MiB"


_EXPORT_PEAK = """
import asyncio, json, sys, tracemalloc
import redis.asyncio as aioredis
from gateway.export import export
from gateway.records import LogPolicy

def kib(field):  # this process's own (VmHWM: the peak, since its exec), not ru_maxrss (kept across exec)
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1])

async def main():
    url, tenant, path, page, traced = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "True"
    redis = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=60)
    before = kib("VmRSS")
    if traced:  # its own traces cost memory: only where asked for
        tracemalloc.start()
    with open(path, "w") as out:
        summary = await export(redis, tenant, "dpo", out, LogPolicy(), page=page)
    peak = tracemalloc.get_traced_memory()[1] if traced else None
    await redis.aclose()
    grew = (kib("VmHWM") - before) << 10
    print(json.dumps({"grew": grew, "traced": peak, "read": summary.records_read, "rows": summary.rows_written}))

asyncio.run(main())
"""


async def test_a_dpo_export_keeps_rated_answers_out_of_memory_until_they_pair(
    plain: aioredis.Redis, plain_server: RedisServer, tenant: str, tmp_path: Path
) -> None:
    """The rated answers wait for the whole log to be read (a prompt's best answer may come last), on disk rather
    than in memory: 1,000 rated answers of 80 kB (80 MB) of 100 prompts are exported by a process whose memory grows
    by a few pages' worth (its peak resident memory, SQLite's included: 16 MiB here, 86 MiB when they waited in
    memory)."""
    records = (
        chat(
            tenant, text=f"Answer {i}. " + "x" * 80_000, messages=[{"role": "user", "content": f"Question {i % 100}?"}]
        )
        for i in range(1000)
    )  # each prompt's best answer comes last
    await log_many(plain, ((r, fb(r, thumbs="up" if i >= 900 else "down")) for i, r in enumerate(records)))
    path = tmp_path / "dpo.jsonl"
    measured = await export_in_a_process(plain_server, tenant, path, 20, traced=False)
    assert measured["read"] == 1000 and measured["rows"] == 900
    with path.open() as written:
        first = json.loads(next(written))
    assert first["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert first["chosen"][0]["content"].startswith("Answer 900. ")
    assert first["rejected"][0]["content"].startswith("Answer 0. ")
    assert measured["grew"] < 40 << 20, f"grew by {measured['grew'] / 2**20:.1f} MiB"


async def test_a_dpo_export_cancelled_midway_ends_its_thread_before_its_pairs_are_closed(
    redis: aioredis.Redis, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are written, and the pairs made, in a thread: cancelled meanwhile (a client gone, a shutdown), the
    export stops that thread at its next row, the pairs' database is closed by that thread once it is done with it,
    and the export returns only then (its caller closes the file next). Closed from the event loop while the thread
    was in a call, SQLite crashed the process."""
    # one prompt: its first answer liked, the 39 others not, so 39 pairs wait for the log
    records = (chat(tenant, text=f"Answer {i}.") for i in range(40))
    await log_many(redis, ((r, fb(r, thumbs="down" if i else "up")) for i, r in enumerate(records)))
    rows: list[int] = []
    third, go_on = threading.Event(), threading.Event()

    class HeldFile(io.StringIO):
        def write(self, text: str) -> int:
            rows.append(threading.get_ident())
            if len(rows) == 3:  # the thread is held in its third row until the export has been cancelled
                third.set()
                go_on.wait(10)
            return super().write(text)

    closed: list[int] = []
    close = PreferencePairs.close

    def closing(pairs: PreferencePairs) -> None:
        closed.append(threading.get_ident())
        close(pairs)

    monkeypatch.setattr(PreferencePairs, "close", closing)
    exporting = asyncio.create_task(export(redis, tenant, "dpo", HeldFile(), POLICY))
    assert await asyncio.to_thread(third.wait, 10), "the export wrote its third row"
    exporting.cancel()
    done, _ = await asyncio.wait([exporting], timeout=0.5)
    assert not done and not closed, "the export waits for its thread, held in its third row, and nothing was closed"
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await exporting
    assert closed == [rows[0]], "closed by the thread that made the pairs, after its last row, before export returned"
    assert len(rows) == 3, "the thread stopped at its next row, not after all 39"


async def test_records_without_content_are_skipped_and_counted(redis: aioredis.Redis, tenant: str) -> None:
    kept = chat(tenant, text="Paris.")
    no_content = chat(tenant).model_copy(update={"request": None, "choices": None})
    no_answer = chat(tenant, text=None)
    unusable = [
        no_content,
        text_record(tenant, prompt=[1, 2, 3]),  # tokens
        chat(tenant, messages=[{"role": "user", "content": ""}]),
        chat(tenant, messages=[{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]),
        no_answer,
    ]
    for record in [kept, *unusable]:
        await log(redis, record, fb(record, thumbs="up"))
    await log(redis, no_answer.model_copy(update={"id": "fixed"}), fb(no_answer, correction="Paris."))
    await log(redis, chat(tenant))  # no feedback: read, not counted as skipped
    seen: list[tuple[int, int]] = []
    out = io.StringIO()
    summary = await export(redis, tenant, "sft", out, POLICY, progress=lambda *a: seen.append(a), page=3)
    assert (summary.records_read, summary.with_feedback, summary.rows_written, summary.skipped) == (8, 7, 2, 5)
    assert seen == [(3, 1), (6, 1), (8, 2)]
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"messages": [*PROMPT, *assistant("Paris.")]},
        {"messages": [*PROMPT, *assistant("Paris.")]},
    ]
    dpo = await export(redis, tenant, "dpo", io.StringIO(), POLICY, progress=lambda *a: seen.append(a), page=3)
    assert dpo.rows_written == 0 and seen[3:] == [(3, 0), (6, 0), (8, 0), (8, 0)]


# TRL's checks run where TRL is installed: this interpreter with the `train` extra, else the QLoRA venv.
TRL_CHECK = """
import json, os, sys
from datasets import load_dataset
from transformers import AutoTokenizer
from trl.data_utils import is_conversational, maybe_apply_chat_template
model, cache, result, *files = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(model)
template = {"chat_template": os.environ["TEMPLATE"]} if os.environ.get("TEMPLATE") else {}
checked = {}
for name in files:
    dataset = load_dataset("json", data_files=name, split="train", cache_dir=cache)
    checked[name] = [
        {
            "row": row,
            "conversational": is_conversational(row),
            # as TRL's trainers read a row's tools: a JSON string, passed to the template
            "applied": maybe_apply_chat_template(row, tokenizer, json.loads(row.get("tools") or "null"), **template),
        }
        for row in dataset
    ]
json.dump(checked, open(result, "w"))
"""


def trl_python() -> str:
    if importlib.util.find_spec("trl") and importlib.util.find_spec("datasets"):
        return sys.executable
    bnb = ROOT / ".venv-bnb/bin/python"
    if not bnb.exists():
        pytest.skip("TRL is not installed (the `train` extra, or `make bnb-engine`)")
    return str(bnb)


def trl_checks(model: Path, tmp: Path, files: list[Path], template: str = "") -> dict[str, list[dict[str, Any]]]:
    """Each file loaded with `datasets`, and each row through TRL's checks (with `template` for the model's when
    given)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    env["TEMPLATE"] = template
    env["HF_HOME"] = str(tmp / "hf")
    result = tmp / "checked.json"
    args = [trl_python(), "-c", TRL_CHECK, str(model), str(tmp / "datasets"), str(result), *map(str, files)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    checked: dict[str, list[dict[str, Any]]] = json.loads(result.read_text())
    return {Path(name).stem: rows for name, rows in checked.items()}


async def test_exports_load_with_datasets_and_pass_trls_checks(
    redis: aioredis.Redis, tenant: str, base_model_dir: Path, tmp_path: Path
) -> None:
    liked, disliked, corrected = (
        chat(tenant, "Paris.", alias="c"),
        chat(tenant, "Rome.", alias="c"),
        chat(tenant, "Lyon.", alias="c"),
    )
    await log(redis, liked, fb(liked, thumbs="up"))
    await log(redis, disliked, fb(disliked, thumbs="down"))
    await log(redis, corrected, fb(corrected, correction="Paris, the capital."))
    blue, green = text_record(tenant, text=" blue.", alias="t"), text_record(tenant, text=" green.", alias="t")
    await log(redis, blue, fb(blue, score=1.0))
    await log(redis, green, fb(green, score=0.0))
    files = []
    formats: list[ExportFormat] = ["sft", "dpo", "kto"]
    for alias, fmt in itertools.product("ct", formats):
        path = tmp_path / f"{alias}-{fmt}.jsonl"
        with path.open("w") as out:
            summary = await export(redis, tenant, fmt, out, POLICY, alias=alias)
        assert summary.rows_written > 0
        files.append(path)
    checked = trl_checks(base_model_dir, tmp_path, files)

    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + QUESTION + "<|im_end|>\n"
    prompt = head + "<|im_start|>assistant\n"
    assert all(c["conversational"] for alias in ("c-sft", "c-dpo", "c-kto") for c in checked[alias])
    assert [c["applied"] for c in checked["c-sft"]] == [
        {"text": f"{prompt}Paris.<|im_end|>\n"},
        {"text": f"{prompt}Paris, the capital.<|im_end|>\n"},
    ]
    assert [c["applied"] for c in checked["c-dpo"]] == [
        {"prompt": prompt, "chosen": "Paris, the capital.<|im_end|>\n", "rejected": "Lyon.<|im_end|>\n"},
        {"prompt": prompt, "chosen": "Paris.<|im_end|>\n", "rejected": "Rome.<|im_end|>\n"},
    ]
    assert [c["applied"] for c in checked["c-kto"]] == [
        {"prompt": prompt, "completion": "Paris.<|im_end|>\n", "label": True},
        {"prompt": prompt, "completion": "Rome.<|im_end|>\n", "label": False},
        {"prompt": prompt, "completion": "Paris, the capital.<|im_end|>\n", "label": True},
    ]
    # Standard (text) rows are not conversational: TRL leaves them as they are.
    for name in ("t-sft", "t-dpo", "t-kto"):
        assert checked[name] and all(not c["conversational"] and c["applied"] == c["row"] for c in checked[name])
    assert [c["row"] for c in checked["t-dpo"]] == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]


async def test_answers_of_failed_cancelled_or_cut_requests_are_not_exported(redis: aioredis.Redis, tenant: str) -> None:
    """Only a whole answer is one: a cancelled stream's half answer, an error's, one cut by the log or stopped by the
    token limit give no SFT answer, DPO side or KTO completion (their corrections still count); records left with
    nothing are skipped and counted."""
    fine, berlin = chat(tenant, "Paris."), chat(tenant, "Berlin.")
    cancelled = {"outcome": "cancelled", "status": 499}
    partial = [
        chat(tenant, "Par").model_copy(update=cancelled),
        chat(tenant, "Pa").model_copy(update={"outcome": "error", "status": 502, "error_type": "upstream_error"}),
        chat(tenant, "Paris!!!", truncated=True),
        chat(tenant, "Paris is").model_copy(
            update={"choices": [Choice(index=0, text="Paris is", finish_reason="length")]}
        ),
    ]
    corrected = chat(tenant, "Lyo").model_copy(update=cancelled)
    await log(redis, fine, fb(fine, thumbs="up"))
    await log(redis, berlin, fb(berlin, thumbs="down"))
    for record in partial:
        await log(redis, record, fb(record, thumbs="up"))
    await log(redis, corrected, fb(corrected, thumbs="down", correction="Paris, France."))
    got: dict[str, list[dict[str, Any]]] = {}
    for fmt in FORMATS:
        out = io.StringIO()
        summary = await export(redis, tenant, fmt, out, POLICY)
        assert (summary.records_read, summary.with_feedback, summary.skipped) == (7, 7, 4), fmt
        got[fmt] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert got["sft"] == [{"messages": [*PROMPT, *assistant(answer)]} for answer in ("Paris.", "Paris, France.")]
    assert got["dpo"] == [{"prompt": PROMPT, "chosen": assistant("Paris."), "rejected": assistant("Berlin.")}]
    assert [(row["completion"][0]["content"], row["label"]) for row in got["kto"]] == [
        ("Paris.", True),
        ("Berlin.", False),
        ("Paris, France.", True),
    ]
    assert list(rows([good(partial[0]), bad(partial[1])], "dpo", POLICY)) == []


async def test_an_export_reads_the_log_as_it_was_when_it_began(
    redis: aioredis.Redis, redis_server: RedisServer, tenant: str
) -> None:
    """A tenant writing rated completions faster than the export reads them does not keep it reading: it ends at
    the entry that was last when it began."""
    for _ in range(4):
        record = chat(tenant)
        await log(redis, record, fb(record, thumbs="up"))
    writer = sync_redis_client(redis_server.url, decode_responses=True)
    pages: list[int] = []

    def more_meanwhile(read: int, written: int) -> None:  # two new entries per page of two read
        pages.append(read)
        assert len(pages) < 10, "the export follows the writes"
        for _ in range(2):
            writer.xadd(keys.completion_log(tenant), {"r": chat(tenant).model_dump_json()})

    try:
        for fmt in FORMATS:
            pages.clear()
            logged = await redis.xlen(keys.completion_log(tenant))
            summary = await export(redis, tenant, fmt, io.StringIO(), POLICY, page=2, progress=more_meanwhile)
            assert summary.records_read == logged and summary.with_feedback == 4, fmt
    finally:
        writer.close()


async def test_a_since_no_log_starts_from_is_refused(redis: aioredis.Redis, tenant: str) -> None:
    for since in (math.inf, -math.inf, math.nan, 1e300, MAX_SINCE * 10, -1.0):
        with pytest.raises(ValueError, match="since must be a Unix time"):
            await export(redis, tenant, "sft", io.StringIO(), POLICY, since=since)
    assert (await export(redis, tenant, "sft", io.StringIO(), POLICY, since=MAX_SINCE)).records_read == 0


def test_the_cli_refuses_a_since_no_log_starts_from(redis_server: RedisServer, tmp_path: Path) -> None:
    """`feedback export --since inf` printed an OverflowError's traceback, `--since 1e300` Redis's complaint."""
    state = sync_redis_client(redis_server.url, decode_responses=True)
    state.flushdb(asynchronous=True)
    state.set(keys.tenant("acme"), Tenant(name="acme").model_dump_json())
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url, "LORAGATE_RECORDS_REDIS_URL": ""}
    command = ["feedback", "export", "--tenant", "acme", "--format", "sft", "--output", str(tmp_path / "out.jsonl")]
    for since in ("inf", "-inf", "nan", "1e300", "1e14", "1900-01-01"):
        done = CliRunner().invoke(cli, [*command, "--since", since], env=env)
        assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (since, done.output, done.exception)
        assert "error:" in done.output and "since must be a Unix time" in done.output, done.output
    (tmp_path / "out.jsonl").touch()
    (tmp_path / "out.jsonl").chmod(0o644)  # an export of a release before, written over
    done = CliRunner().invoke(cli, [*command, "--since", "2024-01-01"], env=env)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600, "end users' conversations: the owner's alone"
    state.close()


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>"
    "{% endfor %}"
    "{% if m.tool_call_id %}<for {{ m.tool_call_id }}>{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A chat template that renders tools, tool calls and their results (SmolLM2's renders only role and content)."""


async def checked_exports(
    redis: aioredis.Redis, tenant: str, base_model_dir: Path, tmp_path: Path
) -> dict[str, list[dict[str, Any]]]:
    """The tenant's exports in each format, through TRL's checks with TOOL_TEMPLATE."""
    files = []
    for fmt in FORMATS:
        with (tmp_path / f"{fmt}.jsonl").open("w") as out:
            await export(redis, tenant, fmt, out, POLICY)
        files.append(tmp_path / f"{fmt}.jsonl")
    return trl_checks(base_model_dir, tmp_path, files, TOOL_TEMPLATE)


async def test_tool_calls_and_tools_are_exported_as_trls_trainers_read_them(
    redis: aioredis.Redis, tenant: str, base_model_dir: Path, tmp_path: Path
) -> None:
    """A completion that called a tool answers with its call; the conversation after it keeps the call and its result,
    and each row carries its request's tools, which TRL passes to the chat template."""
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    call = [{"id": "call-1", "type": "function", "function": WEATHER}]
    after = [
        *ask,
        {"role": "assistant", "tool_calls": call},
        {"role": "tool", "tool_call_id": "call-1", "content": "18 C"},
    ]

    def with_tools(messages: list[dict[str, Any]], text: str | None, calls: Any = None) -> CompletionRecord:
        record = chat(tenant, text, messages=messages)
        request = {"messages": messages, "tools": TOOLS}
        answer = [Choice(index=0, tool_calls=calls, finish_reason="tool_calls")] if calls else record.choices
        return record.model_copy(update={"request": request, "choices": answer})

    called, unsure, answered = (
        with_tools(ask, None, call),
        with_tools(ask, "I cannot tell."),
        with_tools(after, "Cold."),
    )
    await log(redis, called, fb(called, thumbs="up"))
    await log(redis, unsure, fb(unsure, thumbs="down"))
    await log(redis, answered, fb(answered, thumbs="down", correction="18 C in Paris."))
    checked = await checked_exports(redis, tenant, base_model_dir, tmp_path)

    tools = json.dumps(TOOLS, sort_keys=True)
    parsed = [{"id": "call-1", "type": "function", "function": PARSED}]
    calling = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": PARSED}]}]
    prompt_after = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": parsed},
        {"role": "tool", "content": "18 C", "tool_call_id": "call-1"},
    ]
    assert [c["row"] for c in checked["sft"]] == [
        {"messages": [*ask, *calling], "tools": tools},
        {"messages": [*prompt_after, *assistant("18 C in Paris.")], "tools": tools},
    ]
    assert [c["row"] for c in checked["dpo"]] == [
        {"prompt": prompt_after, "tools": tools, "chosen": assistant("18 C in Paris."), "rejected": assistant("Cold.")},
        {"prompt": ask, "tools": tools, "chosen": calling, "rejected": assistant("I cannot tell.")},
    ]
    assert [(c["row"]["completion"], c["row"]["label"]) for c in checked["kto"]] == [
        (calling, True),
        (assistant("I cannot tell."), False),
        (assistant("Cold."), False),
        (assistant("18 C in Paris."), True),
    ]
    head = f"<|im_start|>system\nTools: {tools}<|im_end|>\n"
    call_text = '<tool_call>weather {"city": "Paris"}</tool_call>'
    first, second = (c["applied"]["text"] for c in checked["sft"])
    assert first.startswith(head) and first.endswith(f"<|im_start|>assistant\n{call_text}<|im_end|>\n")
    assert f"{call_text}<|im_end|>\n<|im_start|>tool\n18 C<for call-1><|im_end|>\n" in second
    assert all(c["applied"]["prompt"].startswith(head) for c in checked["dpo"] + checked["kto"])


def test_arguments_nested_too_deep_to_read_are_exported_as_their_string() -> None:
    """A logged conversation whose tool call's arguments json.loads cannot read (RecursionError) made the tenant's
    every export a 500, until the record aged out."""
    deep = "[" * 100_000 + "]" * 100_000
    calls = tool_calls([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}])
    assert calls == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]


def test_arguments_holding_what_strict_json_refuses_are_exported_as_their_string() -> None:
    """`NaN`, `Infinity` and `1e400` Python reads (as nan and inf) and writes back as no JSON: `datasets` made them
    null, other readers refuse the line. A correction holding them is refused (`_check_call`)."""
    for arguments in ('{"a": NaN}', '{"b": 1e400}', '{"c": -Infinity}'):
        calls = tool_calls([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}])
        assert calls[0]["function"]["arguments"] == arguments
        with pytest.raises(ValidationError, match="JSON object"):
            ideal = CorrectionMessage(tool_calls=[{"function": {"name": "f", "arguments": arguments}}])  # type: ignore[list-item]
            FeedbackIn(completion_id="chatcmpl-1", correction=ideal)
    kept = tool_calls([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"d": 1.5e3}'}}])
    assert kept[0]["function"]["arguments"] == {"d": 1500.0}


async def test_a_correction_that_calls_a_tool_is_the_answer_that_calls_it(
    redis: aioredis.Redis, tenant: str, base_model_dir: Path, tmp_path: Path
) -> None:
    """The ideal answer called the tool: a correction message with `tool_calls` is chosen, labelled and learnt as that
    call (without its id, its arguments an object). On a text completion only a message's content corrects."""
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    record = chat(tenant, "I cannot tell.", messages=ask).model_copy(
        update={"request": {"messages": ask, "tools": TOOLS}}
    )
    ideal = CorrectionMessage(content="Checking.", tool_calls=[{"id": "call_7", "function": WEATHER}])  # type: ignore[list-item]
    await log(redis, record, fb(record, thumbs="down", correction=ideal))
    checked = await checked_exports(redis, tenant, base_model_dir, tmp_path)
    tools = json.dumps(TOOLS, sort_keys=True)
    calling = [{"role": "assistant", "content": "Checking.", "tool_calls": [{"type": "function", "function": PARSED}]}]
    assert [c["row"] for c in checked["sft"]] == [{"messages": [*ask, *calling], "tools": tools}]
    assert [c["row"] for c in checked["dpo"]] == [
        {"prompt": ask, "tools": tools, "chosen": calling, "rejected": assistant("I cannot tell.")}
    ]
    assert [(c["row"]["completion"], c["row"]["label"]) for c in checked["kto"]] == [
        (assistant("I cannot tell."), False),
        (calling, True),
    ]
    sft_text = checked["sft"][0]["applied"]["text"]
    assert sft_text.endswith(
        '<|im_start|>assistant\nChecking.<tool_call>weather {"city": "Paris"}</tool_call><|im_end|>\n'
    )

    text, calls_only, later = (text_record(f"{tenant}-text") for _ in range(3))
    calls = ideal.model_copy(update={"content": None})
    await log(redis, text, fb(text, thumbs="down", correction=CorrectionMessage(content=" grey.")))
    await log(redis, calls_only, fb(calls_only, correction=calls))
    before = fb(later, "ann", correction=" sunny.")
    await log(redis, later, before, fb(later, "bob", created=before.created + 1, correction=calls))
    out = io.StringIO()
    summary = await export(redis, f"{tenant}-text", "sft", out, POLICY)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"prompt": "The sky is", "completion": " grey."},
        {"prompt": "The sky is", "completion": " sunny."},  # the calls after it correct no text: the text stands
    ]
    assert summary.rows_written == 2, "calls alone correct no text completion (and its own answer was not rated)"
