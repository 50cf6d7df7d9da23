"""Archives that would make a small upload unpack, read or hold far more than an adapter: refused, and nothing
written but the adapter's own files, each refusal in words naming no path of this server."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from adapters import archive as archive_module
from adapters.archive import MAX_MANIFEST_BYTES, MAX_MEMBERS, safe_extract
from adapters.manifest import ADAPTER_FILES, InvalidAdapter
from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec

MAX_RANK = 16


@pytest.fixture
def adapter(tmp_path: Path, base: BaseModelSpec) -> Path:
    return make_adapter(tmp_path / "adapter", base, seed=1, rank=4)


def _plain_tar(folder: Path, extra: list[tuple[tarfile.TarInfo, bytes]] | None = None) -> bytes:
    """The adapter's files, then `extra` members, as an uncompressed tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)
        for info, data in extra or []:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _refused(archive: Path, into: Path, match: str, max_bytes: int = 1 << 30) -> str:
    with pytest.raises(InvalidAdapter, match=match) as refusal:
        safe_extract(archive, into, max_bytes)
    message = str(refusal.value)
    assert str(archive.parent) not in message and "/tmp" not in message, message
    assert not into.exists() or not any(into.rglob("*.json")), "nothing of a refused archive is kept"
    return message


@pytest.mark.parametrize(("compress", "kind"), [(lzma.compress, "xz"), (bz2.compress, "bzip2")])
def test_only_gzip_is_decompressed_other_compressions_are_refused_by_name(
    adapter: Path, tmp_path: Path, compress: object, kind: str
) -> None:
    """tarfile's "r:*" opened xz and bzip2 too, with no bound on what they unpack to: 3 KB of xz wrote 20 MB."""
    archive = tmp_path / "adapter.tar.x"
    archive.write_bytes(compress(_plain_tar(adapter)))  # type: ignore[operator]
    _refused(archive, tmp_path / "out", f"compressed with {kind}; send a .tar.gz")


def test_an_uncompressed_tar_is_accepted(adapter: Path, tmp_path: Path, base: BaseModelSpec) -> None:
    archive = tmp_path / "adapter.tar"
    archive.write_bytes(_plain_tar(adapter))
    store = AdapterStore(tmp_path / "store" / "t", "t")
    assert store.add(archive, "a", base, MAX_RANK).ref == "a@1"
    named = tmp_path / "named.tar"  # its first bytes are its first member's name: "BZh9…" is not bzip2 for that
    with tarfile.open(named, "w") as tar:
        tar.add(adapter, arcname="BZh91AY")
    assert store.add(named, "a", base, MAX_RANK).ref == "a@2"


def test_a_shipped_manifest_over_its_cap_is_refused_unwritten(adapter: Path, tmp_path: Path) -> None:
    """Any `manifest.json`, at any depth, was unpacked whatever its size (and then read whole)."""
    archive = tmp_path / "big-manifest.tar"
    archive.write_bytes(_plain_tar(adapter, [_member("deep/er/manifest.json", b" " * (MAX_MANIFEST_BYTES + 1))]))
    _refused(archive, tmp_path / "out", "manifest.json holds more than")
    assert not (tmp_path / "out").exists()


def test_every_kept_member_counts_against_the_bound(adapter: Path, tmp_path: Path) -> None:
    """The adapter's files alone fit, but kept manifests (each under its own cap) push the total past the bound."""
    files = sum(p.stat().st_size for p in adapter.iterdir())
    manifests = [_member(f"m{i}/manifest.json", b" " * 4000) for i in range(3)]
    archive = tmp_path / "manifests.tar"
    archive.write_bytes(_plain_tar(adapter, manifests))
    _refused(archive, tmp_path / "out", "hold more than", max_bytes=files + 10_000)
    assert safe_extract(archive, tmp_path / "ok", files + 12_000).name == "ok", "within the bound: unpacked"


def test_an_archive_of_too_many_members_is_refused_at_the_first_one_past_the_cap(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members are walked one header at a time: millions of tiny headers are never all loaded."""
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(adapter.iterdir()):
            tar.add(entry, arcname=entry.name)
        for i in range(MAX_MEMBERS * 4):
            tar.addfile(tarfile.TarInfo(f"notes/{i}.txt"))
    headers_read: list[int] = []
    real_next = tarfile.TarFile.next

    def counting_next(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        headers_read.append(1)
        return real_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    message = _refused(archive, tmp_path / "out", f"more than {MAX_MEMBERS} members")
    assert len(headers_read) <= MAX_MEMBERS + 2, message  # tarfile reads the first one on opening, too


def test_an_oversized_extended_header_is_refused_before_it_is_read(adapter: Path, tmp_path: Path) -> None:
    """tarfile reads a pax header whole into memory: a few KB of gzip can hold hundreds of MB of one."""
    info = tarfile.TarInfo("note.txt")
    info.pax_headers = {"comment": "x" * (1 << 20)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    archive = tmp_path / "pax.tar.gz"
    archive.write_bytes(buffer.getvalue())
    _refused(archive, tmp_path / "out", "extended header of more than")


def test_a_chain_of_extended_headers_is_refused_not_a_crash(tmp_path: Path) -> None:
    """tarfile follows pax headers recursively (each parsed in quadratic time by older Pythons): thousands in a row
    were a RecursionError (a 500)."""
    block = tarfile.TarInfo("x")
    block.type = tarfile.XHDTYPE
    record = b"11 a=bcde\n"
    block.size = len(record)
    one = block.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (512 - len(record))
    archive = tmp_path / "chain.tar.gz"
    archive.write_bytes(gzip.compress(one * 5000 + b"\0" * 1024))
    _refused(archive, tmp_path / "out", f"more than {MAX_MEMBERS} extended headers")


def test_a_long_path_in_a_pax_header_is_accepted(adapter: Path, tmp_path: Path, base: BaseModelSpec) -> None:
    """The extended-header cap leaves room for real ones: a path past ustar's 100 characters goes in a pax header."""
    archive = tmp_path / "long.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.add(adapter, arcname="/".join(["run-" + "x" * 60] * 8))
    store = AdapterStore(tmp_path / "store" / "t", "t")
    assert store.add(archive, "a", base, MAX_RANK).ref == "a@1"


class _CountingDecompressor:
    """A zlib decompressor that adds what it inflates to `inflated`."""

    def __init__(self, inner: Any, inflated: list[int]) -> None:
        self._inner, self._inflated = inner, inflated

    def decompress(self, *args: Any) -> bytes:
        out: bytes = self._inner.decompress(*args)
        self._inflated.append(len(out))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_gzip_archive_is_decompressed_once(adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream was inflated to its end for its CRC, then again (and again on seeking back) by tarfile: thrice
    the CPU of an upload. Every byte of the tar is inflated once, the tail past its end marker included."""
    plain = _plain_tar(adapter, [_member("README.md", b"notes " * 4000)])
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(gzip.compress(plain))
    inflated: list[int] = []
    for factory in ("decompressobj", "_ZlibDecompressor"):  # what gzip inflates with (the latter from 3.12 on)
        if real := getattr(zlib, factory, None):
            monkeypatch.setattr(
                zlib, factory, lambda *a, real=real, **k: _CountingDecompressor(real(*a, **k), inflated)
            )
    assert safe_extract(archive, tmp_path / "out").name == "out"
    assert sum(inflated) == len(plain), f"{sum(inflated)} bytes inflated for a tar of {len(plain)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.tar.gz", "out"], "no scratch left"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(ADAPTER_FILES)


def _stored(plain: bytes) -> bytearray:
    """`plain` gzipped in stored (uncompressed) deflate blocks: a byte flipped in them inflates without a zlib
    error, into damaged data that only the stream's CRC, at its very end, tells."""
    return bytearray(gzip.compress(plain, compresslevel=0))


def test_weights_damaged_where_only_the_crc_tells_are_refused_and_nothing_is_kept(
    adapter: Path, tmp_path: Path
) -> None:
    """The tar is whole and every member reads; the weights written while reading it are removed again."""
    weights = (adapter / ADAPTER_FILES[1]).read_bytes()
    data = _stored(_plain_tar(adapter))
    at = data.find(weights[-64:])
    assert at > 0
    data[at + 10] ^= 0x01  # in the tensors' data, past the safetensors header
    archive = tmp_path / "damaged.tar.gz"
    archive.write_bytes(bytes(data))
    _refused(archive, tmp_path / "out", "damaged or cut short")
    assert not (tmp_path / "out").exists(), "what was unpacked before the CRC was read is removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "damaged.tar.gz"]


@pytest.mark.parametrize("at", [-8, -5, -1, -12])
def test_a_byte_flipped_near_the_end_of_the_stream_is_refused(adapter: Path, tmp_path: Path, at: int) -> None:
    """In the CRC, in the stream's length, or in the last deflate block (the tar's end padding)."""
    data = bytearray(gzip.compress(_plain_tar(adapter)))
    data[at] ^= 0x10
    archive = tmp_path / "flipped.tar.gz"
    archive.write_bytes(bytes(data))
    _refused(archive, tmp_path / "out", "damaged or cut short")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [4, 9, 300])
def test_an_archive_cut_short_is_refused_and_nothing_is_kept(adapter: Path, tmp_path: Path, cut: int) -> None:
    data = gzip.compress(_plain_tar(adapter))
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[:-cut])
    _refused(archive, tmp_path / "out", "damaged or cut short")
    assert not (tmp_path / "out").exists()


def test_a_damaged_stream_is_refused_as_damaged_whatever_else_is_wrong_with_it(adapter: Path, tmp_path: Path) -> None:
    """An archive refused for its members is still read to its end: a damaged one is named damaged, as when its CRC
    was checked before any member."""
    many = [_member(f"notes/{i}.txt", b"") for i in range(MAX_MEMBERS * 2)]
    data = _stored(_plain_tar(adapter, many))
    data[-8] ^= 0x01
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(bytes(data))
    _refused(archive, tmp_path / "out", "damaged or cut short")
    data[-8] ^= 0x01
    archive.write_bytes(bytes(data))
    _refused(archive, tmp_path / "out", f"more than {MAX_MEMBERS} members")


def test_a_stream_unpacking_past_the_bound_is_refused_and_nothing_is_kept(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound counts what the gzip stream inflates to (skipped members and the tar's blocks too), checked as it
    is read: the adapter's files, already written, are removed again."""
    monkeypatch.setattr(archive_module, "MAX_UNPACKED_BYTES", 1000)
    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(gzip.compress(_plain_tar(adapter, [_member("checkpoint.bin", bytes(3 << 20))])))
    _refused(archive, tmp_path / "out", "unpacks to more than 1000 bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "big.tar.gz"], "nothing kept"


def test_an_existing_folder_is_never_unpacked_into_nor_removed(adapter: Path, tmp_path: Path) -> None:
    """`into` is made by safe_extract, which removes it whole on a refusal: a folder of the caller's stays as it is."""
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(gzip.compress(_plain_tar(adapter)))
    into = tmp_path / "mine"
    into.mkdir()
    (into / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        safe_extract(archive, into)
    assert [p.name for p in into.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "headers",
    [
        {"GNU.sparse.size": "abc"},
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.map": "a,b"},
        {"GNU.sparse.map": "a,b"},
        {"path": "a\x00b/adapter_config.json"},
    ],
)
def test_a_malformed_member_header_is_refused_not_a_crash(
    adapter: Path, tmp_path: Path, headers: dict[str, str]
) -> None:
    """tarfile raises a plain ValueError for these (a 500 with a traceback, the archive's folder left behind)."""
    info, data = _member("notes.txt", b"x")
    info.pax_headers = headers
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(gzip.compress(_plain_tar(adapter, [(info, data)])))
    _refused(archive, tmp_path / "out", "Not a readable tar archive")
