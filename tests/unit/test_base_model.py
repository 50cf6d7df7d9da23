from __future__ import annotations

from pathlib import Path

import pytest

from adapters import base_model
from adapters.base_model import DONE_MARKER, PrepareError, is_prepared, prepare, prepared_dir
from adapters.staging import staged_folder


def test_staged_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "half-written").write_text("x")
        raise RuntimeError("conversion died")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with staged_folder(target) as staging:
        (staging / "done").write_text("x")
    assert (target / "done").is_file() and len(list(tmp_path.iterdir())) == 1


def test_prepare_is_a_no_op_once_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = prepared_dir(tmp_path)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / DONE_MARKER).write_text("{}")
    monkeypatch.setattr(base_model, "_package_dir", lambda _: pytest.fail("must not convert again"))
    assert prepare(tmp_path) == folder and is_prepared(folder)


def test_failed_conversion_says_why_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(source: Path, target: Path, progress: object) -> None:
        (target / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(base_model, "_package_dir", lambda _: tmp_path)
    monkeypatch.setattr(base_model, "_convert", broken)
    with pytest.raises(PrepareError, match="disk full"):
        prepare(tmp_path / "models")
    assert not prepared_dir(tmp_path / "models").exists()
