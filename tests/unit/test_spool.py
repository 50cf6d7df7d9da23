"""The local spool when its disk fills: an append that fails is refused whole, and no later append, once
acknowledged, is lost to the line the failed one left behind."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.spool import Spool


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
    replayed: list[dict[str, Any]] = []

    async def take(items: list[dict[str, Any]]) -> None:
        replayed.extend(items)

    while spool.pending():
        await spool.drain(take)
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
