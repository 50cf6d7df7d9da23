"""Unpacking an uploaded adapter archive: only a .tar.gz or an uncompressed .tar, and nothing of it that an
adapter does not need, so that a small upload can neither fill the store's volume nor the gateway's memory.

Only gzip is decompressed (tarfile would also open xz and bzip2, whose streams can unpack a few kilobytes into
gigabytes, and whose CPU cost per byte sent is far higher): any other compression is refused by name. The archive
is read once, in order (tarfile's stream mode, which cannot seek back): the gzip stream is decompressed a single
time, bounded, as members are walked one at a time (never all headers at once), at most MAX_MEMBERS of them, each
kept one written as it comes and counted against the caller's byte bound; then the stream is read to its end, where
gzip checks its CRC. Any refusal (a damaged stream found only there included) removes everything unpacked.
"""

from __future__ import annotations

import errno
import gzip
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any

from adapters.manifest import ADAPTER_FILES, MANIFEST_FILE, InvalidAdapter

MAX_UNPACKED_BYTES = 8 << 30
"""What a gzip stream may decompress to in all (members kept or not, and the tar's own blocks)."""
MAX_MEMBERS = 64
"""Members an archive may hold (folders and skipped files included): a PEFT folder has a handful."""
MAX_MANIFEST_BYTES = 1 << 20
"""A shipped manifest.json is read whole (its sha256s checked): a real one is a few kilobytes."""
MAX_EXTENDED_HEADER_BYTES = 8 << 10
"""A pax or GNU long-name header is read whole into memory by tarfile before any member check can run, and parsed
in time quadratic in its size by Pythons before 3.11.10 (CVE-2024-6232): a real one holds a path and a few times.
At most MAX_MEMBERS of them are read (tarfile follows a chain of them recursively)."""
EXTENDED_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
GZIP_MAGIC = b"\x1f\x8b"
REFUSED_COMPRESSIONS = {b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
"""Compressions tarfile (or a newer one) would open, by their magic bytes, named in the refusal (bzip2 too, see
`_compression`): the archive is never handed to them. Anything else that is not gzip is read as a plain tar."""
ARCHIVE_FAULTS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EILSEQ, errno.ENAMETOOLONG})
"""OSErrors unpacking an archive that are the archive's fault (members that clash on disk, names the filesystem
cannot hold): the upload is refused as invalid. Any other (a full disk, permissions) is the server's own."""


def _bounded_info() -> type[tarfile.TarInfo]:
    """A TarInfo class for one archive, refusing an oversized pax or long-name header before tarfile reads it, and
    more of them than MAX_MEMBERS."""
    seen = [0]

    class BoundedInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile: Any) -> Any:  # tarfile's own (undocumented) hook
            if self.type in EXTENDED_TYPES:
                seen[0] += 1
                if self.size > MAX_EXTENDED_HEADER_BYTES:
                    raise InvalidAdapter(
                        f"The archive has an extended header of more than {MAX_EXTENDED_HEADER_BYTES} bytes."
                    )
                if seen[0] > MAX_MEMBERS:
                    raise InvalidAdapter(f"The archive has more than {MAX_MEMBERS} extended headers.")
            return super()._proc_member(tarfile)  # type: ignore[misc]  # not in typeshed

    return BoundedInfo


class _Inflated(gzip.GzipFile):
    """A gzip archive's tar, decompressed once as tarfile reads it: at most MAX_UNPACKED_BYTES of it (the tar's own
    blocks beside its members too), and a damaged or cut-short stream refused as such (its OSError would otherwise be
    taken for the server's own by tarfile's extraction). A refusal raised here is raised again by any later read."""

    unpacked: int = 0
    refusal: InvalidAdapter | None = None

    def read(self, size: int | None = -1) -> bytes:
        if self.refusal is not None:
            raise self.refusal
        try:
            chunk = super().read(size)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            self.refusal = InvalidAdapter(f"The archive is damaged or cut short ({exc}).")
            raise self.refusal from exc
        self.unpacked += len(chunk)
        if self.unpacked > MAX_UNPACKED_BYTES + (1 << 20):  # the tar's own blocks beside its members
            self.refusal = InvalidAdapter(f"Archive unpacks to more than {MAX_UNPACKED_BYTES} bytes.")
            raise self.refusal
        return chunk

    def read_to_end(self) -> None:
        """The rest of the stream (the tar's padding, anything after its end marker) read to its end, where its CRC
        is checked: tarfile stops at the end marker, so damaged weights (whose safetensors header validation cannot
        see) would otherwise be kept."""
        while self.read(1 << 20):
            pass


def _compression(magic: bytes) -> str | None:
    """The refused compression an archive's first bytes announce. bzip2's "BZh" is checked with its block magic
    (pi's digits) after the level digit: a plain tar's first member may well be named "BZh…"."""
    if magic[:3] == b"BZh" and magic[3:4].isdigit() and magic[4:10] == b"1AY&SY":
        return "bzip2"
    return next((kind for prefix, kind in REFUSED_COMPRESSIONS.items() if magic.startswith(prefix)), None)


def _stream(raw: IO[bytes]) -> _Inflated | IO[bytes]:
    """The tar in `raw`: read through gzip, or as it is; any other compression refused."""
    magic = raw.read(10)
    raw.seek(0)
    kind = _compression(magic)
    if kind is not None:
        raise InvalidAdapter(f"The archive is compressed with {kind}; send a .tar.gz (or an uncompressed .tar).")
    return _Inflated(fileobj=raw, mode="rb") if magic.startswith(GZIP_MAGIC) else raw


def _kept(member: tarfile.TarInfo) -> bool:
    """Whether a member is unpacked: the adapter's files and a shipped manifest, at any depth."""
    return member.isfile() and Path(member.name).name in (*ADAPTER_FILES, MANIFEST_FILE)


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or ".." in Path(name).parts:
        raise InvalidAdapter(f"Archive member {name!r} tries to escape the adapter folder.")
    if not (member.isfile() or member.isdir()):
        raise InvalidAdapter(f"Archive member {name!r} is a link or device; only files are accepted.")
    if _kept(member) and Path(name).name == MANIFEST_FILE and member.size > MAX_MANIFEST_BYTES:
        raise InvalidAdapter(f"The shipped {MANIFEST_FILE} holds more than {MAX_MANIFEST_BYTES} bytes.")


def _unpack(tar: tarfile.TarFile, into: Path, max_bytes: int) -> None:
    """Check every member, read one header at a time (getmembers() would load millions of them first), and write
    the adapter's files (nothing else: READMEs, checkpoints) as they come, `max_bytes` of them at most."""
    seen = kept = 0
    while (member := tar.next()) is not None:
        if seen == MAX_MEMBERS:
            raise InvalidAdapter(f"The archive has more than {MAX_MEMBERS} members; pack only the adapter's folder.")
        seen += 1
        _check_member(member)
        if _kept(member):
            kept += member.size
            if kept > max_bytes:
                raise InvalidAdapter(
                    f"The adapter's files hold more than {max_bytes} bytes: more than this base allows."
                )
            _extract(tar, into, member)


def _read_once(raw: IO[bytes], into: Path, max_bytes: int) -> None:
    """Unpack the archive in `raw` in one pass, then read a gzip stream to its end (its CRC checked), also when the
    archive was refused first: a damaged stream is refused as damaged, whatever its garbage looked like to tarfile."""
    stream = _stream(raw)
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_bounded_info()) as tar:
            _unpack(tar, into, max_bytes)
    except (ValueError, tarfile.TarError):  # InvalidAdapter is a ValueError, as tarfile's malformed headers raise
        if isinstance(stream, _Inflated):
            stream.read_to_end()  # raises the stream's own refusal again, when it was the stream's
        raise
    if isinstance(stream, _Inflated):
        stream.read_to_end()


def safe_extract(archive: Path, into: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack the adapter's files of a .tar.gz or .tar (whole and undamaged; nothing else of it is written) into
    `into`, which must not exist yet: it is made here, and removed whole if the archive is refused (or unpacking
    fails). Links, devices, absolute paths, `..` are refused, and kept files of more than `max_bytes` in all (a
    sparse member counts at its full size); return the adapter folder."""
    into.mkdir(parents=True)
    try:
        try:
            with archive.open("rb") as raw:
                _read_once(raw, into, max_bytes)
        except tarfile.FilterError as exc:  # its text names this server's paths
            raise InvalidAdapter(f"Archive member {exc.tarinfo.name!r} cannot be unpacked safely.") from exc
        except InvalidAdapter:
            raise
        except ValueError as exc:  # tarfile's own, for a malformed PAX header (a sparse map, a size) or a NUL in a name
            raise InvalidAdapter(
                "Not a readable tar archive (a member's header is malformed); send a .tar.gz or an uncompressed .tar."
            ) from exc
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise InvalidAdapter(
                f"Not a readable tar archive ({exc}); send a .tar.gz or an uncompressed .tar."
            ) from exc
        candidates = {p.parent for p in into.rglob(ADAPTER_FILES[0])}
        if len(candidates) != 1:
            raise InvalidAdapter(f"Archive must contain exactly one {ADAPTER_FILES[0]}; found {len(candidates)}.")
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)  # nothing of a refused archive is kept
        raise
    return candidates.pop()


def _extract(tar: tarfile.TarFile, into: Path, member: tarfile.TarInfo) -> None:
    """Write `member` (the one whose header tarfile has just read) under `into`. Members that clash on disk (a file
    `x` and a file `x/y`) or whose names this filesystem cannot hold fail with an OSError naming a path of this
    server: that archive is refused instead, in words naming none. A fault of this machine's own (a full disk) is
    not the archive's, and stays what it is."""
    try:
        tar.extract(member, into, filter="data")
    except OSError as exc:
        if exc.errno not in ARCHIVE_FAULTS:
            raise
        reason = exc.strerror or type(exc).__name__  # never str(exc): it names the path
        raise InvalidAdapter(
            f"The archive's files cannot be unpacked ({reason}): no member's path may run through another "
            "member's file, and names must fit the filesystem."
        ) from exc
