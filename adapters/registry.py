"""The registry as the request path sees it: name -> adapter version, in microseconds.

Resolutions are cached per adapter name and invalidated by the name folder's mtime, which every
add, remove and pin changes (they rename entries in it), so other processes' writes show at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from adapters.manifest import AdapterRef, Manifest
from adapters.store import AdapterNotFound, AdapterStore, IntegrityError


@dataclass
class _Entry:
    mtime_ns: int
    resolved: dict[int | None, Manifest] = field(default_factory=dict)


class Registry:
    def __init__(self, store: AdapterStore) -> None:
        self.store = store
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
            entry = self._cache[name] = _Entry(mtime)
        return entry

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
        return self.store.version_dir(manifest.name, manifest.version)

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
