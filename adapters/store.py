"""One tenant's adapters: immutable versions under `ROOT/TENANT/NAME/vN/`, each with its PEFT files
and a manifest. (The registry holds one store per tenant.)

A folder on disk (shared by the gateway, vLLM and training); writes are atomic (stage, then rename),
durable before they are acknowledged (each file and each folder they change is fsynced: a version that was
answered 201 survives a crash of the machine whole, never torn), and serialised by a lock file, so several
processes can use one store. Which version a bare name
means (a pin) is a mutable pointer, kept in Redis by the gateway, not here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapters.archive import MAX_MANIFEST_BYTES, safe_extract
from adapters.manifest import (
    ADAPTER_FILES,
    MANIFEST_FILE,
    AdapterRef,
    InvalidAdapter,
    Manifest,
    Source,
    check_name,
)
from adapters.staging import fsync_path, replace_durably, write_durably
from adapters.validate import BaseModelSpec, check_adapter

log = logging.getLogger("loragate")

COUNTER_FILE = ".last_version"
MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})
"""OSErrors reading a version's manifest that mean it is not there (a version too long to be a folder's name)."""


class AdapterNotFound(LookupError):
    def __init__(self, ref: str) -> None:
        super().__init__(f"Adapter `{ref}` does not exist.")
        self.ref = ref


class IntegrityError(RuntimeError):
    """A stored file no longer matches the sha256 in its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def largest_adapter(base: BaseModelSpec, max_rank: int) -> int:
    """The most bytes a valid adapter's files can hold: every linear module at the largest rank, in 8-byte floats,
    and a megabyte for the safetensors header and the config."""
    return max_rank * sum(out + in_ for out, in_ in base.linear_shapes.values()) * 8 + (1 << 20)


class AdapterStore:
    def __init__(self, root: Path, tenant: str | None = None) -> None:
        self.root = root
        self.tenant = tenant
        """The tenant owning every adapter here (written into their manifests)."""

    # -- paths -------------------------------------------------------------------------------
    def _name_dir(self, name: str) -> Path:
        check_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root.resolve():
            raise InvalidAdapter(f"Adapter name {name!r} escapes the store.")
        return path

    def version_dir(self, name: str, version: int) -> Path:
        return self._name_dir(name) / f"v{version}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------
    def versions(self, name: str) -> list[int]:
        folder = self._name_dir(name)
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            if entry.name.startswith("v") and entry.name[1:].isdigit() and (entry / MANIFEST_FILE).is_file():
                found.append(int(entry.name[1:]))
        return sorted(found)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name)
        )

    def manifest(self, name: str, version: int) -> Manifest:
        """AdapterNotFound for a version that is not there (MISSING), or whose manifest is empty or corrupt (logged:
        a half-written or damaged file must not make its tenant's whole listing fail); any other failure to read
        (EACCES, EIO) is the server's own and raised as it is."""
        path = self.version_dir(name, version) / MANIFEST_FILE
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except OSError as exc:
            if exc.errno not in MISSING:
                raise
            raise AdapterNotFound(f"{name}@{version}") from None
        except ValidationError as exc:
            log.warning("adapter %s/%s@%s has an unreadable manifest, skipped: %s", self.tenant, name, version, exc)
            raise AdapterNotFound(f"{name}@{version}") from None

    def resolve(self, ref: AdapterRef, pinned: int | None = None) -> Manifest:
        """`name@V` exactly (listed or not); `name` is the `pinned` version if it still exists, else its
        latest, among listed versions only (an unpublished candidate is never anyone's default)."""
        if ref.version is not None:
            return self.manifest(ref.name, ref.version)
        versions = self.versions(ref.name)
        if pinned in versions:
            versions.append(versions.pop(versions.index(pinned)))  # tried first
        for version in reversed(versions):
            try:
                found = self.manifest(ref.name, version)
            except AdapterNotFound:
                continue  # removed while we looked
            if found.listed:
                return found
        raise AdapterNotFound(str(ref))

    def list(self) -> list[Manifest]:
        """Every version whose manifest can be read: one deleted while we list, or with a corrupt manifest, is
        left out (not a failure of the whole listing)."""
        found = []
        for name in self.names():
            for version in self.versions(name):
                try:
                    found.append(self.manifest(name, version))
                except AdapterNotFound:
                    continue
        return found

    def verify(self, manifest: Manifest) -> None:
        folder = self.version_dir(manifest.name, manifest.version)
        for filename, expected in manifest.files.items():
            path = folder / filename
            if path.is_symlink() or not path.is_file() or sha256_file(path) != expected:
                raise IntegrityError(f"{manifest.ref}: {filename} does not match the sha256 in its manifest")

    # -- writing -----------------------------------------------------------------------------
    def add(
        self,
        source: Path,
        name: str,
        base: BaseModelSpec,
        max_rank: int,
        origin: str | None = None,
        *,
        listed: bool = True,
        provenance: dict[str, Any] | None = None,
    ) -> Manifest:
        """Validate `source` (a PEFT folder or .tar.gz) and store it as the next version of `name`
        (`listed=False`: an unpublished candidate, see `publish`)."""
        check_name(name)
        if name.lower() in base.aliases:
            raise InvalidAdapter(f"Adapter name {name!r} is the base model's name.", param="name")
        if source.is_symlink():
            raise InvalidAdapter("Adapter path is a symbolic link; links are refused.")
        with tempfile.TemporaryDirectory(prefix=".incoming-", dir=self._ensure_root()) as scratch:
            folder = source
            if source.is_file():
                folder = safe_extract(source, Path(scratch) / "unpacked", largest_adapter(base, max_rank))
            elif not source.is_dir():
                raise InvalidAdapter(f"{source} is neither an adapter folder nor a .tar.gz archive.")
            checked = check_adapter(folder, base, max_rank)
            files = {f: sha256_file(folder / f) for f in ADAPTER_FILES}
            self._check_shipped_manifest(folder, files)
            staging = Path(scratch) / "staging"
            staging.mkdir()
            for filename in ADAPTER_FILES:
                shutil.copyfile(folder / filename, staging / filename)
                fsync_path(staging / filename)
            with self._locked():
                version = self._next_version(name)
                manifest = Manifest(
                    name=name,
                    version=version,
                    base_model=base.name,
                    base_architecture=base.architecture,
                    rank=checked.rank,
                    alpha=checked.alpha,
                    target_modules=checked.target_modules,
                    dtype=checked.dtype,
                    size_bytes=sum((staging / f).stat().st_size for f in ADAPTER_FILES),
                    files=files,
                    source=Source(kind="trained" if provenance else "uploaded", origin=origin or str(source)),
                    tenant=self.tenant,
                    listed=listed,
                    provenance=provenance,
                )
                write_durably(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2))
                self._install(staging, name, version)
        return manifest

    def _install(self, staging: Path, name: str, version: int) -> None:
        """Move a staged version into place as `name`'s `version`, its files read-only, durably (under the lock)."""
        for entry in staging.iterdir():
            entry.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        fsync_path(staging)
        target = self.version_dir(name, version)
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True)
            fsync_path(target.parent.parent)
        staging.rename(target)
        replace_durably(target.parent / COUNTER_FILE, str(version))  # fsyncs the name's folder: the rename too

    def _ensure_root(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def _check_shipped_manifest(self, folder: Path, files: dict[str, str]) -> None:
        """A manifest shipped beside the adapter (a copy of a stored version's) must list the same sha256s."""
        shipped = folder / MANIFEST_FILE
        if not shipped.is_file():
            return
        if shipped.stat().st_size > MAX_MANIFEST_BYTES:
            raise InvalidAdapter(f"The shipped {MANIFEST_FILE} holds more than {MAX_MANIFEST_BYTES} bytes.")
        try:
            document = json.loads(shipped.read_text())
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError too; nesting too deep to read
            raise InvalidAdapter(f"The shipped {MANIFEST_FILE} is not valid JSON.") from exc
        claimed = document.get("files", {}) if isinstance(document, dict) else None
        if not isinstance(claimed, dict):
            raise InvalidAdapter(f"The shipped {MANIFEST_FILE} must be a JSON object whose `files` is an object.")
        for filename, digest in files.items():
            if filename in claimed and claimed[filename] != digest:
                raise InvalidAdapter(f"{filename} does not match the sha256 in the shipped manifest.")

    def last_version(self, name: str) -> int:
        """The newest version ever given to `name` here (0: none), deleted or not: numbers are never reused."""
        return self._next_version(name) - 1

    def _next_version(self, name: str) -> int:
        counter = self._name_dir(name) / COUNTER_FILE
        try:
            last = int(counter.read_text().strip())
        except (FileNotFoundError, ValueError):
            last = 0
        return max([last, *self.versions(name)]) + 1

    def publish(self, name: str, version: int, provenance: dict[str, Any]) -> Manifest:
        """List an unpublished candidate, with its full provenance (the eval's metrics now known).

        Only the manifest changes (atomically: written aside, then renamed over); the weights and their
        sha256 are those the candidate was evaluated with. The name's folder is touched so that every
        process's registry sees the change at its next look."""
        with self._locked():
            manifest = self.manifest(name, version)
            if manifest.listed:
                raise InvalidAdapter(f"{manifest.ref} is already published.", param="version")
            merged = {**(manifest.provenance or {}), **provenance} if provenance else manifest.provenance
            published = manifest.model_copy(update={"listed": True, "provenance": merged})
            replace_durably(self.version_dir(name, version) / MANIFEST_FILE, published.model_dump_json(indent=2))
            _touch(self._name_dir(name))
        return published

    def remove(self, name: str, version: int) -> Manifest:
        with self._locked():
            manifest = self.manifest(name, version)
            self._delete(name, version)
        return manifest

    def remove_unreadable(self, name: str, version: int) -> bool:
        """Delete a version whose manifest cannot be read (`remove` finds no such version); False when it has none
        or its manifest reads (then `remove` is the way)."""
        with self._locked():
            if not self.version_dir(name, version).is_dir():
                return False
            try:
                self.manifest(name, version)
            except AdapterNotFound:
                self._delete(name, version)
                return True
            return False

    def discard_unreadable(self) -> tuple[str, ...]:  # (`list` here is the method)
        """Delete every version whose manifest cannot be read (`list` and `remove` skip them: not found), returning
        their refs: a deleted tenant's weights must not stay behind because their manifest was damaged."""
        discarded: tuple[str, ...] = ()
        with self._locked():
            for name in self.names():
                for version in self.versions(name):
                    try:
                        self.manifest(name, version)
                    except AdapterNotFound:
                        self._delete(name, version)
                        discarded += (f"{name}@{version}",)
        return discarded

    def sweep(self, older_than_s: float) -> tuple[str, ...]:  # (`list` here is the method)
        """Remove what a process that died mid-change left, untouched for `older_than_s`: an upload's scratch folder
        (`.incoming-*`), a deletion's (`.trash-v*`), and a version uploaded unlisted that was never listed (uploads
        are listed once their tenant is checked, seconds later; a retraining run's candidate, kept unlisted for its
        eval, is not swept). Returns what it removed, as paths under the store and refs."""
        before, swept = time.time() - older_than_s, tuple[str, ...]()
        if not self.root.is_dir():
            return swept
        with self._locked():  # as every deletion holds it: its `.trash-v*` is renamed, not made (an old mtime)
            names = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
            for folder in (self.root, *names):  # names with no version left too (a deletion of the last one)
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile (its tenant deleted)
                    for entry in folder.iterdir():
                        if entry.name.startswith((".incoming-", ".trash-v")) and entry.lstat().st_ctime < before:
                            shutil.rmtree(entry, ignore_errors=True)
                            swept += (str(entry.relative_to(self.root)),)
            for manifest in self.list():
                left = not manifest.listed and manifest.source.kind == "uploaded"
                if left and manifest.created.timestamp() < before:
                    self._delete(manifest.name, manifest.version)
                    swept += (manifest.ref,)
        return swept

    def _delete(self, name: str, version: int) -> None:
        folder = self.version_dir(name, version)
        trash = folder.with_name(f".trash-v{version}-{os.getpid()}")
        try:
            folder.rename(trash)
        except FileNotFoundError:
            return  # deleted meanwhile (by a process not holding the lock: an operator)
        shutil.rmtree(trash)


def _touch(folder: Path) -> None:
    """Move a folder's mtime on, by at least a second: registries see a change by it, also where the filesystem
    keeps coarse times and the folder changed a moment before (a version stored, then listed)."""
    before = folder.stat()
    try:
        os.utime(folder, ns=(before.st_atime_ns, max(time.time_ns(), before.st_mtime_ns + 1_000_000_000)))
    except PermissionError:  # set times need the folder's owner; "now" needs only write access
        os.utime(folder)
