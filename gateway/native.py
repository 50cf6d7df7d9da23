"""The record path compiled: `gateway.answer`, `gateway.redaction` and `gateway.record_builder` built with mypyc into
`.native/`.

The record process spends its time in these modules (parsing an answer, walking a record, redacting each string,
encoding it); a gateway process absorbs each stream event with `gateway.answer`. mypyc compiles them, as they are, to
C extensions: the same code and the same records, in about a quarter less time (building them in one process). `make
setup` builds them (`python -m gateway.native_build`: half a minute with gcc and Python's headers) into
`.native/gateway/`, with a manifest of what they were built from. The `gateway` package puts that folder first on its
search path only while the build is whole and its manifest matches this Python and the sources (every module of
`gateway` and `adapters`: the compiled ones were compiled against the others' types), so an edited module is never
shadowed by a build of older code: after an edit the record path runs as Python until the next build.
`LORAGATE_NATIVE=0` turns the compiled modules off (a process started with it runs the Python ones); without a build,
or where it failed, everything runs as Python.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

MODULES = ("gateway.answer", "gateway.redaction", "gateway.redaction_memory", "gateway.record_builder")
"""Compiled, in one extension group (calls between them stay native)."""
GROUP = "gateway.native_records"
ROOT = Path(__file__).resolve().parent.parent
NATIVE = ".native"
MANIFEST = "manifest.json"
OFF = "LORAGATE_NATIVE"
PACKAGES = ("gateway", "adapters")
"""Whose sources a build was compiled against (mypy follows the compiled modules' imports into both)."""


def package_sources(root: Path = ROOT) -> list[Path]:
    """Every module of PACKAGES under `root`, in one order: what a build is compiled against."""
    return sorted(path for package in PACKAGES for path in (root / package).rglob("*.py"))


def fingerprint(root: Path = ROOT) -> dict[str, str]:
    """What a build is valid for: this Python's ABI and one digest of every module of PACKAGES (about 3 ms)."""
    digest = hashlib.sha256()
    for path in package_sources(root):
        digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return {"python": sys.implementation.cache_tag, "sources": digest.hexdigest()}


def usable(root: Path = ROOT) -> bool:
    """Whether `root`'s build is whole (each extension there) and was built from the sources as they are now."""
    compiled = root / NATIVE / "gateway"
    names = [module.rsplit(".", 1)[1] for module in MODULES] + [GROUP.rsplit(".", 1)[1] + "__mypyc"]
    if not all((compiled / f"{name}{EXTENSION_SUFFIXES[0]}").is_file() for name in names):
        return False
    try:
        return bool(json.loads((compiled / MANIFEST).read_text()) == fingerprint(root))
    except (OSError, ValueError):
        return False


def package_path(path: Sequence[str], root: Path = ROOT, env: Mapping[str, str] = os.environ) -> list[str]:
    """The `gateway` package's search path: the compiled modules' folder first when their build is `usable` (and
    not turned off), otherwise the path as it was."""
    if env.get(OFF) != "0" and usable(root):
        return [str(root / NATIVE / "gateway"), *path]
    return list(path)


def active() -> bool:
    """Whether this process runs the compiled modules (each loaded from its extension)."""
    compiled = tuple(EXTENSION_SUFFIXES)  # imported here: once the package has chosen its path
    return all((importlib.import_module(module).__file__ or "").endswith(compiled) for module in MODULES)


def source(module: str) -> str:
    return module.replace(".", "/") + ".py"
