"""One dataclass drives a whole retraining run, in TRL's style: every field has a default and help
text, the whole is validated up front (`__post_init__`), and it loads from YAML and from CLI flags
(`load`, through transformers' `HfArgumentParser`, as TRL's own scripts do).

The defaults suit small data (a few hundred rated completions) on the default 135M base: a rank-8
LoRA on the attention projections, 4 epochs with early stopping on validation loss, fp32 on CPUs
without fast bf16 (training.hardware), and a candidate published only when it beats the serving
version by `publish_margin` on the primary metric without regressing on the regression set.
"""

from __future__ import annotations

import contextlib
import math
import re
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

Method = Literal["sft", "dpo", "kto"]
Source = Literal["feedback", "jsonl"]
METHODS = ("sft", "dpo", "kto")
SOURCES = ("feedback", "jsonl")
ENDPOINTS = ("chat", "completions")
METRICS = ("exact_match", "json_valid", "json_schema", "format", "rouge_l", "accuracy")
"""Eval metrics (training.evaluate): all in [0, 1], higher is better."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", _number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "list[float]": ("a list of numbers", lambda v: isinstance(v, list) and all(_number(x) for x in v)),
}
"""What each field's annotation takes (`X | None` takes None too). A YAML value of another type passed before and
failed far later (`lora_r: 8.5` inside peft, once the base had loaded), or was taken apart (`metrics: rouge_l`
as seven metric names 'r', 'o', ...)."""


def _kind(hint: Any) -> tuple[str, bool]:
    """A field's type as `_TYPES` names it, and whether it takes None."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [arg for arg in args if arg is not type(None)]
    return (hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)), optional


def type_problems(values: Mapping[str, Any]) -> list[str]:
    """Each of `values` (field: value) whose type its field does not take, said."""
    kinds = {name: _kind(hint) for name, hint in typing.get_type_hints(RetrainConfig).items()}
    problems = []
    for name, value in values.items():
        kind, optional = kinds[name]
        what, takes = _TYPES[kind]
        if not (takes(value) or (value is None and optional)):
            problems.append(f"{name} must be {what}, not {value!r:.40}")
    return problems


@dataclass
class RetrainConfig:
    """Everything one retraining run needs besides the tenant and the alias it retrains."""

    # --- data (training.dataset) ---
    source: str = _help(
        "Where examples come from: 'feedback' (the tenant's completion log) or 'jsonl'.", default="feedback"
    )
    jsonl_path: str | None = _help(
        "With source=jsonl: a file of rows in TRL's formats (messages / prompt+completion / prompt+chosen+rejected "
        "/ prompt+completion+label).",
        default=None,
    )
    endpoint: str | None = _help(
        "Only records of this endpoint ('chat' or 'completions'); all when unset.", default=None
    )
    min_examples: int = _help("Refuse to train on fewer usable training examples than this.", default=40)
    near_duplicate_threshold: float = _help(
        "Prompts whose word-shingle Jaccard similarity is at least this are near duplicates (one kept); 1.0 keeps "
        "all but exact duplicates.",
        default=0.9,
    )
    redact_pii: bool = _help("Redact e-mail, phone, card, IBAN and IP in examples before training.", default=True)
    label_pattern: str | None = _help(
        "For a classification task: a regex whose first group is an answer's label (e.g. 'SEVERITY: (P[1-4])'); "
        "labels are balanced by downsampling and `accuracy` compares them.",
        default=None,
    )
    split: list[float] = _help(
        "Train / validation / test shares; no prompt is in two.", default_factory=lambda: [0.8, 0.1, 0.1]
    )
    regression_jsonl: str | None = _help(
        "A JSONL set (prompt + completion) the candidate must not do worse on than the serving version.", default=None
    )

    # --- trainer (training.train) ---
    method: str = _help(
        "'sft' (positive answers and corrections), 'dpo' (preference pairs) or 'kto' (thumbs).", default="sft"
    )
    lora_r: int = _help("LoRA rank; at most the engine's --max-lora-rank.", default=8)
    lora_alpha: int = _help("LoRA alpha (scale = alpha / r).", default=16)
    lora_dropout: float = _help("Dropout on the LoRA input.", default=0.05)
    target_modules: list[str] = _help(
        "Modules the LoRA wraps (names in the base).", default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    epochs: int = _help("Training epochs (3-5 suit small data).", default=4)
    max_examples_seen: int | None = _help(
        "Cap on examples trained on over the run (epochs x training examples): with more data, fewer whole "
        "epochs, at least one, as OpenAI's `n_epochs: auto` does. Unset: always `epochs`.",
        default=None,
    )
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    batch_size: int = _help("Examples per step (per device).", default=8)
    max_length: int = _help("Tokens per example (longer are truncated).", default=512)
    early_stopping_patience: int = _help(
        "Stop after this many epochs without a lower validation loss; 0: never.", default=1
    )
    seed: int = _help(
        "Seed for the split, the LoRA initialisation and the data order: one seed, one result.", default=42
    )
    qlora: bool | None = _help("Train on a bitsandbytes 4-bit (NF4) base; unset: on CUDA only.", default=None)

    # --- eval gate (training.evaluate) ---
    metrics: list[str] = _help(
        f"Metrics to report, from {', '.join(METRICS)}.", default_factory=lambda: ["rouge_l", "exact_match"]
    )
    primary_metric: str = _help("The metric the publish rule uses (one of `metrics`).", default="rouge_l")
    format_regex: str | None = _help("For `format`: the regex an answer must match (fullmatch, DOTALL).", default=None)
    json_schema_path: str | None = _help("For `json_schema`: a JSON Schema file answers must satisfy.", default=None)
    publish_margin: float = _help("Publish only if primary(candidate) >= primary(current) + this.", default=0.05)
    max_regression: float = _help("... and primary on the regression set drops by at most this.", default=0.0)
    max_new_tokens: int = _help("Answer length when evaluating.", default=128)
    eval_concurrency: int = _help(
        "Requests in flight at once while evaluating (each model in turn, so latencies compare at one load).",
        default=8,
    )
    examples_in_report: int = _help("Example answers shown side by side in the eval report.", default=3)

    # --- publish and canary (training.publish) ---
    canary: bool = _help(
        "Start a canary experiment on the alias after publishing; off, the version is listed but nothing routes to it "
        "(the alias and the bare name stay where they were) until an operator points the alias at it.",
        default=True,
    )
    canary_weight: float = _help("The candidate arm's share of traffic, in percent.", default=10.0)
    canary_min_samples: int = _help("Rated completions per arm before the guard rails may promote.", default=30)
    canary_max_error_rate: float | None = _help(
        "Roll the candidate back past the current version's error rate by this much.", default=0.2
    )
    canary_max_negative_rate: float | None = _help(
        "Roll the candidate back past this share of thumbs down.", default=0.6
    )

    def __post_init__(self) -> None:
        problems = type_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise ValueError("invalid retraining config: " + "; ".join(problems))
        self.split = [float(x) for x in self.split]
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid retraining config: " + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if self.source not in SOURCES:
            yield f"source must be one of {SOURCES}, not {self.source!r}"
        if self.source == "jsonl" and not self.jsonl_path:
            yield "source=jsonl needs jsonl_path"
        if self.method not in METHODS:
            yield f"method must be one of {METHODS}, not {self.method!r}"
        if self.endpoint is not None and self.endpoint not in ENDPOINTS:  # `text` kept nothing, with a vague refusal
            yield f"endpoint must be 'chat', 'completions' or unset, not {self.endpoint!r}"
        if len(self.split) != 3 or any(x <= 0 for x in self.split) or abs(sum(self.split) - 1) > 1e-6:
            yield f"split must be three positive shares adding up to 1, not {self.split}"
        if not 0 < self.near_duplicate_threshold <= 1:
            yield "near_duplicate_threshold must be in (0, 1]"
        counts = ("min_examples", "lora_r", "lora_alpha", "epochs", "batch_size", "max_length", "max_new_tokens")
        for name in (*counts, "eval_concurrency"):
            if getattr(self, name) < 1:
                yield f"{name} must be at least 1"
        if self.max_examples_seen is not None and self.max_examples_seen < 1:
            yield "max_examples_seen must be at least 1 (or unset)"
        if not 0 <= self.lora_dropout < 1:
            yield "lora_dropout must be in [0, 1)"
        if not self.learning_rate > 0:
            yield "learning_rate must be positive"
        for name in ("publish_margin", "max_regression"):
            if (value := getattr(self, name)) is not None and value < 0:
                yield f"{name} must be at least 0 (below it, a worse candidate would pass)"
        for name in ("canary_max_error_rate", "canary_max_negative_rate"):  # as the experiment takes them
            if (value := getattr(self, name)) is not None and not 0 < value <= 1:
                yield f"{name} must be a share above 0 and at most 1 (or unset)"
        if not self.target_modules:
            yield "target_modules must name at least one module"
        yield from self._eval_problems()
        if not 0 < self.canary_weight < 100:
            yield "canary_weight must be a percentage strictly between 0 and 100"
        if self.canary_min_samples < 10:
            yield "canary_min_samples must be at least 10 (an experiment's smallest sample)"

    def _eval_problems(self) -> Iterator[str]:
        """What the eval gate's metrics need (known metrics, their patterns), and the files the config names."""
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            yield f"unknown metrics {unknown}; known: {list(METRICS)}"
        if self.primary_metric not in self.metrics:
            yield f"primary_metric {self.primary_metric!r} must be one of metrics {self.metrics}"
        if "format" in self.metrics and not self.format_regex:
            yield "metric 'format' needs format_regex"
        if "json_schema" in self.metrics and not self.json_schema_path:
            yield "metric 'json_schema' needs json_schema_path"
        if "accuracy" in self.metrics and not self.label_pattern:
            yield "metric 'accuracy' needs label_pattern"
        for name in ("format_regex", "label_pattern"):
            pattern = getattr(self, name)
            if pattern:
                try:
                    compiled = re.compile(pattern)
                except re.error as exc:
                    yield f"{name} is not a valid regex: {exc}"
                    continue
                if name == "label_pattern" and compiled.groups < 1:
                    yield "label_pattern needs a group, the label"
        for name in ("regression_jsonl", "json_schema_path"):  # read by every eval of the run
            path = getattr(self, name)
            if path and not Path(path).is_file():
                yield f"{name} {path!r} is not a file"

    def epochs_for(self, train_examples: int) -> int:
        """The whole epochs a run on `train_examples` trains: `epochs`, fewer where `max_examples_seen` caps it."""
        if self.max_examples_seen is None:
            return self.epochs
        return max(1, min(self.epochs, self.max_examples_seen // max(train_examples, 1)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for provenance and reports."""
        return asdict(self)


def load(yaml_path: str | Path | None = None, flags: Sequence[str] = ()) -> RetrainConfig:
    """A config from defaults, then a YAML file, then CLI flags (`--learning_rate 1e-4`), each over the last.

    Unknown keys in the YAML and unknown flags are errors (ValueError), not silently ignored.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(RetrainConfig)  # type: ignore[arg-type]
    if yaml_path is not None:
        parser.set_defaults(**_yaml_fields(Path(yaml_path)))
    try:
        config, extra = parser.parse_args_into_dataclasses(args=list(flags), return_remaining_strings=True)
    except SystemExit as exc:  # argparse's way of reporting a bad flag value (it has printed why)
        raise ValueError(f"invalid config flags {list(flags)}") from exc
    if extra:
        raise ValueError(f"unknown config flags {extra}")
    assert isinstance(config, RetrainConfig)
    if config.jsonl_path and not Path(config.jsonl_path).is_file():  # a new run's: read by its dataset step only,
        raise ValueError(f"invalid retraining config: jsonl_path {config.jsonl_path!r} is not a file")  # not later
    for name in ("jsonl_path", "regression_jsonl", "json_schema_path"):  # run.json keeps them: a later step of the
        if path := getattr(config, name):  # run, asked from another folder, read another file or none at all
            setattr(config, name, str(Path(path).absolute()))
    return config


def _yaml_fields(path: Path) -> dict[str, Any]:
    """The fields a YAML config sets, each of the type its field takes (checked here, not left to argparse, which
    converted a string such as `epochs: abc` and then blamed the command's flags)."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a retraining config is a mapping of field: value")
    known = {f.name for f in fields(RetrainConfig)}
    unknown = sorted(str(key) for key in loaded if key not in known)
    if unknown:
        raise ValueError(f"{path}: unknown config fields {unknown}")
    for name, hint in typing.get_type_hints(RetrainConfig).items():
        if _kind(hint)[0] == "float" and isinstance(loaded.get(name), str):  # YAML 1.1 reads `1e-4` as a string
            with contextlib.suppress(ValueError):
                loaded[name] = float(loaded[name])
    problems = type_problems(loaded)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return loaded
