"""The record path compiled: `gateway.redaction` and `gateway.record_builder` built with mypyc into `.native/`.

The record process spends its time in these two modules (walking a record, redacting each string, encoding it).
mypyc compiles them, as they are, to C extensions: the same code and the same results, about 15-20% less CPU a
record. `make setup` builds them (`python -m gateway.native_build`: half a minute with gcc and Python's headers), into
`.native/gateway/`, with a manifest of the sources they were built from. The `gateway` package puts that folder
first on its search path only while the manifest still matches its sources (every module: the compiled ones were
compiled against the others' types) and this Python, so an edited module is never shadowed by a build of its older
self: after an edit the record path runs as Python until the next build. `LORAGATE_NATIVE=0` turns
the compiled modules off (a process started with it runs the Python ones); without a build, or where it failed,
everything runs as Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

MODULES = ("gateway.redaction", "gateway.record_builder")
"""Compiled, in one extension group (calls between them stay native)."""
GROUP = "gateway.native_records"
ROOT = Path(__file__).resolve().parent.parent
NATIVE = ".native"
MANIFEST = "manifest.json"
OFF = "LORAGATE_NATIVE"


def fingerprint(root: Path = ROOT) -> dict[str, str]:
    """What a build is valid for: this Python's ABI and one digest of every module of the package (the compiled
    ones, and the others, whose types they were compiled against), about 3 ms."""
    digest = hashlib.sha256()
    for path in sorted((root / "gateway").rglob("*.py")):
        digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return {"python": sys.implementation.cache_tag, "gateway": digest.hexdigest()}


def package_path(path: Sequence[str], root: Path = ROOT, env: Mapping[str, str] = os.environ) -> list[str]:
    """The `gateway` package's search path: the compiled modules' folder first when they were built from the
    sources as they are now (and not turned off), otherwise the path as it was."""
    compiled = root / NATIVE / "gateway"
    if env.get(OFF) == "0":
        return list(path)
    try:
        built = json.loads((compiled / MANIFEST).read_text())
        current = fingerprint(root)
    except (OSError, ValueError):
        return list(path)
    return [str(compiled), *path] if built == current else list(path)


def active() -> bool:
    """Whether this process runs the compiled modules."""
    from gateway import record_builder, redaction  # here: once the package has chosen its path

    return all(not (module.__file__ or "").endswith(".py") for module in (redaction, record_builder))


def source(module: str) -> str:
    return module.replace(".", "/") + ".py"
