"""The compiled record path (gateway.native): used only while it matches the sources, and the same records as
the Python modules it was compiled from."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pydantic_core

from gateway import native, native_build
from gateway.context import RequestContext
from gateway.phones import MAX_PHONE_CHECKS
from gateway.record_builder import MAX_CHARS, RawRecord, build_entries, raw_row
from gateway.records import LogPolicy
from gateway.redaction import PII_KINDS, Redactor
from gateway.routing import Route
from gateway.tenants import Tenant

PII = [
    "jane.doe@example.com",
    "+44 20 7946 0018",
    "(415) 555-2671",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "10.0.0.1",
    "addr:2001:db8::1",
    "order 1234567",
    "call 202-555-0143 now",
    "José ü ４１１１１１１１１１１１１１１１",
    "12:30 on v1.2.3",
    "the quick brown fox",
]


def _built(root: Path, sources: dict[str, str]) -> Path:
    """A build in `root` as `python -m gateway.native_build` leaves one (its extensions stand-ins) for `sources`."""
    for module, text in sources.items():
        path = root / native.source(module)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    compiled = root / native.NATIVE / "gateway"
    compiled.mkdir(parents=True)
    for name in (*(module.rsplit(".", 1)[1] for module in native.MODULES), f"{native.GROUP.rsplit('.', 1)[1]}__mypyc"):
        (compiled / f"{name}{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    (compiled / native.MANIFEST).write_text(json.dumps(native.fingerprint(root)))
    return compiled


SOURCES = {module: f"# {module}\n" for module in (*native.MODULES, "gateway.context", "adapters.manifest")}


def test_a_build_is_first_on_the_path_only_while_it_matches_the_sources(tmp_path: Path) -> None:
    compiled = str(_built(tmp_path, SOURCES))
    assert native.package_path(["src"], tmp_path, {}) == [compiled, "src"]
    assert native.package_path(["src"], tmp_path, {native.OFF: "0"}) == ["src"], "turned off"
    (tmp_path / native.source("gateway.redaction")).write_text("# edited since the build\n")
    assert native.package_path(["src"], tmp_path, {}) == ["src"], "a stale build would shadow the edit"


def test_an_edit_to_a_module_the_build_was_compiled_against_makes_it_stale(tmp_path: Path) -> None:
    """The compiled modules call into the others (and into `adapters`) with the types they had at the build: any
    edit there, or a module added, stops the build being used."""
    _built(tmp_path, SOURCES)
    assert len(native.package_path(["src"], tmp_path, {})) == 2
    (tmp_path / native.source("adapters.manifest")).write_text("version: int = 2\n")
    assert native.package_path(["src"], tmp_path, {}) == ["src"]
    (tmp_path / native.source("adapters.manifest")).write_text("# adapters.manifest\n")
    assert len(native.package_path(["src"], tmp_path, {})) == 2, "as built again"
    (tmp_path / "gateway" / "routes").mkdir()
    (tmp_path / "gateway" / "routes" / "new.py").write_text("x = 1\n")
    assert native.package_path(["src"], tmp_path, {}) == ["src"]


def test_a_partial_build_another_python_s_or_a_broken_manifest_is_not_used(tmp_path: Path) -> None:
    assert native.package_path(["src"], tmp_path, {}) == ["src"], "nothing built"
    compiled = _built(tmp_path, SOURCES)
    (compiled / f"native_records__mypyc{EXTENSION_SUFFIXES[0]}").unlink()
    assert native.package_path(["src"], tmp_path, {}) == ["src"], "an extension missing: it would not import"
    (compiled / f"native_records__mypyc{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    manifest = compiled / native.MANIFEST
    manifest.write_text(json.dumps({**native.fingerprint(tmp_path), "python": "cpython-399"}))
    assert native.package_path(["src"], tmp_path, {}) == ["src"]
    manifest.write_text("{not json")
    assert native.package_path(["src"], tmp_path, {}) == ["src"]


def test_the_build_reads_copies_of_the_packages_alone(tmp_path: Path) -> None:
    """Installed (site-packages, in the gateway image), the packages sit beside every other top-level module: mypy,
    run there, took `typing_extensions.py` for one of the build's own and refused it. It runs on copies of the
    packages' modules alone."""
    root = tmp_path / "site-packages"
    for name in ("gateway/__init__.py", "gateway/routes/openai.py", "adapters/manifest.py", "typing_extensions.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    (root / "gateway" / "page.html").write_text("<p>")
    native_build._copy_sources(root, tmp_path / "src")
    copied = sorted(str(path.relative_to(tmp_path / "src")) for path in (tmp_path / "src").rglob("*") if path.is_file())
    assert copied == ["adapters/manifest.py", "gateway/__init__.py", "gateway/routes/openai.py"]
    assert (tmp_path / "src" / "gateway" / "routes" / "openai.py").read_text() == "# gateway/routes/openai.py\n"


def test_the_suite_runs_the_build_that_make_setup_made() -> None:
    """`make setup` compiles the record path and the suite runs it; with LORAGATE_NATIVE=0 it runs the Python
    modules. A missing or stale build fails here, not silently: run `make setup` (or `python -m
    gateway.native_build`) after editing `gateway/` or `adapters/`."""
    from gateway import redaction

    if os.environ.get(native.OFF) == "0":
        assert not native.active() and (redaction.__file__ or "").endswith(".py")
        return
    assert native.usable(), "no compiled build of the sources as they are: run `make setup`"
    assert native.active()
    assert (redaction.__file__ or "").startswith(str(native.ROOT / native.NATIVE / "gateway"))


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(PII) for _ in range(rng.randint(0, 4)))


def _payload(rng: random.Random, endpoint: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": "m", "max_tokens": 16, "user": f"u{rng.randint(0, 3)}"}
    if rng.random() < 0.3:
        payload["metadata"] = {"note": _text(rng), "k2y@x.com": "v"}
    if endpoint == "completions":
        return payload | {"prompt": rng.choice([_text(rng), [_text(rng), _text(rng)], [1, 2, 3]])}
    messages: list[dict[str, Any]] = [{"role": "system", "content": _text(rng)}]
    messages.append({"role": "user", "content": _text(rng)})
    if rng.random() < 0.3:
        messages.append({"role": "user", "content": [{"type": "text", "text": _text(rng)}]})
    if rng.random() < 0.3:
        call = {"id": "call_9a1", "type": "function", "function": {"name": "f", "arguments": _text(rng)}}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return payload | {"messages": messages}


ODD_FIELDS: list[dict[str, Any]] = [  # what an upstream might send where the API has another type
    {"finish_reason": 1},
    {"finish_reason": {"type": "stop"}},
    {"finish_reason": float("nan")},
    {"index": "1"},
    {"index": 1.0},
    {"index": True},
    {"index": None},
    {"index": float("inf")},
    {"usage": [1, 2]},
]
"""Merged into a choice and into its event or body."""
ODD_CALLS: list[object] = [
    "f(x)",
    ["f(x)"],
    [{"id": 7, "function": {"name": float("nan"), "arguments": {"a": 1}}}],
    [{"id": float("inf"), "function": {"name": "f", "arguments": 3}}],
    [{"id": "c1", "function": "f"}],
    [{"index": 0, "id": "c1", "function": {"name": "f"}}, {"index": 0, "id": "c2", "function": {"name": "g"}}],
]
"""A message's or a delta's `tool_calls`; the last: two whole calls both numbered 0 (two calls, in a whole answer)."""


def _answer(context: RequestContext, rng: random.Random, i: int) -> None:
    """A whole answer, or a stream's events; some with an `id` that is not a string (taken for none), with tool
    calls (whole, or in pieces), with a field or tool calls of an odd type (`ODD_FIELDS`, `ODD_CALLS`: taken as
    absent, compiled or not), or with a message that is not an object."""
    answer_id: object = f"cmpl-{i}" if i % 7 else i
    odd = ODD_FIELDS[i // 5 % len(ODD_FIELDS)] if i % 5 == 1 else {}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"to": _text(rng)})}}
    calls: object = ODD_CALLS[i // 5 % len(ODD_CALLS)] if i % 5 == 2 else [call]
    if context.stream:  # assembled as it passed
        for piece in (_text(rng), _text(rng)):
            delta: object = {"content": piece} if i % 11 != 3 else piece
            if isinstance(delta, dict) and i % 5 == 2:
                delta["tool_calls"] = calls
            elif isinstance(delta, dict) and i % 3 == 0:
                delta["tool_calls"] = [{"index": 0, "function": {"arguments": piece}}]
            choice = {"index": 0, "delta": delta, "finish_reason": None} | odd
            context.answer.feed(json.dumps({"id": answer_id, "choices": [choice]} | odd).encode())
        context.answer.feed(b"[1, 2]")  # not an object: passed on, not recorded
        context.answer.feed(json.dumps({"id": answer_id, "choices": [], "usage": {"prompt_tokens": 3}}).encode())
        return
    message: object = {"role": "assistant", "content": _text(rng)} if i % 11 != 3 else "hi"
    if isinstance(message, dict) and (i % 3 == 0 or i % 5 == 2):
        message["tool_calls"] = calls
    choice = {"index": 0, "finish_reason": "stop"} | (
        {"message": message} if context.endpoint == "chat" else {"text": ""}
    )
    context.answer.body = json.dumps({"id": answer_id, "choices": [choice | odd]} | odd).encode()


def corpus(n: int) -> list[RequestContext]:
    """N finished requests, the same in any process: chat and text completions, streams, every PII kind, five
    policies, statuses; one text cut at MAX_CHARS with PII across the cut, one past a record's phone checks."""
    rng = random.Random(7)
    policies = [LogPolicy(), LogPolicy(redact=[]), LogPolicy(content=False), LogPolicy(redact=["email", "ip"])]
    out = []
    for i in range(n):
        endpoint = rng.choice(["chat", "completions"])
        policy = rng.choice([*policies, LogPolicy(phone_region="GB")])
        tenant = Tenant(name=f"t{i % 3}", logging=policy, created=1_780_000_000.0)
        route = Route(requested="m", upstream_model="m", served_model="m")
        payload = _payload(rng, endpoint)
        if i == 1:
            payload["metadata"] = {"long": "x" * (MAX_CHARS - 10) + " jane.doe@example.com and more"}
        if i == 2:
            payload["metadata"] = {"calls": " ".join(f"+44 20 7946 0{k:03d}" for k in range(MAX_PHONE_CHECKS + 5))}
        payload["stream"] = i % 4 == 0
        context = RequestContext(f"r{i}", endpoint, tenant, "k", payload=payload, route=route)
        context.validated = True
        context.sent = json.dumps(context.payload).encode()
        context.received, context.started = 1_790_000_000.0 + i, 0.0
        _answer(context, rng, i)
        context.finish(rng.choice([200, 200, 499, 500]))
        context.latency_s = context.first_token_s = 0.1 + i / 1000
        out.append(context)
    return out


_AS_PYTHON = """
import pickle, sys
from gateway import native
from gateway.record_builder import RawRecord, build_entries, raw_row
from gateway.redaction import PII_KINDS, Redactor
from tests.unit.test_native import corpus
n, texts = pickle.load(sys.stdin.buffer)
rows = pickle.dumps([raw_row(context) for context in corpus(n)])  # as taken: building changes a stream's choices
redactor = Redactor(PII_KINDS)
entries = build_entries([RawRecord._make(row) for row in pickle.loads(rows)])
pickle.dump((native.active(), pickle.loads(rows), entries, [redactor.redact(t) for t in texts]), sys.stdout.buffer)
"""


def test_compiled_and_python_modules_build_the_same_records() -> None:
    """A varied corpus (`corpus`), each request's raw record taken and built here (compiled) and in a process
    running the Python modules: the same raw records, the same records, the same redactions."""
    texts = [_text(random.Random(i)) for i in range(200)]
    python = subprocess.run(
        [sys.executable, "-c", _AS_PYTHON],
        input=pickle.dumps((300, texts)),
        capture_output=True,
        cwd=native.ROOT,
        env={**os.environ, native.OFF: "0"},
        check=True,
        timeout=120,
    )
    active, their_rows, their_entries, their_texts = pickle.loads(python.stdout)  # noqa: S301 (our own process)
    assert active is False
    rows = [raw_row(context) for context in corpus(300)]
    assert rows == their_rows
    ours = build_entries([RawRecord._make(row) for row in rows])
    assert len(ours) == len(rows) and ours == their_entries
    redactor = Redactor(PII_KINDS)
    assert [redactor.redact(t) for t in texts] == their_texts
    records = [json.loads(entry["record"]) for entry in ours]
    assert sum(record["redactions"].get("card", 0) for record in records) > 0
    assert records[1]["truncated"] and "jane" not in json.dumps(records[1]["request"])
    assert records[2]["redactions"]["phone"] >= MAX_PHONE_CHECKS + 5, "past its checks, redacted unchecked"
    assert any(record["stream"] for record in records) and records[7]["id"] == "req-r7", "an id that is no string"
    finishes = {str(choice.get("finish_reason")) for record in records for choice in record["choices"] or ()}
    assert finishes == {"stop", "None"}, "a finish_reason that is not a string is taken as none"
    calls = [c for record in records for choice in record["choices"] or () for c in choice.get("tool_calls") or ()]
    assert any(c["function"].get("arguments") for c in calls), "tool calls, whole and assembled from pieces"
    assert {c.get("id") for c in calls} >= {"c1", "c2", "call_1"} and None in {c.get("id") for c in calls}
    texts = [c.get("id") for c in calls] + [v for c in calls for v in c["function"].values()]
    assert all(isinstance(text, str) for text in texts if text is not None), "an id, name or arguments not a string"
    for entry in ours:  # JSON, not NaN or Infinity: what is not a string where the API has one is not kept
        pydantic_core.from_json(entry["record"], allow_inf_nan=False)
