"""Where training runs and in which compute dtype, chosen by the hardware rather than assumed.

bf16 halves memory and is about 2x faster where the hardware has it (CUDA GPUs from Ampere on,
CPUs with AVX512-BF16 or AMX); elsewhere (AVX2-only CPUs) torch emulates it and a bf16 run is many
times slower than fp32, so those machines train in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    device: str
    """"cuda" or "cpu"."""
    dtype: torch.dtype
    """Compute dtype: the base's weights (or the 4-bit base's compute dtype) and the training math."""

    @property
    def trainer_flags(self) -> dict[str, bool]:
        """The mixed-precision switches of transformers' TrainingArguments (and so TRL's configs)."""
        import torch

        return {
            "bf16": self.dtype == torch.bfloat16,
            "fp16": self.dtype == torch.float16,
            "use_cpu": self.device == "cpu",
        }


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), as torch itself detects it."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def choose_precision() -> Precision:
    import torch

    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later
        return Precision("cuda", torch.bfloat16 if native else torch.float16)
    return Precision("cpu", torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
