"""The vLLM plugin that zeroes KV-cache blocks on the CPU before a request is given them (a NaN one request wrote
reached the next one's attention through its reused blocks: tests/integration/test_adapters.py)."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import torch
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.worker import cpu_model_runner

from gateway.engine import cpu_kv_zeroing


def test_the_given_blocks_of_every_layer_are_zeroed_and_no_others() -> None:
    caches = [torch.full((4, 2, 3, 8), float("nan"), dtype=torch.bfloat16) for _ in range(3)]
    runner = SimpleNamespace(kv_caches=[*caches, None, torch.ones(2, 5)])  # a layer without a cache; a smaller one
    cpu_kv_zeroing.zero_block_ids(runner, [1, 3])
    for cache in caches:
        assert torch.equal(cache[[1, 3]], torch.zeros_like(cache[[1, 3]])), "the new blocks: zero"
        assert torch.isnan(cache[[0, 2]]).all(), "the others untouched"
    assert torch.equal(runner.kv_caches[-1], torch.ones(2, 5)), "block ids past a cache's size: left alone"
    cpu_kv_zeroing.zero_block_ids(runner, [])


def test_register_turns_vllms_zeroing_on_for_the_cpu_runner_once_and_vllm_finds_it() -> None:
    cpu_kv_zeroing.register()
    cpu_kv_zeroing.register()
    assert KVCacheConfig.needs_kv_cache_zeroing.fget(None) is True  # type: ignore[attr-defined]
    runner = cpu_model_runner.CPUModelRunner
    assert runner._zero_block_ids is cpu_kv_zeroing.zero_block_ids  # type: ignore[comparison-overlap]
    assert runner._init_kv_zero_meta is cpu_kv_zeroing._no_triton_meta  # type: ignore[comparison-overlap]
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loragate_cpu_kv_zeroing") == "gateway.engine.cpu_kv_zeroing:register", "installed for vLLM"
