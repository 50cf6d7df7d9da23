"""Reading a safetensors file's header (names, dtypes, shapes) without loading any tensor."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""The dtypes a LoRA's weights may have, and their sizes (safetensors' own names)."""


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}; raises ValueError if it is not safetensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("file is too short to be safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError("header length is out of range: not a safetensors file")
        try:
            header = json.loads(handle.read(length))
        except RecursionError as exc:  # nested deeper than any real header
            raise ValueError("header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    end = 8 + length
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"tensor {name!r} has a malformed header entry")
        offsets, shape = info["data_offsets"], info["shape"]
        if not _ints(offsets) or len(offsets) != 2 or not _ints(shape):
            raise ValueError(f"tensor {name!r} has malformed offsets or shape: lists of whole numbers are expected")
        start, stop = offsets
        if not 0 <= start <= stop or end + stop > size:
            raise ValueError(f"tensor {name!r} points outside the file")
        if info["dtype"] not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r} has dtype {str(info['dtype'])[:20]!r}; one of {', '.join(DTYPE_BYTES)}")
        if stop - start != math.prod(shape) * DTYPE_BYTES[info["dtype"]]:
            raise ValueError(f"tensor {name!r} has {stop - start} bytes of data, not what its dtype and shape need")
    return header


def _ints(value: Any) -> bool:
    """A list of non-negative whole numbers (a shape, or offsets)."""
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
