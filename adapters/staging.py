"""Writing files and folders so that they appear whole or not at all (build beside, then one rename), and, where
said, stay after a crash of the machine (fsynced, with the folder that names them)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty scratch folder next to `target`; if the block succeeds it replaces `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a file created, renamed or removed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    path.write_text(text)
    fsync_path(path)


def replace_durably(path: Path, text: str) -> None:
    """Replace a (read-only) file's content atomically and durably: written aside (under a fresh name, removed if
    this fails), fsynced, renamed over it, and the rename fsynced. A crash leaves the old content or the new, never
    a torn or empty file."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    scratch = Path(name)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        scratch.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
