"""Adapter configs and tensor names that vLLM 0.32 refuses to load (vllm/lora/peft_helper.py: from_dict, __post_init__,
validate_legal; vllm/lora/utils.py: parse_fine_tuned_lora_name) are refused at upload, naming the field: stored,
they would fail at every request for the adapter. What vLLM loads is still accepted."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapters.manifest import InvalidAdapter
from adapters.store import AdapterStore
from adapters.validate import MAX_CONFIG_BYTES, MAX_PATTERN_KEYS, BaseModelSpec, max_header_bytes
from tests.unit.conftest import edit_config as configure

MAX_RANK = 16


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store" / "t", "t")


def refused(store: AdapterStore, folder: Path, base: BaseModelSpec, match: str) -> None:
    with pytest.raises(InvalidAdapter, match=match):
        store.add(folder, "a", base, MAX_RANK)
    assert store.list() == []


def test_lora_alpha_is_required_as_vllm_requires_it(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    config = json.loads((good / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (good / "adapter_config.json").write_text(json.dumps(config))
    refused(store, good, base, "no lora_alpha")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"bias": None}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"init_lora_weights": "corda"}, "init_lora_weights"),
        ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
        ({"alora_invocation_tokens": [7]}, "alora_invocation_tokens"),
        ({"use_bdlora": {"blocks": 2}}, "use_bdlora"),
        ({"use_qalora": True}, "use_qalora"),
    ],
)
def test_features_vllm_refuses_are_refused_naming_the_field(
    store: AdapterStore, good: Path, base: BaseModelSpec, changes: dict[str, Any], field: str
) -> None:
    configure(good, **changes)
    refused(store, good, base, field)


@pytest.mark.parametrize(
    "changes",
    [
        {"init_lora_weights": True},
        {"init_lora_weights": False},
        {"init_lora_weights": "Gaussian"},
        {"init_lora_weights": "eva"},
        {"layer_replication": None, "lora_bias": False, "use_qalora": False, "alora_invocation_tokens": []},
        {"use_rslora": True},
        {"rank_pattern": None, "alpha_pattern": {}},
        {"alpha_pattern": {"q_proj": 3, "v_proj": 0.5}},
    ],
)
def test_what_vllm_loads_is_accepted(
    store: AdapterStore, good: Path, base: BaseModelSpec, changes: dict[str, Any]
) -> None:
    configure(good, **changes)
    assert store.add(good, "a", base, MAX_RANK).ref == "a@1"


@pytest.mark.parametrize("value", [0, -4, 4.0, "4", True, None])
def test_a_rank_pattern_value_that_is_not_a_positive_integer_is_refused(
    store: AdapterStore, good: Path, base: BaseModelSpec, value: object
) -> None:
    """vLLM refuses it at load; it was skipped here, the module taking `r`."""
    configure(good, rank_pattern={"k_proj": value})
    refused(store, good, base, "rank_pattern gives 'k_proj'")


@pytest.mark.parametrize("value", [0, -1.5, "2", True, None, float("nan"), float("inf")])
def test_an_alpha_pattern_value_that_is_not_a_finite_positive_number_is_refused(
    store: AdapterStore, good: Path, base: BaseModelSpec, value: object
) -> None:
    configure(good, alpha_pattern={"q_proj": value})
    refused(store, good, base, "alpha_pattern gives 'q_proj'")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("r", True, "rank"), ("r", "8", "rank"), ("lora_alpha", "x", "lora_alpha"), ("lora_alpha", -1, "lora_alpha")]
    + [(field, pattern, field) for field in ("rank_pattern", "alpha_pattern") for pattern in ([4], "q_proj=4")],
)
def test_a_nonsense_rank_alpha_or_pattern_is_refused(
    store: AdapterStore, good: Path, base: BaseModelSpec, field: str, value: object, message: str
) -> None:
    configure(good, **{field: value})
    refused(store, good, base, f"invalid {message}")


def test_pattern_keys_are_matched_with_vllms_regex(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    """vLLM matches `(.*\\.)?({key})$` from the name's start: a key with a top-level `|` puts the `$` on its last
    branch only, so `layers)|(none` matches every layer's modules there (rank 8 here), though no name ends in it."""
    configure(good, rank_pattern={"layers)|(none": 8})
    refused(store, good, base, "gives it rank 8")
    configure(good, rank_pattern={"v_proj": 8, "self_attn\\.(q|v)_proj": 4})
    refused(store, good, base, "v_proj' has lora_A of rank 4.*gives it rank 8")  # the first key that matches wins


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_key_that_is_invalid_or_too_costly_is_refused(
    store: AdapterStore, good: Path, base: BaseModelSpec, field: str
) -> None:
    """vLLM compiles and matches the keys at every load, with no time limit."""
    configure(good, **{field: {"q_proj(": 4}})
    refused(store, good, base, f"{field} key .* not a valid regular expression")
    configure(good, **{field: {r"((?:.|.)*)*[0-9]": 4}})
    started = time.monotonic()
    refused(store, good, base, f"{field} key .* takes too long")
    assert time.monotonic() - started < 20, "given up after PATTERN_SECONDS, not matched for ever (slack: a busy CI)"


def test_pattern_keys_past_the_bound_are_refused_together(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    """vLLM matches every key against every module at each load, compiling each again past its cache of 500: 2,000
    keys that match nothing passed here and made each load take minutes."""
    half = MAX_PATTERN_KEYS // 2
    configure(good, rank_pattern={f"none{i}": 4 for i in range(half)}, alpha_pattern={f"no{i}": 2 for i in range(half)})
    assert store.add(good, "a", base, MAX_RANK).ref == "a@1", "the bound itself is taken"
    configure(good, alpha_pattern={f"no{i}": 2 for i in range(half + 1)})
    with pytest.raises(InvalidAdapter, match=f"hold {MAX_PATTERN_KEYS + 1} keys; at most {MAX_PATTERN_KEYS}"):
        store.add(good, "b", base, MAX_RANK)


def test_tensor_names_vllm_cannot_parse_are_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    """PEFT's in-memory name (`lora_A.default.weight`) fails vLLM's parse_fine_tuned_lora_name."""
    weights = good / "adapter_model.safetensors"
    tensors: dict[str, np.ndarray] = load_file(weights)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, weights)
    refused(store, good, base, r"Unexpected tensor .*lora_A\.default\.weight")


def test_a_config_nested_too_deep_to_read_is_refused_as_not_json(
    store: AdapterStore, good: Path, base: BaseModelSpec
) -> None:
    """json.loads raises RecursionError, not ValueError, past its depth: an upload's 400, not a 500."""
    (good / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(store, good, base, "adapter_config.json is not valid JSON")


def test_a_config_or_header_larger_than_any_adapter_has_is_refused_before_it_is_parsed(
    store: AdapterStore, good: Path, base: BaseModelSpec
) -> None:
    """Both are parsed whole in the gateway, holding the GIL: a 40 MB one, a megabyte gzipped, held every tenant's
    requests on that process for seconds."""
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps(config | {"notes": "x" * MAX_CONFIG_BYTES}))
    refused(store, good, base, rf"adapter_config.json holds \d+ bytes; at most {MAX_CONFIG_BYTES} are taken")
    (good / "adapter_config.json").write_text(json.dumps(config))
    weights = good / "adapter_model.safetensors"
    raw = weights.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = {"notes": "x" * max_header_bytes(base)}
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    refused(store, good, base, f"more than the {max_header_bytes(base)} taken")


def test_a_config_holding_a_lone_surrogate_is_refused(store: AdapterStore, good: Path, base: BaseModelSpec) -> None:
    """`".*q_proj|\\ud800"` compiles and matches, and the manifest keeping target_modules could not be written: 500."""
    config = json.loads((good / "adapter_config.json").read_text()) | {"target_modules": "PLACEHOLDER"}
    (good / "adapter_config.json").write_text(json.dumps(config).replace("PLACEHOLDER", ".*q_proj|\\ud800"))
    assert json.loads((good / "adapter_config.json").read_text())["target_modules"].endswith("\ud800")
    refused(store, good, base, r"lone surrogate \(U\+D800\)")
