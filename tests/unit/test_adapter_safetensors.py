"""A safetensors header is accepted exactly when `safetensors.safe_open` (what vLLM loads adapters with) opens the
file: one it refuses, stored, would fail at every request for the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors

from adapters.manifest import InvalidAdapter
from adapters.safetensors_header import read_header
from adapters.store import AdapterStore
from adapters.validate import BaseModelSpec

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _entry(start: int, stop: int, dtype: Any = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": [(stop - start) // 4], "data_offsets": [start, stop]}


def _write(path: Path, header: dict[str, Any] | bytes, data_bytes: int) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * data_bytes)
    return path


def _safetensors_opens(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="np") as opened:
            opened.keys()
    except Exception:  # noqa: BLE001  (SafetensorError and friends: any refusal)
        return False
    return True


ENTRY = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
"""One tensor's entry, and the header's end, as bytes (a test's escapes written as they are)."""
CASES: dict[str, tuple[dict[str, Any] | bytes, int]] = {
    "two tensors end to end": ({"a": _entry(0, 4), "b": _entry(4, 8)}, 8),
    "listed out of order": ({"b": _entry(4, 8), "a": _entry(0, 4)}, 8),
    "empty tensors beside others": (
        {"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": _entry(0, 4)},
        4,
    ),
    "metadata of strings": ({"__metadata__": {"format": "pt"}, "a": _entry(0, 4)}, 4),
    "overlapping": ({"a": _entry(0, 4), "b": _entry(0, 4)}, 4),
    "a gap between tensors": ({"a": _entry(0, 4), "b": _entry(8, 12)}, 12),
    "data not starting at 0": ({"a": _entry(4, 8)}, 8),
    "trailing bytes": ({"a": _entry(0, 4)}, 8),
    "metadata value a number": ({"__metadata__": {"step": 1}, "a": _entry(0, 4)}, 4),
    "metadata a list": ({"__metadata__": ["pt"], "a": _entry(0, 4)}, 4),
    "dtype a list": ({"a": _entry(0, 4, dtype=["F32"])}, 4),
    "dtype an object": ({"a": _entry(0, 4, dtype={"F32": 1})}, 4),
    "header in UTF-16": (json.dumps({"a": _entry(0, 4)}).encode("utf-16"), 4),
    "NaN in the header": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}', 4),
    "a lone surrogate": (b'{"__metadata__":{"k":"\\ud800"},"a":' + ENTRY, 4),
    "a surrogate pair": (b'{"__metadata__":{"k":"\\ud83d\\ude00"},"a":' + ENTRY, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_read_header_accepts_what_safetensors_opens_and_nothing_else(tmp_path: Path, case: str) -> None:
    path = _write(tmp_path / "w.safetensors", *CASES[case])
    try:
        read_header(path)
        ours = True
    except ValueError:  # never a TypeError (a 500)
        ours = False
    assert ours == _safetensors_opens(path), f"{case}: read_header says {ours}"


@pytest.mark.parametrize(
    ("header", "data_bytes", "why"),
    [
        ({LORA_A: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}}, 1024, "holds 1024 bytes of data"),
        ({"__metadata__": {"x": 1}, LORA_A: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}}, 512, "map"),
        ({LORA_A: {"dtype": ["F32"], "shape": [4, 32], "data_offsets": [0, 512]}}, 512, "has dtype"),
    ],
)
def test_an_adapter_with_such_a_header_is_refused_cleanly(
    tmp_path: Path, good: Path, base: BaseModelSpec, header: dict[str, Any], data_bytes: int, why: str
) -> None:
    _write(good / "adapter_model.safetensors", header, data_bytes)
    store = AdapterStore(tmp_path / "store" / "t", "t")
    with pytest.raises(InvalidAdapter, match=why):
        store.add(good, "a", base, 16)
