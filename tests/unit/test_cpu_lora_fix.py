"""The vLLM plugin that keeps rows without an adapter base in vLLM's CPU LoRA ops."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import torch
from vllm.lora.ops.torch_ops import lora_ops

from gateway.engine import cpu_lora_fix


def shrink_rows(shrink: object, indices: list[int]) -> torch.Tensor:
    """x @ A for 3 rows through `shrink`, with two slots of rank 2 (slot 1 the 'last' one)."""
    torch.manual_seed(0)
    inputs = torch.randn(len(indices), 4)
    weights = torch.randn(2, 1, 2, 4)  # slots x 1 x rank x hidden, as vLLM stacks LoRA A
    out = torch.full((len(indices), 2), 7.0)
    shrink(inputs, weights, out, torch.tensor(indices), 0.5)  # type: ignore[operator]
    return out


def test_vllms_own_op_gives_a_row_without_adapter_the_last_slot() -> None:
    original = importlib.reload(lora_ops).bgmv_shrink  # vLLM's own, even if the plugin ran in this process
    rows = shrink_rows(original, [-1, 0, 1])
    assert torch.equal(rows[0], shrink_rows(original, [1, 0, 1])[0]), "index -1 is the last slot: the bug"


def test_masked_shrink_zeroes_rows_without_adapter_and_keeps_the_others() -> None:
    original = importlib.reload(lora_ops).bgmv_shrink
    fixed = cpu_lora_fix.masked_shrink(original)
    rows = shrink_rows(fixed, [-1, 0, 1])
    assert torch.equal(rows[0], torch.zeros(2)), "a base row gets no LoRA"
    assert torch.equal(rows[1:], shrink_rows(original, [-1, 0, 1])[1:]), "adapter rows are untouched"
    assert torch.equal(shrink_rows(fixed, [0, 1, 0]), shrink_rows(original, [0, 1, 0]))


def test_register_patches_every_lookup_once_and_vllm_finds_it() -> None:
    original = importlib.reload(lora_ops).bgmv_shrink
    cpu_lora_fix.register()
    patched = lora_ops.bgmv_shrink
    cpu_lora_fix.register()
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    assert patched is not original and lora_ops.bgmv_shrink is patched, "registered twice, wrapped once"
    assert torch_ops.bgmv_shrink is patched and punica_cpu.bgmv_shrink is patched, "where the CPU wrapper looks"
    assert torch.equal(shrink_rows(patched, [-1, 1, 0])[0], torch.zeros(2))
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loragate_cpu_lora_fix") == "gateway.engine.cpu_lora_fix:register", "installed for vLLM"


def expand_rows(expand: object, indices: list[int], sliced: bool = False) -> torch.Tensor:
    """A layer's output (3 rows, all 1) plus buffer @ B through `expand`, with two slots of rank 2, the last one
    holding NaN (as an uploaded adapter did), the buffer's rows without adapter zero (as the masked shrink leaves
    them)."""
    torch.manual_seed(0)
    buffer = torch.randn(len(indices), 2)
    buffer[torch.tensor(indices) < 0] = 0
    weights = torch.randn(2, 1, 4, 2)  # slots x 1 x hidden x rank, as vLLM stacks LoRA B
    weights[1] = float("nan")
    out = torch.ones(len(indices), 6 if sliced else 4)
    if sliced:
        expand(buffer, weights, out, torch.tensor(indices), 2, 4, True)  # type: ignore[operator]
    else:
        expand(buffer, weights, out, torch.tensor(indices), True)  # type: ignore[operator]
    return out


def test_a_slot_holding_nan_gives_rows_without_adapter_nothing() -> None:
    """0 x NaN: with vLLM's own ops, the base rows batched with such an adapter (it in the last slot) became NaN,
    and so did every answer whose prefix was cached meanwhile, in every tenant, until the engine restarted."""
    ops = importlib.reload(lora_ops)
    for original, fixed, sliced in (
        (ops.bgmv_expand, cpu_lora_fix.bgmv_expand, False),
        (ops.bgmv_expand_slice, cpu_lora_fix.bgmv_expand_slice, True),
    ):
        assert torch.isnan(expand_rows(original, [-1, 0, 1], sliced)[0]).any(), "vLLM's own: the bug"
        rows = expand_rows(fixed, [-1, 0, 1], sliced)
        assert torch.equal(rows[0], torch.ones(rows.shape[1])), "the base row: nothing added"
        assert torch.equal(rows[1], expand_rows(original, [-1, 0, 1], sliced)[1]), "an adapter row as vLLM computes it"
        assert torch.isnan(rows[2]).any(), "the row of the adapter holding NaN: its own"


def test_register_patches_the_expand_ops_where_they_are_looked_up() -> None:
    importlib.reload(lora_ops)
    cpu_lora_fix.register()
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, torch_ops, punica_cpu):
        assert module.bgmv_expand is cpu_lora_fix.bgmv_expand, module
        assert module.bgmv_expand_slice is cpu_lora_fix.bgmv_expand_slice, module
    out = torch.ones(3, 4)
    buffer, weights = torch.zeros(3, 2), torch.full((2, 1, 4, 2), float("nan"))
    lora_ops.sgmv_expand(buffer, weights, out, None, torch.tensor([3]), torch.tensor([-1]), 1, 3, 3, True)
    assert torch.equal(out, torch.ones(3, 4)), "the segmented variant goes through the patched op"
