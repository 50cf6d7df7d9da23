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
from typing import Any

import regex

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, InvalidAdapter
from adapters.safetensors_header import read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PATTERN_SECONDS = 0.25
"""What matching a `target_modules` pattern against the base's modules may take, all modules together:
the pattern is the uploader's, so it is matched with a time limit (and without holding the GIL)."""
MAX_PATTERN_CHARS = 1000
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)(?:\.default)?\.weight$")


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
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object.")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"Only LoRA adapters are served; peft_type is {config.get('peft_type')!r}.")
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters are not supported by vLLM.")
    if config.get("modules_to_save"):
        raise InvalidAdapter("Adapters with modules_to_save are not supported by vLLM.")
    return config


def _check_base(config: dict[str, Any], base: BaseModelSpec) -> None:
    declared = str(config.get("base_model_name_or_path") or "").rstrip("/").split("/")[-1].lower()
    if declared and declared not in base.aliases:
        raise InvalidAdapter(
            f"Adapter was made for base model {config.get('base_model_name_or_path')!r}, "
            f"but this gateway serves {base.name!r}."
        )


def _pattern_matches(targets: str, paths: Iterable[str]) -> list[bool]:
    """Whether PEFT's `re.fullmatch(target_modules, path)` holds for each path: an invalid, over-long or
    too costly pattern (catastrophic backtracking) is refused as the adapter's fault."""
    if len(targets) > MAX_PATTERN_CHARS:
        raise InvalidAdapter(f"target_modules pattern is longer than {MAX_PATTERN_CHARS} characters.")
    try:
        pattern = regex.compile(targets, flags=regex.VERSION0)  # VERSION0: the `re` module's syntax
    except regex.error as exc:
        raise InvalidAdapter(f"target_modules pattern {targets!r} is not a valid regular expression: {exc}.") from None
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


def _check_tensors(folder: Path, base: BaseModelSpec, max_rank: int, config_ranks: Callable[[str], int]) -> str:
    try:
        header = read_header(folder / WEIGHTS_FILE)
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
                f"Unexpected tensor {tensor!r}: only lora_A/lora_B weights of linear modules are served."
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
        dtypes.add(str(info["dtype"]))
        ranks.setdefault(module, {})[part] = tensor_rank
    _check_pairs(ranks, config_ranks)
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


def _rank_of(rank: int, pattern: dict[str, Any], module: str) -> int:
    """A module's rank as PEFT reads `rank_pattern`: the first key that the module's name ends with (as a regex)."""
    for key, value in pattern.items():
        if isinstance(value, int) and _pattern_matches(rf"(?:.*\.)?(?:{key})", [module])[0]:
            return value
    return rank


def check_adapter(folder: Path, base: BaseModelSpec, max_rank: int) -> CheckedAdapter:
    """Raise InvalidAdapter unless the PEFT folder fits `base` and the engine's limits."""
    check_folder_safety(folder)
    config = _load_config(folder)
    _check_base(config, base)
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"adapter_config.json has an invalid rank r={rank!r}.")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapter(f"adapter_config.json has an invalid lora_alpha={alpha!r}.")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise InvalidAdapter(
            f"adapter_config.json has an invalid rank_pattern (a mapping is expected): {pattern!r:.80}."
        )
    ranks = [rank, *(v for v in pattern.values() if isinstance(v, int))]
    if max(ranks) > max_rank:
        raise InvalidAdapter(f"Adapter rank {max(ranks)} exceeds the engine's max_lora_rank {max_rank}.", param="rank")
    targets = _check_targets(config, base)
    dtype = _check_tensors(folder, base, max_rank, functools.partial(_rank_of, rank, pattern))
    return CheckedAdapter(rank=rank, alpha=float(alpha), target_modules=targets, dtype=dtype)
