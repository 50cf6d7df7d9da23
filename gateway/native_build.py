"""`python -m gateway.native_build`: compile the record path (`gateway.native`) with mypyc into `.native/`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.native import GROUP, MANIFEST, MODULES, NATIVE, OFF, ROOT, fingerprint, package_path, source


def build(root: Path = ROOT) -> Path:
    """Compile MODULES with mypyc into `root`/.native (replaced whole once the new build is complete)."""
    from mypyc.build import mypycify  # a build tool: only here
    from setuptools import Distribution

    target, built_from = root / NATIVE, fingerprint(root)  # before: an edit made meanwhile makes the build stale
    with tempfile.TemporaryDirectory(dir=root, prefix=".native-") as scratch:
        work = Path(scratch)
        cwd = Path.cwd()
        os.chdir(root)  # mypyc names modules by their paths from here
        try:
            extensions = mypycify([source(m) for m in MODULES], group_name=GROUP, target_dir=str(work / "c"))
            command = Distribution({"name": "loragate-native", "ext_modules": extensions}).get_command_obj("build_ext")
            command.build_lib, command.build_temp = str(work / "lib"), str(work / "obj")  # type: ignore[attr-defined]
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(cwd)
        (work / "lib" / "gateway" / MANIFEST).write_text(json.dumps(built_from, indent=1))
        if target.exists():  # moved aside, then replaced: a process starting meanwhile finds a whole build or none
            target.rename(work / "old")
        (work / "lib").rename(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Build, unless the build in place matches the sources (`--force`: build anyway)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get(OFF) == "0":
        print(f"==> {OFF}=0: the record path runs as Python, nothing compiled")
        return 0
    if "--force" not in args and len(package_path([], ROOT, {})) == 1:
        print(f"==> {', '.join(MODULES)}: compiled build in {NATIVE}/ is up to date")
        return 0
    print(f"==> compiling {', '.join(MODULES)} with mypyc into {NATIVE}/ (about 30 s)", flush=True)
    started = time.perf_counter()
    build()
    print(f"==> compiled in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
