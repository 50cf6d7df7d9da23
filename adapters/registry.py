"""The registry as the request path sees it: (tenant, name, version) -> adapter version, in microseconds.

Each tenant has its own store, `ROOT/TENANT/`. Resolutions are cached per (tenant, adapter name) and
invalidated by the name folder's mtime, which every add and remove changes (they rename entries in
it). The request path (`lookup`) never touches the filesystem in the event loop: it answers from
the cache while the cache was checked within `recheck_s`, and otherwise checks in a worker thread;
so other processes' writes show within `recheck_s`, and this process's own writes (`invalidate`) at once.

In vLLM an adapter version is loaded as `TENANT.NAME@V` (`upstream_name`): tenant names have no
'.', so two tenants' adapters of the same name never collide there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest
from adapters.store import AdapterNotFound, AdapterStore, IntegrityError

log = logging.getLogger("loragate")


@dataclass
class _Entry:
    mtime_ns: int
    checked: float
    """time.monotonic() of the last stat that found the folder unchanged."""
    resolved: dict[tuple[int | None, int | None], Manifest] = field(default_factory=dict)
    """By (exact version, pinned version): `name@4` and `name` pinned to 4 are kept apart (a pin may name a version
    the bare name cannot serve, and resolve to another)."""
    published: list[Manifest] | None = None
    """Its published versions, oldest first, for `listing`: read once per change of the folder."""


@dataclass
class _Listing:
    pins: dict[str, int]
    entries: list[tuple[str, Manifest]]
    checked: float


_MAX_LISTINGS = 4096
"""Tenants whose listing is kept; past it the cache starts again (each entry is rebuilt on its next call)."""


def _same(old: list[tuple[str, Manifest]], new: list[tuple[str, Manifest]]) -> bool:
    """The same names resolving to the same (cached, immutable) manifests."""
    return len(old) == len(new) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(old, new, strict=True))


def upstream_name(tenant: str, manifest: Manifest) -> str:
    """The name vLLM knows an adapter version by: unique across tenants, immutable, path-safe."""
    return f"{tenant}.{manifest.ref}"


def parse_upstream_name(name: str) -> tuple[str, AdapterRef]:
    """(tenant, name@V) of an upstream name; InvalidAdapter if it is not one."""
    tenant, dot, ref = name.partition(".")
    if not dot or not tenant:
        raise InvalidAdapter(f"{name!r} is not an upstream adapter name")
    return tenant, AdapterRef.parse(ref)


class Registry:
    def __init__(self, root: Path, recheck_s: float = 0.25) -> None:
        self.root = root
        self.recheck_s = recheck_s
        self._root = root.absolute()
        self._stores: dict[str, AdapterStore] = {}
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._verified: dict[tuple[str, str, int], _Stamp] = {}
        """Versions whose files matched their sha256, with what their files looked like then."""
        self._newest: dict[tuple[str, str], int] = {}
        """The newest version of each (tenant, adapter name) this process has found in the store: a version
        up to it that is gone was deleted (numbers are never reused); one past it may be another store's."""
        self._corrupt: dict[tuple[str, str, int], tuple[_Stamp, str]] = {}
        self._paths: dict[tuple[str, str, int], str] = {}
        self._listings: dict[str, _Listing] = {}

    def store(self, tenant: str) -> AdapterStore:
        """The tenant's own store (the tenant name must have been checked: it becomes a folder)."""
        store = self._stores.get(tenant)
        if store is None:
            store = self._stores[tenant] = AdapterStore(self.root / tenant, tenant)
        return store

    def tenants(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _entry(self, tenant: str, name: str) -> _Entry:
        try:
            mtime = os.stat(self.root / tenant / name).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop((tenant, name), None)
            raise AdapterNotFound(name) from None
        entry = self._cache.get((tenant, name))
        if entry is None or entry.mtime_ns != mtime:
            entry = self._cache[(tenant, name)] = _Entry(mtime, time.monotonic())
        else:
            entry.checked = time.monotonic()
        return entry

    def resolve(self, tenant: str, ref: AdapterRef, pinned: int | None = None) -> Manifest:
        """`name@V` exactly; `name` is its `pinned` version (if it still exists), else its latest."""
        entry = self._entry(tenant, ref.name)
        key = _key(ref, pinned)
        manifest = entry.resolved.get(key)
        if manifest is None:
            manifest = self.store(tenant).resolve(AdapterRef(ref.name, ref.version), pinned)
            entry.resolved[key] = manifest
            if manifest.version > self._newest.get((tenant, ref.name), 0):
                self._newest[(tenant, ref.name)] = manifest.version
        return manifest

    async def lookup(self, tenant: str, ref: AdapterRef, pinned: int | None = None) -> Manifest:
        """`resolve` for the event loop: from memory when checked lately, else in a worker thread."""
        entry = self._cache.get((tenant, ref.name))
        if entry is not None and time.monotonic() - entry.checked < self.recheck_s:
            manifest = entry.resolved.get(_key(ref, pinned))
            if manifest is not None:
                return manifest
        return await asyncio.to_thread(self.resolve, tenant, ref, pinned)

    def invalidate(self, tenant: str, name: str) -> None:
        """This process changed an adapter (added or removed a version): look again next time."""
        self._cache.pop((tenant, name), None)
        self._listings.pop(tenant, None)

    def forget(self, upstream: str) -> None:
        """A version deleted from the store (`TENANT.NAME@V`): drop what this process kept about it, so
        that uploading and deleting versions all day costs no memory. `deleted` still knows it."""
        try:
            tenant, ref = parse_upstream_name(upstream)
        except InvalidAdapter:
            return
        key = (tenant, ref.name, ref.version or 0)
        self._verified.pop(key, None)
        self._corrupt.pop(key, None)
        self._paths.pop(key, None)

    def deleted(self, upstream: str) -> bool:
        """Whether an upstream name is gone from the store: a version this process found, or one the store has
        numbered (its counter outlives deletions; read from disk: call it off the event loop). A version newer
        than both is not taken for deleted: another gateway with a store this one cannot see (yet) may serve it."""
        try:
            tenant, ref = parse_upstream_name(upstream)
            newest = max(self._newest.get((tenant, ref.name), 0), self.store(tenant).last_version(ref.name))
        except (InvalidAdapter, OSError):
            return False
        return ref.version is not None and ref.version <= newest and not self.exists(upstream)

    def exists(self, upstream: str) -> bool:
        """Whether an upstream name (`TENANT.NAME@V`) is still in the store."""
        try:
            tenant, ref = parse_upstream_name(upstream)
            self.resolve(tenant, ref)
        except (AdapterNotFound, ValueError):
            return False
        return True

    def path(self, manifest: Manifest) -> Path:
        """The version's folder, without touching the disk (names were checked when it was stored)."""
        assert manifest.tenant is not None
        return self._root / manifest.tenant / manifest.name / f"v{manifest.version}"

    def path_text(self, manifest: Manifest) -> str:
        """`path` as a string, remembered per version (routing asks for it on every request)."""
        key = (manifest.tenant or "", manifest.name, manifest.version)
        found = self._paths.get(key)
        if found is None:
            found = self._paths[key] = str(self.path(manifest))
        return found

    def verify_once(self, manifest: Manifest) -> None:
        """sha256 of every file against the manifest (blocking: call it off the event loop). Versions are
        immutable, so a version is hashed again only when one of its files changed on disk since (size, time
        or inode: replaced or written to), and one that failed keeps failing, without hashing, until then."""
        assert manifest.tenant is not None
        key = (manifest.tenant, manifest.name, manifest.version)
        stamp = _stamp(self.path(manifest), manifest)
        if self._verified.get(key) == stamp:
            return
        corrupt = self._corrupt.get(key)
        if corrupt is not None and corrupt[0] == stamp:
            raise IntegrityError(corrupt[1])
        self._verified.pop(key, None)
        try:
            self.store(manifest.tenant).verify(manifest)
        except IntegrityError as exc:
            self._corrupt[key] = (stamp, str(exc))
            raise
        self._corrupt.pop(key, None)
        self._verified[key] = stamp

    def listing(self, tenant: str, pins: dict[str, int]) -> list[tuple[str, Manifest]]:
        """Every name of the tenant's own adapters a client can use: each bare name (its default
        version) and every published name@V (unpublished candidates are not listed).

        One scan of the tenant's folder and one stat per name: a name's manifests are read again only when
        its folder changed (as for `resolve`), not on every call (`GET /v1/models` asks on every request)."""
        out: list[tuple[str, Manifest]] = []
        for name in self._names(tenant):
            try:
                out.append((name, self.resolve(tenant, AdapterRef(name), pins.get(name))))
            except AdapterNotFound:
                continue
            entry = self._cache.get((tenant, name))
            published = entry.published if entry is not None else None
            if published is None:
                published = self._published(tenant, name)
                if entry is not None:
                    entry.published = published
            out.extend((manifest.ref, manifest) for manifest in published)
        return out

    async def listed(self, tenant: str, pins: dict[str, int]) -> list[tuple[str, Manifest]]:
        """`listing` for the event loop, checked on disk at most every `recheck_s` (in a worker thread).
        While nothing changed it returns the very same list, so callers can cache what they derive
        from it by identity (`GET /v1/models` keeps its answer until the list changes)."""
        cached = self._listings.get(tenant)
        now = time.monotonic()
        if cached is not None and cached.pins == pins and now - cached.checked < self.recheck_s:
            return cached.entries
        entries = await asyncio.to_thread(self.listing, tenant, pins)
        if cached is not None and cached.pins == pins and _same(cached.entries, entries):
            cached.checked = now
            return cached.entries
        if len(self._listings) >= _MAX_LISTINGS and tenant not in self._listings:
            self._listings.clear()
        self._listings[tenant] = _Listing(dict(pins), entries, now)
        return entries

    def _names(self, tenant: str) -> list[str]:
        try:
            with os.scandir(self.root / tenant) as entries:
                return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _published(self, tenant: str, name: str) -> list[Manifest]:
        store, out = self.store(tenant), []
        for version in store.versions(name):
            try:
                manifest = store.manifest(name, version)
            except AdapterNotFound:
                continue  # deleted while we listed
            if manifest.listed:
                out.append(manifest)
        return out

    def sweep(self, older_than_s: float) -> list[str]:
        """`AdapterStore.sweep` of every tenant's store: what it removed, each as `TENANT/...`; a store that fails
        (a disk error, a folder of a name no tenant can have) is logged and the others are swept."""
        swept: list[str] = []
        for tenant in self.tenants():
            try:
                swept += [f"{tenant}/{left}" for left in self.store(tenant).sweep(older_than_s)]
            except (OSError, ValueError) as exc:
                log.warning("sweeping the adapters of %s failed: %r", tenant, exc)
        return swept

    def remove_tenant(self, tenant: str) -> list[str]:
        """Delete every adapter version of a deleted tenant; return their upstream names (to unload).

        Each name's version counter stays, so a tenant later created with the same name numbers its
        versions on from there: an upstream name is never reused, and no vLLM replica can serve an
        old tenant's weights under a new tenant's name."""
        store = self.store(tenant)
        removed = []
        for manifest in store.list():
            with contextlib.suppress(AdapterNotFound):  # removed meanwhile (an upload undone as its tenant went)
                store.remove(manifest.name, manifest.version)
            removed.append(upstream_name(tenant, manifest))  # unloaded all the same: vLLM may hold it
            self.forget(removed[-1])
        for ref in store.discard_unreadable():  # a damaged manifest: its weights go too (vLLM may hold them)
            removed.append(f"{tenant}.{ref}")
            self.forget(removed[-1])
        for key in [key for key in list(self._cache) if key[0] == tenant]:
            self._cache.pop(key, None)
        return removed


_Stamp = tuple[tuple[str, int, int, int], ...]
"""Each file of a version as (name, size, mtime_ns, inode); a missing file as (name, -1, 0, 0)."""


def _stamp(folder: Path, manifest: Manifest) -> _Stamp:
    stamps = []
    for filename in sorted(manifest.files):
        try:
            info = (folder / filename).stat()
        except OSError:
            stamps.append((filename, -1, 0, 0))
            continue
        stamps.append((filename, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(stamps)


def _key(ref: AdapterRef, pinned: int | None) -> tuple[int | None, int | None]:
    return (ref.version, None) if ref.version else (None, pinned)
