"""A local, ordered, append-only spool of JSON lines, for what cannot reach Redis yet.

Each gateway process owns one folder per spool (held with an exclusive `flock`, so several
processes on one host never share one); a folder whose owner is gone (it crashed) is adopted by the
next process that opens the spool, and replayed. Items are written in segments of JSON lines:

- `append` writes items in order; with `fsync` (feedback) it returns only once they are on disk,
  and appends made at the same time share one fsync (group commit);
- with `max_items` (completion records) the oldest segments are dropped when the bound is passed,
  and the callback counts what was dropped;
- `drain` hands every segment, oldest first, to a handler, and removes it only once the handler
  returned: an item may be handed over twice (after a crash), never lost, so handlers are idempotent.

All file work happens in a worker thread, never in the event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from adapters.staging import fsync_path

log = logging.getLogger("loragate.spool")

SEGMENT_ITEMS = 1000
ORPHAN_AGE_S = 5.0
"""A folder being made (NEW_PREFIX) this new may be one whose owner has not locked it yet: left alone."""
NEW_PREFIX = ".new-"
"""A folder's name until its owner holds its lock."""
OPEN_TRIES = 3


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        fsync: bool,
        max_items: int | None = None,
        on_drop: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._root = root
        self._fsync = fsync
        self._max_items = max_items
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._folder: Path | None = None
        self._lock_fd: int | None = None
        self._adopted: dict[Path, int] = {}
        """Folders of stopped processes taken over, and the lock held on each."""
        self._segments: dict[Path, int] = {}
        """Closed segments and their item counts, oldest first."""
        self._current: Path | None = None
        self._current_count = 0
        self._waiting: list[tuple[list[dict[str, Any]], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    # -- opening and adopting ------------------------------------------------------------------

    def open(self) -> None:
        """Take a folder of our own (locked for as long as this process lives)."""
        _make_folders(self._root, durable=self._fsync)
        for attempt in range(OPEN_TRIES):
            try:
                self._folder, self._lock_fd = self._new_folder()
                break
            except (FileNotFoundError, BlockingIOError):  # taken for an orphan's while it waited over ORPHAN_AGE_S
                if attempt == OPEN_TRIES - 1:
                    raise
        with self._lock:
            self._adopt_orphans()

    def _new_folder(self) -> tuple[Path, int]:
        """A folder that gets its name only once locked (an adopter never sees it unlocked), the name on disk
        (with fsync) before anything acknowledged is in it."""
        name = uuid.uuid4().hex[:12]
        fresh = self._root / f"{NEW_PREFIX}{name}"
        fresh.mkdir()
        fd = os.open(fresh / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(fresh, self._root / name)
            if self._fsync:
                fsync_path(self._root)
        except OSError:
            os.close(fd)
            raise
        return self._root / name, fd

    def _adopt_orphans(self) -> None:
        """Take over the segments of folders whose owner is gone."""
        for other in sorted(self._root.iterdir()):
            if other == self._folder or other in self._adopted or not other.is_dir():
                continue
            fd = _lock_orphan(other)
            if fd is None:
                continue
            segments = sorted(other.glob("*.jsonl"))
            if not segments:
                _remove_folder(other)
                os.close(fd)
                continue
            self._adopted[other] = fd
            adopted = {segment: _count(segment) for segment in segments}
            self._segments = _in_order({**self._segments, **adopted})
            log.info("adopted %d spooled items of a stopped process", sum(adopted.values()))

    def close(self) -> None:
        for fd in [self._lock_fd, *self._adopted.values()]:
            if fd is not None:
                os.close(fd)
        self._lock_fd, self._adopted = None, {}

    async def adopt(self) -> None:
        """Look again for folders of processes that have stopped (their items become this spool's)."""
        await asyncio.to_thread(self._adopt_locked)

    def _adopt_locked(self) -> None:
        with self._lock:
            self._adopt_orphans()

    def pending(self) -> int:
        return sum(self._segments.values()) + self._current_count

    # -- writing -------------------------------------------------------------------------------

    async def append(self, items: list[dict[str, Any]]) -> None:
        """Write `items` after everything appended before; with fsync, return once they are on disk."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        await asyncio.shield(future)

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:  # encoded in the thread too: a batch of large records took the event loop 0.2 s
                await asyncio.to_thread(self._write_items, [item for items, _ in batch for item in items])
            except Exception as exc:  # noqa: BLE001 (every waiter learns it was not written)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write_items(self, items: list[dict[str, Any]]) -> None:
        self._write([json.dumps(item, separators=(",", ":")) + "\n" for item in items])

    def _write(self, lines: list[str]) -> None:
        assert self._folder is not None, "Spool.open() first"
        with self._lock:
            if self._current is None:
                self._current, self._current_count = self._new_segment(self._folder), 0
            fd = os.open(self._current, os.O_WRONLY | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                try:
                    _write_all(fd, "".join(lines).encode())
                    if self._fsync:
                        os.fsync(fd)
                except OSError:
                    self._set_aside(fd, size)
                    raise
            finally:
                os.close(fd)
            self._current_count += len(lines)
            if self._current_count >= SEGMENT_ITEMS:
                self._close_current()
            self._enforce_bound()

    def _new_segment(self, folder: Path) -> Path:
        """An empty segment whose name is on disk (with fsync) before anything is written to it; none when the
        folder's fsync fails (the next append tries again with a new one)."""
        segment = folder / f"{time.time_ns():020d}.jsonl"
        os.close(os.open(segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        if self._fsync:
            try:
                fsync_path(folder)
            except OSError:
                segment.unlink(missing_ok=True)
                raise
        return segment

    def _set_aside(self, fd: int, size: int) -> None:
        """After a failed append (a full disk): its partial line cut off, where the file system lets us, and the
        segment closed, so that no later append, acknowledged, is glued onto a line that could not be cut (a
        damaged line is skipped when read)."""
        try:
            os.ftruncate(fd, size)
        except OSError:
            log.warning("a failed spool append could not be cut off %s; its segment is closed", self._current)
        if self._current is not None and not self._current_count:
            self._current.unlink(missing_ok=True)
        self._close_current()

    def _close_current(self) -> None:
        if self._current is not None and self._current_count:
            self._segments = _in_order({**self._segments, self._current: self._current_count})  # after adopted newer
        self._current, self._current_count = None, 0

    def _enforce_bound(self) -> None:
        if self._max_items is None:
            return
        while self._segments and self.pending() > self._max_items:
            oldest = next(iter(self._segments))
            dropped = self._segments.pop(oldest)
            oldest.unlink(missing_ok=True)
            log.warning("spool full: dropped %d oldest items", dropped)
            self._on_drop(dropped)

    # -- replaying -----------------------------------------------------------------------------

    async def drain(self, handler: Callable[[list[dict[str, Any]]], Awaitable[None]]) -> int:
        """Hand the segments spooled before this call, oldest first, to `handler`; a segment is removed once
        handled. What is appended meanwhile, by the handler too (feedback put back to wait), and what is being
        written when closed segments wait, are left for the next drain: drain until `pending()` is 0 to empty
        the spool. Stops (keeping the rest) at the first handler error, which is raised. Returns the items
        handled."""
        handled = 0
        for segment in await asyncio.to_thread(self._sealed):
            if segment not in self._segments:  # dropped meanwhile, past the bound
                continue
            items = await asyncio.to_thread(_read, segment)
            await handler(items)
            await asyncio.to_thread(self._forget, segment)
            handled += len(items)
        return handled

    def _sealed(self) -> list[Path]:
        """What a drain hands over, oldest first: the closed segments, and the one being written, closed, when there
        are none or it is older than one of them (adopted since it was begun); not at every drain: while Redis is away
        that would make a file per retry."""
        with self._lock:
            self._adopt_orphans()
            newest = next(reversed(self._segments), None)
            if newest is None or (self._current is not None and self._current.name < newest.name):
                self._close_current()
            return list(self._segments)

    def _forget(self, segment: Path) -> None:
        with self._lock:
            self._segments.pop(segment, None)
            segment.unlink(missing_ok=True)
            folder = segment.parent
            if folder in self._adopted and not any(s.parent == folder for s in self._segments):
                _remove_folder(folder)
                os.close(self._adopted.pop(folder))


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _make_folders(root: Path, *, durable: bool) -> None:
    """`root` and its missing parents; with `durable`, each new one's name is on disk (its parent fsynced)."""
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]
    root.mkdir(parents=True, exist_ok=True)
    if durable:
        for folder in reversed(missing):  # from the top
            fsync_path(folder.parent)


def _lock_orphan(folder: Path) -> int | None:
    """A lock on `folder` when its owner is gone; None while its owner lives, while it is being made or removed."""
    try:
        being_made = folder.name.startswith(NEW_PREFIX)
        if being_made and time.time() - folder.stat().st_mtime < ORPHAN_AGE_S:
            return None  # its owner may not have locked it yet
        # A named folder always has its lock: it is not re-created in one another process removes (all replayed),
        # only where spooled items would be left without one.
        create = os.O_CREAT if being_made or any(folder.glob("*.jsonl")) else 0
        fd = os.open(folder / "lock", create | os.O_RDWR, 0o600)
    except FileNotFoundError:
        _remove_folder(folder)  # being removed by the process that replayed it, or left empty by a crash
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # its owner is alive
    return fd


def _in_order(segments: dict[Path, int]) -> dict[Path, int]:
    """Segments in the order they were written, whichever folder holds them (their names are the time they were
    made, in ns): adopted ones among this spool's own, so that a replay keeps the order and the bound drops the
    oldest."""
    return dict(sorted(segments.items(), key=lambda segment: segment[0].name))


def _count(segment: Path) -> int:
    with open(segment, "rb") as lines:
        return sum(1 for _ in lines)


def _read(segment: Path) -> list[dict[str, Any]]:
    """The items of a segment; a last line cut short by a crash (never acknowledged), or a line damaged on disk (bytes
    that are not UTF-8 too: each line is decoded on its own), is skipped."""
    items = []
    with open(segment, "rb") as lines:
        for line in lines:
            try:
                items.append(json.loads(line))
            except ValueError:  # UnicodeDecodeError is one
                log.warning("skipped a damaged spool line in %s", segment.name)
    return items


def _remove_folder(folder: Path) -> None:
    """Remove the folder and what is left in it; one another process removes too, or that is not empty (spooled
    items whose lock was lost), stays."""
    try:
        if any(folder.glob("*.jsonl")):
            return
        for leftover in folder.iterdir():
            leftover.unlink(missing_ok=True)
        folder.rmdir()
    except FileNotFoundError:
        pass  # removed by another process meanwhile
    except OSError as exc:
        log.warning("spool folder %s not removed: %s", folder.name, exc)
