"""Every way an adapter is refused before anything is stored or loaded, on real files."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapters.archive import safe_extract
from adapters.manifest import AdapterRef, InvalidAdapter, Manifest
from adapters.registry import Registry
from adapters.staging import replace_durably
from adapters.store import AdapterNotFound, AdapterStore, IntegrityError, largest_adapter
from adapters.synthetic import make_adapter, tarball
from adapters.validate import BaseModelSpec
from tests.unit.conftest import edit_config

MAX_RANK = 16


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    """Tenant `t`'s store, in the registry root tmp_path/store."""
    return AdapterStore(tmp_path / "store" / "t", "t")


def refused(store: AdapterStore, source: Path, base: BaseModelSpec, match: str, name: str = "a") -> None:
    with pytest.raises(InvalidAdapter, match=match):
        store.add(source, name, base, MAX_RANK)
    assert store.list() == [], "nothing is stored when an adapter is refused"


def test_good_adapter_gets_versions_and_a_full_manifest(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    first = store.add(good, "a", base, MAX_RANK)
    second = store.add(good, "a", base, MAX_RANK)
    assert (first.ref, second.ref) == ("a@1", "a@2")
    assert first.base_model == "tiny-base" and first.base_architecture == "LlamaForCausalLM"
    assert (first.rank, first.alpha, first.dtype) == (4, 8.0, "F32")
    assert first.target_modules == ["q_proj", "v_proj"]
    assert set(first.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert first.size_bytes == sum((good / f).stat().st_size for f in first.files)
    assert first.source.kind == "uploaded"
    assert store.resolve(AdapterRef("a")).version == 2
    store.verify(first)


def test_versions_are_never_reused_after_delete(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    store.add(good, "a", base, MAX_RANK)
    store.add(good, "a", base, MAX_RANK)
    store.remove("a", 2)
    assert store.add(good, "a", base, MAX_RANK).version == 3
    with pytest.raises(AdapterNotFound):
        store.manifest("a", 2)


def test_a_stored_version_is_on_disk_before_it_is_acknowledged(
    store: AdapterStore, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file of a version, its folder, the folder it is renamed into and the version counter are fsynced before
    `add` returns (a 201 survives the machine's crash); the counter and a published manifest are replaced, not
    rewritten in place (a crash mid-write would leave them torn: a torn counter reuses a deleted version's number)."""
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store.add(good, "a", base, MAX_RANK, listed=False)
    folder = store.root.resolve() / "a"
    staged = [Path(path) for path in synced if "/staging" in path]
    assert {p.name for p in staged} == {"adapter_config.json", "adapter_model.safetensors", "manifest.json", "staging"}
    assert synced.index(str(folder)) > synced.index(str(staged[-1])), "the rename into the name's folder, after"
    assert str(store.root.resolve()) in synced, "the name's new folder"
    counter = folder / ".last_version"
    inode = counter.stat().st_ino
    synced.clear()
    store.add(good, "a", base, MAX_RANK)
    assert counter.read_text() == "2" and counter.stat().st_ino != inode, "replaced, not written over"
    manifest = folder / "v1" / "manifest.json"
    inode = manifest.stat().st_ino
    synced.clear()
    store.publish("a", 1, {"eval": {}})
    assert manifest.stat().st_ino != inode and synced[-1] == str(folder / "v1"), "the published manifest, replaced"
    assert sorted(p.name for p in folder.iterdir()) == [".last_version", "v1", "v2"], "no scratch file left"


def test_a_durable_replace_that_fails_leaves_the_old_file_and_no_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / ".last_version"
    replace_durably(target, "1")
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        replace_durably(target, "2")
    assert target.read_text() == "1" and [p.name for p in tmp_path.iterdir()] == [".last_version"]


def test_pinned_version_or_latest(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    """Which version a bare name means is the caller's pin (kept in Redis by the gateway), else the latest."""
    for _ in range(3):
        store.add(good, "a", base, MAX_RANK)
    assert store.resolve(AdapterRef("a"), pinned=1).version == 1
    assert store.resolve(AdapterRef("a")).version == 3
    assert store.resolve(AdapterRef("a"), pinned=7).version == 3, "a pin to a deleted version falls back"
    assert store.resolve(AdapterRef("a", 2), pinned=1).version == 2, "name@V is exact"
    assert store.list()[0].tenant == "t"


def test_registry_sees_writes_from_another_process_at_once(
    store: AdapterStore, good: Path, base: BaseModelSpec
) -> None:
    registry = Registry(store.root.parent)
    store.add(good, "a", base, MAX_RANK)
    assert registry.resolve("t", AdapterRef("a")).version == 1
    AdapterStore(store.root, "t").add(good, "a", base, MAX_RANK)
    assert registry.resolve("t", AdapterRef("a")).version == 2
    assert registry.resolve("t", AdapterRef("a"), pinned=1).version == 1
    assert not registry.deleted("t.a@2")
    AdapterStore(store.root, "t").remove("a", 2)
    assert registry.resolve("t", AdapterRef("a")).version == 1
    assert not registry.exists("t.a@2") and registry.exists("t.a@1")
    assert registry.deleted("t.a@2"), "found before, gone now"
    assert not registry.deleted("t.never@1"), "never found here: not taken for deleted"
    assert not registry.exists("other.a@1"), "another tenant's namespace"


def test_a_deleted_and_forgotten_version_leaves_nothing_behind_but_is_still_known_deleted(
    store: AdapterStore, good: Path, base: BaseModelSpec
) -> None:
    registry = Registry(store.root.parent)
    sizes = []
    for _ in range(6):
        manifest = store.add(good, "a", base, MAX_RANK)
        found = registry.resolve("t", AdapterRef("a"))
        registry.verify_once(found)
        registry.path_text(found)
        store.remove("a", manifest.version)
        registry.forget(f"t.{manifest.ref}")
        assert registry.deleted(f"t.{manifest.ref}"), "forgotten, yet known for deleted (vLLM may hold it)"
        sizes.append(sum(len(kept) for kept in (registry._verified, registry._paths, registry._corrupt)))  # noqa: SLF001
    assert sizes == [0] * 6, "nothing kept per deleted version"
    assert not registry.deleted("t.a@7"), "newer than any found: perhaps another store's"


def test_a_candidate_is_nobodys_default_until_published(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    registry = Registry(store.root.parent)
    store.add(good, "a", base, MAX_RANK)
    assert registry.resolve("t", AdapterRef("a")).version == 1
    candidate = AdapterStore(store.root, "t").add(good, "a", base, MAX_RANK, listed=False, provenance={"parent": "a@1"})
    assert (candidate.version, candidate.listed, candidate.source.kind) == (2, False, "trained")
    assert registry.resolve("t", AdapterRef("a")).version == 1, "the latest listed version stays the default"
    assert store.resolve(AdapterRef("a"), pinned=2).version == 1, "nor can a pin reach it"
    assert registry.resolve("t", AdapterRef("a", 2)).listed is False, "name@V finds it (the router decides who may)"
    assert [ref for ref, _ in registry.listing("t", {})] == ["a", "a@1"]
    published = AdapterStore(store.root, "t").publish("a", 2, {"metrics": {"format": 0.9}})
    assert published.listed and published.provenance == {"parent": "a@1", "metrics": {"format": 0.9}}
    assert published.files == candidate.files, "the weights evaluated are the weights published"
    assert registry.resolve("t", AdapterRef("a")).version == 2, "every registry sees it at its next look"
    assert [ref for ref, _ in registry.listing("t", {})] == ["a", "a@1", "a@2"]
    store.verify(published)
    with pytest.raises(InvalidAdapter, match="already published"):
        store.publish("a", 2, {})


def test_an_exact_version_and_a_pin_to_it_are_resolved_apart(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    """A pin to a candidate (an old CLI allowed it) leaves the bare name on the latest published version; resolving
    the candidate exactly (a training key's eval) must not turn the bare name into it for everyone."""
    registry = Registry(tmp_path / "store")
    store = registry.store("t")
    store.add(good, "bot", base, MAX_RANK)
    store.add(good, "bot", base, MAX_RANK, listed=False)
    assert registry.resolve("t", AdapterRef("bot", 2)).ref == "bot@2"
    assert registry.resolve("t", AdapterRef("bot"), pinned=2).ref == "bot@1"


def test_a_process_that_never_resolved_a_version_still_knows_it_deleted(
    good: Path, base: BaseModelSpec, tmp_path: Path
) -> None:
    """A gateway (re)started while a version is still loaded on vLLM, deleted by the CLI: its maintenance unloads
    it (the store's counter says the number was given; its folder is gone)."""
    cli = Registry(tmp_path / "store").store("acme")
    cli.add(good, "bot", base, MAX_RANK)
    cli.add(good, "bot", base, MAX_RANK)
    gateway = Registry(tmp_path / "store")
    cli.remove("bot", 1)
    assert gateway.deleted("acme.bot@1") and not gateway.deleted("acme.bot@2")
    assert not gateway.deleted("acme.bot@3"), "a number the store never gave: maybe another store's"


def test_listing_reads_a_names_manifests_again_only_when_its_folder_changed(
    store: AdapterStore, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(store.root.parent)
    for name in ("a", "a", "b"):
        store.add(good, name, base, MAX_RANK)
    assert [ref for ref, _ in registry.listing("t", {"a": 1})] == ["a", "a@1", "a@2", "b", "b@1"]
    assert registry.listing("t", {"a": 1})[0][1].version == 1, "a bare name lists its pinned version"
    assert registry.listing("t", {})[0][1].version == 2, "else its latest"
    reads: list[tuple[str, int]] = []
    manifest = AdapterStore.manifest
    monkeypatch.setattr(AdapterStore, "manifest", lambda self, n, v: reads.append((n, v)) or manifest(self, n, v))
    assert [ref for ref, _ in registry.listing("t", {})] == ["a", "a@1", "a@2", "b", "b@1"]
    assert reads == [], "nothing changed: no manifest read"
    AdapterStore(store.root, "t").add(good, "a", base, MAX_RANK)  # another process's write
    AdapterStore(store.root, "t").remove("b", 1)
    AdapterStore(store.root, "t").add(good, "c", base, MAX_RANK, listed=False, provenance={"parent": "a@1"})
    assert [ref for ref, _ in registry.listing("t", {})] == ["a", "a@1", "a@2", "a@3"]
    assert {name for name, _ in reads} == {"a", "b", "c"}, "only the changed names are read again"
    AdapterStore(store.root, "t").publish("c", 1, {})
    assert [ref for ref, _ in registry.listing("t", {})] == ["a", "a@1", "a@2", "a@3", "c", "c@1"]


def test_tenants_have_separate_namespaces(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    registry = Registry(store.root.parent)
    registry.store("t").add(good, "a", base, MAX_RANK)
    registry.store("u").add(good, "a", base, MAX_RANK)
    registry.store("u").add(good, "a", base, MAX_RANK)
    assert registry.resolve("t", AdapterRef("a")).version == 1
    assert registry.resolve("u", AdapterRef("a")).version == 2
    assert registry.path(registry.resolve("u", AdapterRef("a"))) == store.root.parent.absolute() / "u" / "a" / "v2"
    assert registry.remove_tenant("u") == ["u.a@1", "u.a@2"]
    assert not registry.exists("u.a@1") and registry.exists("t.a@1")
    assert registry.store("u").add(good, "a", base, MAX_RANK).version == 3, "an upstream name is never reused"


def test_a_tenants_deletion_passes_over_a_version_removed_as_it_lists(
    store: AdapterStore, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload undone as its tenant is deleted (it finds the tenant gone) removes its version between the deletion's
    listing and its removals: the deletion goes on, and still names it to unload (a make test run answered 500)."""
    registry = Registry(store.root.parent)
    tenant = registry.store("u")
    tenant.add(good, "a", base, MAX_RANK)
    tenant.add(good, "b", base, MAX_RANK)
    listed = AdapterStore.list

    def listing_then_undone(self: AdapterStore) -> list[Manifest]:
        found = listed(self)
        AdapterStore(self.root, "u").remove("a", 1)
        return found

    monkeypatch.setattr(AdapterStore, "list", listing_then_undone)
    assert registry.remove_tenant("u") == ["u.a@1", "u.b@1"]
    assert not registry.exists("u.a@1") and not registry.exists("u.b@1")


async def test_lookup_answers_from_memory_only_while_fresh(
    store: AdapterStore, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request path's lookup never stats in the event loop; others' writes show within recheck_s."""
    registry = Registry(store.root.parent, recheck_s=60)
    store.add(good, "a", base, MAX_RANK)
    assert (await registry.lookup("t", AdapterRef("a"))).version == 1
    AdapterStore(store.root, "t").add(good, "a", base, MAX_RANK)
    monkeypatch.setattr(os, "stat", lambda *a, **k: pytest.fail("stat in the event loop"))
    assert (await registry.lookup("t", AdapterRef("a"))).version == 1, "fresh: answered from memory"
    monkeypatch.undo()
    registry.recheck_s = 0
    assert (await registry.lookup("t", AdapterRef("a"))).version == 2, "stale: checked again (in a thread)"
    registry.recheck_s = 60
    AdapterStore(store.root, "t").remove("a", 2)
    registry.invalidate("t", "a")
    assert (await registry.lookup("t", AdapterRef("a"))).version == 1, "this process's own writes show at once"
    assert registry.path(store.resolve(AdapterRef("a"))) == store.version_dir("a", 1)


def test_a_corrupt_version_is_hashed_once_and_keeps_failing(
    store: AdapterStore, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = store.add(good, "a", base, MAX_RANK)
    weights = store.version_dir("a", 1) / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    registry = Registry(store.root.parent)
    hashes = []
    target = registry.store("t")
    monkeypatch.setattr(target, "verify", lambda m: hashes.append(m) or AdapterStore.verify(target, m))
    for _ in range(3):
        with pytest.raises(IntegrityError):
            registry.verify_once(manifest)
    assert len(hashes) == 1


def test_a_verified_version_is_hashed_again_once_its_files_change(
    store: AdapterStore, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verified once, a version is not hashed for every load; weights changed on disk since (a write, a
    replaced file) are hashed again and refused before vLLM loads them."""
    manifest = store.add(good, "a", base, MAX_RANK)
    registry = Registry(store.root.parent)
    hashes = []
    target = registry.store("t")
    monkeypatch.setattr(target, "verify", lambda m: hashes.append(m) or AdapterStore.verify(target, m))
    registry.verify_once(manifest)
    registry.verify_once(manifest)
    assert len(hashes) == 1
    weights = store.version_dir("a", 1) / "adapter_model.safetensors"
    weights.chmod(0o644)
    before = weights.stat()
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # a coarse clock may not tick
    with pytest.raises(IntegrityError):
        registry.verify_once(manifest)
    assert len(hashes) == 2


def test_other_base_model_is_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    edit_config(good, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    refused(store, good, base, "made for base model")


def test_other_architecture_is_refused_by_shape(store: AdapterStore, tmp_path: Path, base: BaseModelSpec) -> None:
    wide = BaseModelSpec(
        "tiny-base", "LlamaForCausalLM", base.aliases, {k: (v[0] * 2, v[1] * 2) for k, v in base.linear_shapes.items()}
    )
    folder = make_adapter(tmp_path / "wide", wide, seed=2, rank=4)
    refused(store, folder, base, "has shape")


def test_rank_above_engine_limit_is_refused(store: AdapterStore, tmp_path: Path, base: BaseModelSpec) -> None:
    folder = make_adapter(tmp_path / "big", base, seed=3, rank=32)
    refused(store, folder, base, "exceeds the engine's max_lora_rank")


def test_missing_target_modules_are_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    edit_config(good, target_modules=["c_attn", "q_proj"])
    refused(store, good, base, r"c_attn.*do not exist")


def test_a_target_modules_pattern_is_matched_as_peft_matches_it(
    store: AdapterStore, good: Path, base: BaseModelSpec
) -> None:
    edit_config(good, target_modules=r".*\.c_attn")
    refused(store, good, base, "matches no module")
    edit_config(good, target_modules=r".*\.(q_proj|v_proj)")
    assert store.add(good, "a", base, MAX_RANK).target_modules == [r".*\.(q_proj|v_proj)"]


def test_an_invalid_or_costly_target_modules_pattern_is_the_adapters_fault(
    store: AdapterStore, good: Path, base: BaseModelSpec
) -> None:
    """The pattern is the uploader's: a broken one is refused, not a server error, and one that backtracks
    catastrophically is refused once its time is up instead of holding the gateway's process."""
    edit_config(good, target_modules="(")
    refused(store, good, base, "not a valid regular expression")
    edit_config(good, target_modules=r"((?:.|.)*)*[0-9]")
    started = time.monotonic()
    refused(store, good, base, "takes too long")
    assert time.monotonic() - started < 5


def test_tensor_for_a_missing_module_is_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    save_file(
        {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32)},
        str(good / "adapter_model.safetensors"),
    )
    refused(store, good, base, "does not have")


def test_pickled_weights_are_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    (good / "adapter_model.safetensors").rename(good / "adapter_model.bin")
    refused(store, good, base, "pickle")


def test_weights_that_are_not_safetensors_are_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    (good / "adapter_model.safetensors").write_bytes(b"\x80\x04not really safetensors" * 10)
    refused(store, good, base, "not a valid safetensors")


def test_shipped_manifest_with_wrong_sha256_is_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    (good / "manifest.json").write_text(json.dumps({"files": {"adapter_model.safetensors": "0" * 64}}))
    refused(store, good, base, "does not match the sha256")


def test_tampered_store_fails_verification(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    manifest = store.add(good, "a", base, MAX_RANK)
    weights = store.version_dir("a", 1) / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError):
        store.verify(manifest)


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "", ".hidden", "a@1", "x" * 65, "tiny-base", "a\n"])
def test_names_that_escape_or_clash_are_refused(
    store: AdapterStore, good: Path, base: BaseModelSpec, name: str
) -> None:
    refused(store, good, base, "name", name=name)


def test_symlinks_are_refused(store: AdapterStore, good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    link = tmp_path / "link"
    os.symlink(good, link)
    refused(store, link, base, "symbolic link")
    (good / "extra").symlink_to("/etc/passwd")
    refused(store, good, base, "symbolic link")


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_archives_that_escape_are_refused(store: AdapterStore, good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    payload = (good / "adapter_config.json").read_bytes()
    for bad_name in ("../adapter_config.json", "/tmp/adapter_config.json"):
        info = tarfile.TarInfo(bad_name)
        info.size = len(payload)
        refused(store, _tar([(info, payload)], tmp_path / "escape.tar.gz"), base, "escape")
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    refused(store, _tar([(link, None)], tmp_path / "link.tar.gz"), base, "link")


def test_good_archive_is_accepted(store: AdapterStore, good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(good, arcname="my-adapter")
    assert store.add(archive, "a", base, MAX_RANK).ref == "a@1"


def test_archives_cut_short_or_damaged_are_refused(
    store: AdapterStore, good: Path, base: BaseModelSpec, tmp_path: Path
) -> None:
    """A damaged deflate stream inside the weights passes the safetensors header check; gzip's CRC does not."""
    whole = tarball(good)
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    refused(store, tmp_path / "cut.tar.gz", base, "damaged or cut short")
    damaged = bytearray(whole)
    for i in range(len(damaged) // 3, len(damaged) // 3 + 20):
        damaged[i] ^= 0xFF
    (tmp_path / "damaged.tar.gz").write_bytes(bytes(damaged))
    refused(store, tmp_path / "damaged.tar.gz", base, "damaged or cut short")


def test_archive_bombs_are_refused(store: AdapterStore, good: Path, tmp_path: Path) -> None:
    archive = tmp_path / "big.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(good, arcname="a")
    with pytest.raises(InvalidAdapter, match="more than"):
        safe_extract(archive, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()


def test_only_the_adapters_files_are_unpacked_and_only_as_large_as_the_base_allows(
    store: AdapterStore, good: Path, base: BaseModelSpec, tmp_path: Path
) -> None:
    """A small upload must not write gigabytes of padding, or anything but the adapter, into the store's volume."""
    (good / "README.md").write_text("notes")
    (good / "padding.bin").write_bytes(bytes(1 << 20))  # zeros: a few KB compressed
    archive = tmp_path / "folder.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(good, arcname="run")
    unpacked = safe_extract(archive, tmp_path / "out", largest_adapter(base, MAX_RANK))
    assert sorted(p.name for p in unpacked.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert store.add(archive, "a", base, MAX_RANK).ref == "a@1"
    save_file({LORA_A: np.zeros((1 << 15, 32), dtype=np.float32)}, good / "adapter_model.safetensors")  # 4 MiB
    with tarfile.open(tmp_path / "huge.tar.gz", "w:gz") as tar:
        tar.add(good, arcname="run")
    with pytest.raises(InvalidAdapter, match="more than this base allows"):
        store.add(tmp_path / "huge.tar.gz", "b", base, MAX_RANK)
    assert [m.ref for m in store.list()] == ["a@1"]


@pytest.mark.parametrize("text", ["a@0", "a@-1", "a@\u00b2", "a@1.5", "a@" + "9" * 5000, "a@"])
def test_odd_versions_are_invalid_not_crashes(text: str) -> None:
    with pytest.raises(InvalidAdapter):
        AdapterRef.parse(text)


LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"dtype": "F32", "shape": [4, 32], "data_offsets": 5}, "malformed offsets or shape"),
        ({"dtype": "F32", "shape": [4, 32], "data_offsets": ["a", "b"]}, "malformed offsets or shape"),
        ({"dtype": "F32", "shape": 4, "data_offsets": [0, 0]}, "malformed offsets or shape"),
        ({"dtype": "F32", "shape": [], "data_offsets": [0, 64]}, "64 bytes of data, not what"),
        ({"dtype": "U8", "shape": [], "data_offsets": [0, 1]}, r"has shape \[\]"),
        ({"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 64]}, "64 bytes of data, not what"),
        ({"dtype": "F7", "shape": [4, 32], "data_offsets": [0, 64]}, "has dtype 'F7'"),
        (None, "nested too deeply"),
    ],
)
def test_a_malformed_safetensors_header_is_the_adapters_fault(
    store: AdapterStore, good: Path, base: BaseModelSpec, entry: dict[str, object] | None, why: str
) -> None:
    """Crafted headers of the right JSON with the wrong types inside were server errors (500)."""
    raw = json.dumps({LORA_A: entry}).encode() if entry is not None else b"[" * 100_000 + b"]" * 100_000
    data = b"\0" * (1 if entry is not None and entry["dtype"] == "U8" else 64)  # the data an entry claims, or more
    (good / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    refused(store, good, base, why)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("drop B", "has no lora_B"),
        ("halve B", "lora_A of rank 4 and lora_B of rank 2"),
        ("config r=2", "gives it rank 2"),
    ],
)
def test_lora_pairs_of_one_rank_as_configured(
    store: AdapterStore, good: Path, base: BaseModelSpec, change: str, why: str
) -> None:
    """What vLLM would fail on at every request for the adapter (a TypeError, a shape error), refused at upload."""
    tensors = load_file(good / "adapter_model.safetensors")
    b_key = next(k for k in sorted(tensors) if ".lora_B." in k)
    if change == "drop B":
        del tensors[b_key]
    elif change == "halve B":
        tensors[b_key] = np.ascontiguousarray(tensors[b_key][:, :2])
    else:
        edit_config(good, r=2)
    save_file(tensors, good / "adapter_model.safetensors")
    refused(store, good, base, why)


def test_a_rank_pattern_gives_its_modules_their_rank(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    edit_config(good, r=2, rank_pattern={"q_proj": 4, "v_proj": 4})
    assert store.add(good, "a", base, MAX_RANK).rank == 2


def test_what_a_process_that_died_mid_change_left_is_swept_once_old(
    tmp_path: Path, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed mid-upload left its scratch folders and a version stored unlisted for good: that version
    made its name an alias could never take (409), though no listing showed it."""
    from gateway.routes.admin_adapters import UPLOAD_PREFIX, sweep_uploads

    registry = Registry(tmp_path / "adapters")
    store = registry.store("acme")
    store.add(good, "kept", base, 16)
    store.add(good, "left", base, 16, listed=False)  # an upload whose process died before listing it
    store.add(good, "candidate", base, 16, listed=False, provenance={"run": "r"})  # a run's, in its eval
    (store.root / ".incoming-abc" / "unpacked").mkdir(parents=True)
    (store.root / "kept" / ".trash-v9-123").mkdir()
    (store.root / "gone" / ".trash-v1-77").mkdir(parents=True)  # a deletion of a name's last version, killed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"{UPLOAD_PREFIX}x").mkdir()
    assert registry.sweep(3600) == [] and sweep_uploads(3600) == [], "nothing young is touched (an upload going on)"
    assert sorted(registry.sweep(-1)) == [
        "acme/.incoming-abc", "acme/gone/.trash-v1-77", "acme/kept/.trash-v9-123", "acme/left@1"
    ]  # fmt: skip
    assert sweep_uploads(-1) == [str(tmp_path / f"{UPLOAD_PREFIX}x")] and not (tmp_path / f"{UPLOAD_PREFIX}x").exists()
    assert [m.ref for m in store.list()] == ["candidate@1", "kept@1"] and store.versions("left") == []
    assert not (store.root / ".incoming-abc").exists() and (store.root / ".lock").exists()
