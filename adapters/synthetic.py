"""Deterministic LoRA adapters made from a seed, for tests and benchmarks.

They are real PEFT folders (adapter_config.json + adapter_model.safetensors) whose weights are
seeded noise, so an adapter visibly changes greedy output and two seeds give two different models.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE
from adapters.validate import BaseModelSpec


def make_adapter(
    folder: Path,
    base: BaseModelSpec,
    *,
    seed: int,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.2,
    base_model_name: str | None = None,
) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for module, (out_features, in_features) in sorted(base.linear_shapes.items()):
        if module.rsplit(".", 1)[-1] not in targets or not module.startswith("model.layers."):
            continue
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, in_features)) / np.sqrt(in_features)).astype(
            np.float32
        )
        tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out_features, rank)) * scale).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "base_model_name_or_path": base_model_name or base.name,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def tarball(folder: Path) -> bytes:
    """An adapter folder as the .tar.gz the admin API's upload takes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)
    return buffer.getvalue()
