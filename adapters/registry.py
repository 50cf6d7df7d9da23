"""The registry as the request path sees it: name -> adapter version, in microseconds.

Resolutions are cached per adapter name and invalidated by the name folder's mtime, which every
add, remove and pin changes (they rename entries in it). The request path (`lookup`) never touches
the filesystem in the event loop: it answers from the cache while the cache was checked within
`recheck_s`, and otherwise checks in a worker thread; so other processes' writes show within
`recheck_s`, and this process's own writes (`invalidate`) at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters.manifest import AdapterRef, Manifest
from adapters.store import AdapterNotFound, AdapterStore, IntegrityError


@dataclass
class _Entry:
    mtime_ns: int
    checked: float
    """time.monotonic() of the last stat that found the folder unchanged."""
    resolved: dict[int | None, Manifest] = field(default_factory=dict)


class Registry:
    def __init__(self, store: AdapterStore, recheck_s: float = 0.25) -> None:
        self.store = store
        self.recheck_s = recheck_s
        self._root = store.root.absolute()
        self._cache: dict[str, _Entry] = {}
        self._verified: set[tuple[str, int]] = set()
        self._corrupt: dict[tuple[str, int], str] = {}

    def _entry(self, name: str) -> _Entry:
        try:
            mtime = os.stat(self.store.root / name).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(name, None)
            raise AdapterNotFound(name) from None
        entry = self._cache.get(name)
        if entry is None or entry.mtime_ns != mtime:
            entry = self._cache[name] = _Entry(mtime, time.monotonic())
        else:
            entry.checked = time.monotonic()
        return entry

    async def lookup(self, ref: AdapterRef) -> Manifest:
        """`resolve` for the event loop: from memory when checked lately, else in a worker thread."""
        entry = self._cache.get(ref.name)
        if entry is not None and time.monotonic() - entry.checked < self.recheck_s:
            manifest = entry.resolved.get(ref.version)
            if manifest is not None:
                return manifest
        return await asyncio.to_thread(self.resolve, ref)

    def invalidate(self, name: str) -> None:
        """This process changed `name` (added, removed or pinned a version): look again next time."""
        self._cache.pop(name, None)

    def resolve(self, ref: AdapterRef) -> Manifest:
        entry = self._entry(ref.name)
        manifest = entry.resolved.get(ref.version)
        if manifest is None:
            manifest = entry.resolved[ref.version] = self.store.resolve(ref)
        return manifest

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(AdapterRef.parse(ref))
        except (AdapterNotFound, ValueError):
            return False
        return True

    def path(self, manifest: Manifest) -> Path:
        """The version's folder, without touching the disk (names were checked when it was stored)."""
        return self._root / manifest.name / f"v{manifest.version}"

    def verify_once(self, manifest: Manifest) -> None:
        """sha256 of every file against the manifest; versions are immutable, so once per process,
        and a version that failed keeps failing without hashing it again for every request."""
        key = (manifest.name, manifest.version)
        if key in self._verified:
            return
        if key in self._corrupt:
            raise IntegrityError(self._corrupt[key])
        try:
            self.store.verify(manifest)
        except IntegrityError as exc:
            self._corrupt[key] = str(exc)
            raise
        self._verified.add(key)

    def listing(self) -> list[tuple[str, Manifest]]:
        """Every name a client can use: each adapter's bare name (its default version) and name@V."""
        out: list[tuple[str, Manifest]] = []
        for name in self.store.names():
            try:
                out.append((name, self.resolve(AdapterRef(name))))
            except AdapterNotFound:
                continue
            for version in self.store.versions(name):
                try:
                    manifest = self.store.manifest(name, version)
                except AdapterNotFound:
                    continue  # deleted while we listed
                out.append((manifest.ref, manifest))
        return out
