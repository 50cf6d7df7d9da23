"""The compiled record path (gateway.native): used only while it matches the sources, and the same records as
the Python modules it was compiled from."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway import native
from gateway.context import RequestContext
from gateway.record_builder import RawRecord, build_entries, raw_row
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


def _built(root: Path, sources: dict[str, str]) -> None:
    for module, text in sources.items():
        path = root / native.source(module)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    manifest = root / native.NATIVE / "gateway" / native.MANIFEST
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps(native.fingerprint(root)))


def test_a_build_is_first_on_the_path_only_while_it_matches_the_sources(tmp_path: Path) -> None:
    _built(tmp_path, {module: f"# {module}\n" for module in (*native.MODULES, "gateway.context")})
    compiled = str(tmp_path / native.NATIVE / "gateway")
    assert native.package_path(["src"], tmp_path, {}) == [compiled, "src"]
    assert native.package_path(["src"], tmp_path, {native.OFF: "0"}) == ["src"], "turned off"
    (tmp_path / native.source(native.MODULES[1])).write_text("# edited since the build\n")
    assert native.package_path(["src"], tmp_path, {}) == ["src"], "a stale build would shadow the edit"


def test_an_edit_to_a_module_the_build_was_compiled_against_makes_it_stale(tmp_path: Path) -> None:
    """The compiled modules call into the others with the types they had at the build: any edit in the package (or
    a module added) stops the build being used."""
    _built(tmp_path, {module: f"# {module}\n" for module in (*native.MODULES, "gateway.context")})
    assert len(native.package_path(["src"], tmp_path, {})) == 2
    (tmp_path / "gateway" / "routes").mkdir()
    (tmp_path / "gateway" / "routes" / "new.py").write_text("x = 1\n")
    assert native.package_path(["src"], tmp_path, {}) == ["src"]


def test_a_build_for_another_python_or_a_broken_manifest_is_not_used(tmp_path: Path) -> None:
    assert native.package_path(["src"], tmp_path, {}) == ["src"], "nothing built"
    _built(tmp_path, {module: "x = 1\n" for module in native.MODULES})
    manifest = tmp_path / native.NATIVE / "gateway" / native.MANIFEST
    manifest.write_text(json.dumps({**native.fingerprint(tmp_path), "python": "cpython-399"}))
    assert native.package_path(["src"], tmp_path, {}) == ["src"]
    manifest.write_text("{not json")
    assert native.package_path(["src"], tmp_path, {}) == ["src"]


def test_this_process_runs_the_build_that_make_setup_made() -> None:
    """`make setup` compiles the record path; the suite then runs it (the Python modules where it did not)."""
    expected = len(native.package_path([])) == 1
    assert native.active() is expected
    from gateway import redaction

    assert (redaction.__file__ or "").endswith(".py") is not expected


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


def _contexts(n: int) -> list[RequestContext]:
    rng = random.Random(7)
    policies = [LogPolicy(), LogPolicy(redact=[]), LogPolicy(content=False), LogPolicy(redact=["email", "ip"])]
    out = []
    for i in range(n):
        endpoint = rng.choice(["chat", "completions"])
        tenant = Tenant(name=f"t{i % 3}", logging=rng.choice([*policies, LogPolicy(phone_region="GB")]))
        route = Route(requested="m", upstream_model="m", served_model="m")
        context = RequestContext(f"r{i}", endpoint, tenant, "k", payload=_payload(rng, endpoint), route=route)
        context.validated = True
        context.sent = json.dumps(context.payload).encode()
        message = {"role": "assistant", "content": _text(rng)}
        choice = {"index": 0, "finish_reason": "stop"} | ({"message": message} if endpoint == "chat" else {"text": ""})
        context.answer.body = json.dumps({"id": f"cmpl-{i}", "choices": [choice]}).encode()
        context.finish(rng.choice([200, 200, 499, 500]))
        out.append(context)
    return out


_AS_PYTHON = """
import json, pickle, sys
from gateway import native
from gateway.record_builder import RawRecord, build_entries
from gateway.redaction import PII_KINDS, Redactor
rows, texts = pickle.load(sys.stdin.buffer)
redactor = Redactor(PII_KINDS)
entries = build_entries([RawRecord._make(row) for row in rows])
json.dump({"active": native.active(), "entries": entries, "texts": [redactor.redact(t) for t in texts]}, sys.stdout)
"""


def test_compiled_and_python_modules_build_the_same_records(tmp_path: Path) -> None:
    """Every record of a varied corpus (chat and text completions, every PII kind, policies, statuses), built here
    (compiled, once built) and in a process running the Python modules, is the same JSON."""
    rows = [raw_row(context) for context in _contexts(300)]
    texts = [_text(random.Random(i)) for i in range(200)]
    python = subprocess.run(
        [sys.executable, "-c", _AS_PYTHON],
        input=pickle.dumps((rows, texts)),
        capture_output=True,
        env={**os.environ, native.OFF: "0"},
        check=True,
        timeout=120,
    )
    theirs = json.loads(python.stdout)
    assert theirs["active"] is False
    ours = build_entries([RawRecord._make(row) for row in rows])
    assert len(ours) == len(rows)
    assert json.loads(json.dumps(ours)) == theirs["entries"]
    redactor = Redactor(PII_KINDS)
    assert json.loads(json.dumps([redactor.redact(t) for t in texts])) == theirs["texts"]
    assert sum(json.loads(entry["record"])["redactions"].get("card", 0) for entry in ours) > 0
