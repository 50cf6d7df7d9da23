#!/usr/bin/env python
"""Build small pre-quantised compressed-tensors checkpoints offline (no hub).

Plain round-to-nearest (RTN) quantisation of every Linear in the decoder
layers (q/k/v/o/gate/up/down); embeddings / tied lm_head stay bf16.
Uses only torch + safetensors + compressed-tensors (all already in the
loragate venv), so it works without internet. Calibration-based tools
(llm-compressor GPTQ/AWQ/SmoothQuant) would give better accuracy; this is
only meant to exercise vLLM's CPU kernels + LoRA.

  w8a8  : "int-quantized" format, int8 weights per-output-channel symmetric,
          int8 activations dynamic per-token (vLLM CompressedTensorsW8A8Int8)
  w4a16 : "pack-quantized" format, 4-bit weights symmetric, group size 64
          (vLLM CompressedTensorsWNA16 -> CPUWNA16LinearKernel on CPU)
  awq   : AutoAWQ "gemm" layout (qweight/qzeros/scales), 4-bit asymmetric with
          zero point, group size 64 (vLLM "awq" -> CPUWNA16LinearKernel on CPU).
          RTN only -- no activation-aware scaling, so it is AWQ *format*, not
          AWQ *calibration*.

Usage:
  python make_quant_ckpt.py w8a8  SRC_DIR OUT_DIR
  python make_quant_ckpt.py w4a16 SRC_DIR OUT_DIR [--group-size 64]
  python make_quant_ckpt.py awq   SRC_DIR OUT_DIR [--group-size 64]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{l}." in name for l in LINEARS)


def w8a8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale.to(torch.bfloat16)}


def w4a16(w: torch.Tensor, gs: int) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import pack_to_int32

    out_f, in_f = w.shape
    assert in_f % gs == 0, (in_f, gs)
    wg = w.float().reshape(out_f, in_f // gs, gs)
    scale = wg.abs().amax(dim=2, keepdim=True).clamp(min=1e-8) / 7.0
    q = torch.round(wg / scale).clamp(-8, 7).to(torch.int8).reshape(out_f, in_f)
    return {"weight_packed": pack_to_int32(q, 4),
            "weight_scale": scale.squeeze(-1).to(torch.bfloat16),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_pack(x: torch.Tensor) -> torch.Tensor:
    """[rows, cols] uint4 values (int32) -> [rows, cols/8] int32, AWQ order."""
    rows, cols = x.shape
    x = x.reshape(rows, cols // 8, 8)
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, j in enumerate(AWQ_ORDER):
        out |= (x[:, :, j].to(torch.int64) & 0xF) << (4 * i)
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret as int32
    return out.to(torch.int32)


def awq(w: torch.Tensor, gs: int) -> dict[str, torch.Tensor]:
    out_f, in_f = w.shape
    wg = w.float().t().reshape(in_f // gs, gs, out_f)  # AWQ stores [in, out]
    wmax, wmin = wg.amax(dim=1), wg.amin(dim=1)  # [in/gs, out]
    scale = ((wmax - wmin).clamp(min=1e-8) / 15.0)
    zero = torch.round(-wmin / scale).clamp(0, 15)
    q = torch.round(wg / scale[:, None, :] + zero[:, None, :]).clamp(0, 15)
    q = q.reshape(in_f, out_f).to(torch.int32)
    return {"qweight": _awq_pack(q),
            "qzeros": _awq_pack(zero.to(torch.int32)),
            "scales": scale.to(torch.float16)}


def qcfg(kind: str, gs: int) -> dict:
    if kind == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": gs,
                "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if kind == "w8a8":
        group = {"targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                             "strategy": "channel", "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                       "strategy": "token", "dynamic": True}}
        fmt = "int-quantized"
    else:
        group = {"targets": ["Linear"],
                 "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                             "strategy": "group", "group_size": gs, "dynamic": False}}
        fmt = "pack-quantized"
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": group}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["w8a8", "w4a16", "awq"])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.src.iterdir():  # tokenizer, chat template, generation config ...
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, a.out / f.name)
    sd = load_file(str(a.src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if is_linear(k):
            prefix = k[: -len(".weight")]
            if a.kind == "w8a8":
                q = w8a8(v)
            elif a.kind == "w4a16":
                q = w4a16(v, a.group_size)
            else:
                q = awq(v, a.group_size)
            out.update({f"{prefix}.{n}": t.contiguous() for n, t in q.items()})
        else:
            out[k] = v.contiguous()
    save_file(out, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((a.src / "config.json").read_text())
    cfg["quantization_config"] = qcfg(a.kind, a.group_size)
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    size = (a.out / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {a.out} ({size:.1f} MiB safetensors)")


if __name__ == "__main__":
    main()
