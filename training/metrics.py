"""The eval gate's answer metrics (`RetrainConfig.metrics`): each scores one answer against its
reference in [0, 1], higher is better; `metric_means` averages the configured ones over a set.

An answer that failed (an error, scored as the empty string) is a wrong answer on every metric.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from training.config import RetrainConfig

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

Metric = Callable[[str, str, RetrainConfig], float]
"""(answer, reference, config) -> score in [0, 1]."""

FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)
"""A Markdown code fence (```json ... ```) around the whole answer."""
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
"""A ROUGE token: one Han or kana character, or a run of other word characters."""


def _needs(config: RetrainConfig, name: str, metric: str) -> str:
    value: str | None = getattr(config, name)
    if not value:
        raise ValueError(f"metric {metric!r} needs {name}")
    return value


def unfenced(answer: str) -> str:
    """The answer without a code fence wrapped around all of it."""
    text = answer.strip()
    match = FENCE.fullmatch(text)
    return match.group(1).strip() if match else text


def parse_json(answer: str) -> tuple[bool, Any]:
    """(True, value) when the answer, fenced or not, is one JSON value; (False, None) otherwise (NaN and Infinity
    too, which Python's json reads and JSON has not)."""
    try:
        return True, json.loads(unfenced(answer), parse_constant=_not_json)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError; nested too deep is no answer
        return False, None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def exact_match(answer: str, reference: str, config: RetrainConfig) -> float:
    return float(answer.strip() == reference.strip())


def json_valid(answer: str, reference: str, config: RetrainConfig) -> float:
    return float(parse_json(answer)[0])


def load_schema_validator(config: RetrainConfig) -> Any:
    """The validator of the schema at `json_schema_path`; ValueError for a schema that is not one."""
    import jsonschema

    path = _needs(config, "json_schema_path", "json_schema")
    try:
        schema = json.loads(Path(path).read_text())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"json_schema_path {path!r} is not JSON: {exc}") from exc
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"json_schema_path {path!r} is not a valid JSON Schema: {exc.message}") from exc
    return cls(schema)


def _schema_valid(validator: Any, answer: str) -> float:
    parsed, value = parse_json(answer)
    if not parsed:
        return 0.0
    try:
        return float(validator.is_valid(value))
    except Exception as exc:  # a `$ref` it cannot resolve (referencing's errors are no ValueError): the schema's fault
        raise ValueError(f"json_schema_path's schema cannot be applied to an answer: {exc!r:.300}") from exc


def json_schema(answer: str, reference: str, config: RetrainConfig) -> float:
    return _schema_valid(load_schema_validator(config), answer)


def format_match(answer: str, reference: str, config: RetrainConfig) -> float:
    """`format`: the stripped answer matches `format_regex` whole (re.fullmatch, DOTALL)."""
    pattern = _needs(config, "format_regex", "format")
    return float(re.fullmatch(pattern, answer.strip(), re.DOTALL) is not None)


class WordTokenizer:
    """ROUGE tokens: lower-cased Unicode words, and each Han or kana character on its own (those scripts
    put no spaces between words). rouge-score's own tokenizer keeps only a-z and 0-9, so it would give
    two identical answers in Japanese or Greek a score of 0."""

    def tokenize(self, text: str) -> list[str]:
        return TOKEN.findall(text.lower())


def rouge_l_scorer() -> RougeScorer:
    from rouge_score.rouge_scorer import RougeScorer  # imports nltk: seconds, so only when scoring

    return RougeScorer(["rougeL"], tokenizer=WordTokenizer())


def _rouge_l(scorer: RougeScorer, answer: str, reference: str) -> float:
    return float(scorer.score(reference, answer)["rougeL"].fmeasure)


def rouge_l(answer: str, reference: str, config: RetrainConfig) -> float:
    """ROUGE-L F-measure over `WordTokenizer`'s tokens."""
    return _rouge_l(rouge_l_scorer(), answer, reference)


def label(text: str, pattern: str) -> str | None:
    """The first group of `pattern`'s first match in the text, stripped; None without a match."""
    match = re.search(pattern, text)
    found = match.group(1) if match else None
    return found.strip() if found is not None else None


def accuracy(answer: str, reference: str, config: RetrainConfig) -> float:
    """1 when the answer's label is the reference's; a missing label on either side is a miss."""
    pattern = _needs(config, "label_pattern", "accuracy")
    expected = label(reference, pattern)
    return float(expected is not None and label(answer, pattern) == expected)


METRIC_FUNCTIONS: Mapping[str, Metric] = MappingProxyType(
    {
        "exact_match": exact_match,
        "json_valid": json_valid,
        "json_schema": json_schema,
        "format": format_match,
        "rouge_l": rouge_l,
        "accuracy": accuracy,
    }
)
"""Every metric of `training.config.METRICS`, by its config name."""


def metric_values(name: str, answers: Sequence[str], references: Sequence[str], config: RetrainConfig) -> list[float]:
    """One metric on each answer; the ROUGE scorer and the schema validator are built once per batch."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if name == "rouge_l":
        scorer = rouge_l_scorer()
        return [_rouge_l(scorer, a, r) for a, r in zip(answers, references, strict=True)]
    if name == "json_schema":
        validator = load_schema_validator(config)
        return [_schema_valid(validator, a) for a in answers]
    metric = METRIC_FUNCTIONS[name]
    return [metric(a, r, config) for a, r in zip(answers, references, strict=True)]


def metric_means(answers: Sequence[str], references: Sequence[str], config: RetrainConfig) -> dict[str, float]:
    """The mean of each of `config.metrics` over the set; 0.0 for an empty set."""
    means = {}
    for name in config.metrics:
        values = metric_values(name, answers, references, config)
        means[name] = sum(values) / len(values) if values else 0.0
    return means
