"""`python -m gateway.native_build`: compile the record path (`gateway.native`) with mypyc into `.native/`."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.native import GROUP, MANIFEST, MODULES, NATIVE, OFF, ROOT, fingerprint, package_sources, source, usable

LOCK = ".native.lock"


def build(root: Path = ROOT, config: Path | None = None) -> Path:
    """Compile MODULES with mypyc (type-checked with mypy's `config`) into `root`/.native, replaced whole once the
    new build is complete: a process starting meanwhile finds the old build, none, or the new one."""
    from mypyc.build import mypycify  # a build tool: only here
    from setuptools import Distribution

    target, built_from = root / NATIVE, fingerprint(root)  # before: an edit made meanwhile makes the build stale
    options = ["--config-file", str(config)] if config is not None else []
    with tempfile.TemporaryDirectory(dir=root, prefix=".native-") as scratch:
        work = Path(scratch)
        _copy_sources(root, work / "src")
        cwd = Path.cwd()
        os.chdir(work / "src")  # mypyc names modules by their paths from here
        try:
            paths = [*options, *(source(m) for m in MODULES)]
            extensions = mypycify(paths, group_name=GROUP, target_dir=str(work / "c"))
            command = Distribution({"name": "loragate-native", "ext_modules": extensions}).get_command_obj("build_ext")
            command.build_lib, command.build_temp = str(work / "lib"), str(work / "obj")  # type: ignore[attr-defined]
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(cwd)
        (work / "lib" / "gateway" / MANIFEST).write_text(json.dumps(built_from, indent=1))
        if target.exists():
            target.rename(work / "old")
        (work / "lib").rename(target)
    return target


def _copy_sources(root: Path, into: Path) -> None:
    """The modules the build is compiled against (`package_sources`), copied apart for mypy: where they are installed
    (site-packages, in the gateway image), mypy would take each top-level module beside them (`typing_extensions.py`,
    `mypy_extensions.py`) for one of the build's own, and refuse it for shadowing the library it is."""
    for path in package_sources(root):
        target = into / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def main(argv: Sequence[str] | None = None) -> int:
    """Build, unless the build in place is usable (`--force`: build anyway); one build at a time (a lock file)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.native_build", description=__doc__)
    parser.add_argument("--force", action="store_true", help="Build even if the build in place is usable.")
    default = ROOT / "pyproject.toml"
    parser.add_argument(
        "--config-file", type=Path, default=default if default.is_file() else None, help="mypy's configuration."
    )
    args = parser.parse_args(argv)
    if os.environ.get(OFF) == "0":
        print(f"==> {OFF}=0: the record path runs as Python, nothing compiled")
        return 0
    with open(ROOT / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build waits, then finds the first one's
        if not args.force and usable():
            print(f"==> {', '.join(MODULES)}: compiled build in {NATIVE}/ is up to date")
            return 0
        print(f"==> compiling {', '.join(MODULES)} with mypyc into {NATIVE}/ (about 30 s)", flush=True)
        started = time.perf_counter()
        build(ROOT, args.config_file)
    print(f"==> compiled in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
