"""Reading a safetensors file's header (names, dtypes, shapes) without loading any tensor, and finding tensors
that hold a NaN, an infinity or a value out of range, a tensor at a time."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""The dtypes a LoRA's weights may have, and their sizes (safetensors' own names)."""
_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
"""numpy's reading of each float dtype (bfloat16, no numpy type, as the top half of a float32)."""


def read_header(path: Path, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}; raises ValueError if it is not safetensors, or not a file
    that `safetensors.safe_open` (what vLLM loads it with) would open: a header of strict UTF-8 JSON, a
    `__metadata__` of strings to strings, and tensors' data laid end to end from the data section's start to the
    file's end (no overlap, no gap, no trailing bytes)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("file is too short to be safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError("header length is out of range: not a safetensors file")
        if length > max_bytes:
            raise ValueError(f"header holds {length} bytes, more than the {max_bytes} taken")
        raw = handle.read(length)
        try:
            header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except RecursionError as exc:  # nested deeper than any real header
            raise ValueError("header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    # A lone surrogate escape (`"\ud800"`): json reads it, safe_open's serde_json does not. The bytes were strict
    # UTF-8, so only an escape can hold one: the header is written out again only when it has escapes.
    if b"\\u" in raw:
        try:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("header holds a lone surrogate (an escape of half a UTF-16 pair)") from exc
    _check_metadata(header.pop("__metadata__", None))
    end = 8 + length
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"tensor {name!r} has a malformed header entry")
        offsets, shape, dtype = info["data_offsets"], info["shape"], info["dtype"]
        if not _ints(offsets) or len(offsets) != 2 or not _ints(shape):
            raise ValueError(f"tensor {name!r} has malformed offsets or shape: lists of whole numbers are expected")
        start, stop = offsets
        if not 0 <= start <= stop or end + stop > size:
            raise ValueError(f"tensor {name!r} points outside the file")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r} has dtype {str(dtype)[:20]!r}; one of {', '.join(DTYPE_BYTES)}")
        if stop - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name!r} has {stop - start} bytes of data, not what its dtype and shape need")
    _check_layout(header, size - end)
    return header


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's json takes them; safetensors' parser does not)."""
    raise ValueError(f"header holds {name}, which is not JSON")


def _check_metadata(metadata: Any) -> None:
    """`__metadata__`, where present and not null, maps strings to strings (safetensors refuses anything else)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map strings to strings")


def _check_layout(header: dict[str, dict[str, Any]], data_bytes: int) -> None:
    """Taken in order of their offsets, each tensor's data starts where the one before ends, the first at 0, and
    the last ends at the end of the file: safetensors refuses overlaps, gaps and trailing bytes."""
    expected = 0
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, stop = info["data_offsets"]
        if start != expected:
            raise ValueError(
                f"tensor {name!r} starts at byte {start} of the data, not {expected}: tensors overlap or leave a gap"
            )
        expected = stop
    if expected != data_bytes:
        raise ValueError(f"the tensors' data ends at byte {expected}, but the file holds {data_bytes} bytes of data")


def _ints(value: Any) -> bool:
    """A list of non-negative whole numbers (a shape, or offsets)."""
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def out_of_range(path: Path, header: dict[str, dict[str, Any]], limit: float) -> list[str]:
    """The float tensors of a file `read_header` accepted that hold a NaN, an infinity or a value past +-`limit`,
    read a tensor at a time."""
    data_bytes = max((info["data_offsets"][1] for info in header.values()), default=0)
    data_start = path.stat().st_size - data_bytes
    found = []
    with path.open("rb") as handle:
        for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
            if info["dtype"] not in _FLOATS:
                continue
            start, stop = info["data_offsets"]
            handle.seek(data_start + start)
            values = numpy.frombuffer(handle.read(stop - start), dtype=_FLOATS[info["dtype"]])
            if info["dtype"] == "BF16":
                values = (values.astype(numpy.uint32) << 16).view(numpy.float32)
            if values.size and not (numpy.isfinite(values).all() and numpy.abs(values).max() <= limit):
                found.append(name)
    return found
