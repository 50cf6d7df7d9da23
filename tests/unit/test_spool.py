"""The local spool when its disk fills: an append that fails is refused whole, and no later append, once
acknowledged, is lost to the line the failed one left behind."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway import spool as spool_module
from gateway.spool import Spool


async def drained(spool: Spool) -> list[dict[str, Any]]:
    """Everything the spool holds, replayed until it is empty."""
    replayed: list[dict[str, Any]] = []

    async def take(items: list[dict[str, Any]]) -> None:
        replayed.extend(items)

    while spool.pending():
        await spool.drain(take)
    return replayed


async def test_an_append_after_a_failed_one_is_kept_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)  # as the feedback spool
    spool.open()
    await spool.append([{"n": "A"}])
    segment = spool._current
    assert segment is not None
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 20, limits[1]))  # the disk fills up
    try:
        with pytest.raises(OSError):  # the caller answers 503: not acknowledged
            await spool.append([{"n": "B", "pad": "x" * 100}])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, ignored)
    await spool.append([{"n": "C"}])  # room again: acknowledged
    replayed = await drained(spool)
    assert replayed == [{"n": "A"}, {"n": "C"}]
    spool.close()


def test_a_folder_removed_while_it_is_looked_at_does_not_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process adopted a stopped one's folder, replayed it and removes it just as this one starts and looks
    at it: the folder is skipped (before, FileNotFoundError ended the gateway's start)."""
    orphan = tmp_path / "0123456789ab"
    orphan.mkdir()
    os.utime(orphan, (0, 0))  # long stopped
    real = os.open

    def removed_meanwhile(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path).parent == orphan:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", removed_meanwhile)
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    assert not spool.pending()
    spool.close()


def test_a_new_spool_folder_and_its_parents_are_on_disk_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(spool_module, "fsync_path", synced.append)
    spool = Spool(tmp_path / "data" / "feedback", fsync=True)
    spool.open()
    assert synced == [tmp_path, tmp_path / "data", tmp_path / "data" / "feedback"]
    assert [folder.name for folder in (tmp_path / "data" / "feedback").iterdir()] == [spool._folder.name]  # type: ignore[union-attr]
    spool.close()


async def test_a_folder_fsync_that_fails_leaves_no_segment_and_the_next_append_syncs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, fsync=True)
    spool.open()
    synced: list[Path] = []

    def fails_once(folder: Path) -> None:
        synced.append(folder)
        if len(synced) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "fsync_path", fails_once)
    with pytest.raises(OSError):  # not acknowledged
        await spool.append([{"n": "A"}])
    await spool.append([{"n": "B"}])
    assert len(synced) == 2, "the new segment's name was synced, not taken for on disk"
    replayed = await drained(spool)
    assert replayed == [{"n": "B"}]
    spool.close()


async def test_a_folder_is_locked_before_an_adopter_can_take_it_for_an_orphans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner is held up between making its folder and locking it for over ORPHAN_AGE_S, and another process
    looks then: the owner still ends with a folder of its own that takes appends."""
    monkeypatch.setattr(spool_module, "ORPHAN_AGE_S", -1.0)
    adopter = Spool(tmp_path, fsync=False)
    real = fcntl.flock
    held_up = []

    def slow(fd: int, operation: int) -> None:
        if not held_up:
            held_up.append(fd)
            adopter._adopt_orphans()
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", slow)
    owner = Spool(tmp_path, fsync=False)
    owner.open()
    await owner.append([{"n": "A"}])
    replayed = await drained(owner)
    assert replayed == [{"n": "A"}]
    owner.close()
    adopter.close()


def test_no_lock_is_made_again_in_a_folder_another_process_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process looks at a replayed folder while its adopter removes it: neither fails, the folder goes."""
    monkeypatch.setattr(spool_module, "ORPHAN_AGE_S", -1.0)  # however long the removal takes
    replayed = tmp_path / "0123456789ab"
    replayed.mkdir()
    (replayed / "lock").touch()
    other = Spool(tmp_path, fsync=False)
    real = os.rmdir
    looked = []

    def looks_first(path: Any, *args: Any, **kwargs: Any) -> None:
        if not looked:
            looked.append(path)
            other._adopt_orphans()
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", looks_first)
    spool_module._remove_folder(replayed)
    assert looked and not replayed.exists()
    other.close()


async def test_items_are_encoded_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """During an outage every batch of records is spooled: 500 large ones took the event loop 0.2 s to encode."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    threads = []
    real = json.dumps

    def dumps(*args: Any, **kwargs: Any) -> str:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module.json, "dumps", dumps)
    await spool.append([{"n": 1}, {"n": 2}])
    assert len(threads) == 2 and threading.main_thread() not in threads
    spool.close()


async def test_a_line_damaged_on_disk_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (a torn multi-byte tail, a flipped bit) cost their own line only: replay goes on."""
    spool = Spool(tmp_path, fsync=True)
    spool.open()
    await spool.append([{"n": "A"}])
    segment = spool._current
    assert segment is not None
    with open(segment, "ab") as damaged:
        damaged.write(b'{"n": "\xff\xc3"}\n')
    await spool.append([{"n": "B"}])
    assert await drained(spool) == [{"n": "A"}, {"n": "B"}]
    spool.close()


async def test_adopted_segments_are_replayed_in_the_order_they_were_written(tmp_path: Path) -> None:
    """Two stopped processes' spools, their segments written in turns, and the adopter's own, begun before theirs and
    still open: one order, by time."""
    heir = Spool(tmp_path, fsync=False)
    heir.open()
    await heir.append([{"n": "own"}])
    stopped = [Spool(tmp_path, fsync=False) for _ in range(2)]
    for spool in stopped:
        spool.open()
    for n in range(4):
        spool = stopped[n % 2]
        await spool.append([{"n": n}])
        spool._close_current()
    for spool in stopped:
        spool.close()  # their processes died
    await heir.adopt()
    assert heir.pending() == 5
    assert [item["n"] for item in await drained(heir)] == ["own", 0, 1, 2, 3]
    await heir.append([{"n": "after"}])
    assert [item["n"] for item in await drained(heir)] == ["after"]
    heir.close()
