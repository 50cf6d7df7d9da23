"""The vLLM plugin that has vLLM zero KV-cache blocks on the CPU before a request is given them (a NaN one request
wrote reached the next one's attention through its reused blocks: tests/integration/test_adapters.py)."""

from __future__ import annotations

from importlib.metadata import entry_points

from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.worker import cpu_model_runner

from gateway.engine import cpu_kv_zeroing


def test_register_turns_vllms_own_zeroing_on_once_and_vllm_finds_it() -> None:
    own = cpu_model_runner.CPUModelRunner._zero_block_ids
    cpu_kv_zeroing.register()
    cpu_kv_zeroing.register()
    assert KVCacheConfig.needs_kv_cache_zeroing.fget(None) is True  # type: ignore[attr-defined]
    runner = cpu_model_runner.CPUModelRunner
    assert runner._zero_block_ids is own, "vLLM's own CPU zeroing does the work"
    assert runner._init_kv_zero_meta is cpu_kv_zeroing._no_triton_meta  # type: ignore[comparison-overlap]
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loragate_cpu_kv_zeroing") == "gateway.engine.cpu_kv_zeroing:register", "installed for vLLM"
