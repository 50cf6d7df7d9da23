"""Training picks its compute dtype from the hardware: bf16 only where the CPU computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.hardware import choose_precision, cpu_has_fast_bf16


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_this_machine_gets_the_dtype_its_cpu_runs_fast() -> None:
    fast = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert cpu_has_fast_bf16() is fast
    precision = choose_precision()
    assert precision.device == "cpu"
    assert precision.dtype == (torch.bfloat16 if fast else torch.float32)
    assert precision.trainer_flags == {"bf16": fast, "fp16": False, "use_cpu": True}


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "dtype"),
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_bf16_only_with_native_kernels(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_precision().dtype == dtype
