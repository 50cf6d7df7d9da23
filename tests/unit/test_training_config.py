"""The retraining config: defaults that validate, YAML then flags, and clear refusals."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from training.config import RetrainConfig, load


def test_every_field_has_a_default_and_help_and_the_defaults_validate() -> None:
    config = RetrainConfig()
    assert all(f.metadata.get("help") for f in fields(RetrainConfig))
    assert config.split == [0.8, 0.1, 0.1] and config.primary_metric in config.metrics
    assert config.to_dict()["lora_r"] == 8


def test_yaml_then_flags_each_over_the_last(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.001\nmetrics: [format, accuracy]\nprimary_metric: format\n"
                    "format_regex: 'A: .+'\nlabel_pattern: 'A: (.+)'\n")  # fmt: skip
    config = load(path, ["--epochs", "5", "--canary", "false", "--target_modules", "q_proj", "v_proj"])
    assert (config.epochs, config.learning_rate, config.canary) == (5, 0.001, False)
    assert config.metrics == ["format", "accuracy"] and config.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("bogus: 1\n", [], "unknown config fields ['bogus']"),
        ("", ["--bogus", "1"], "unknown config flags"),
        ("", ["--epochs", "many"], "invalid config flags"),
        ("method: ppo\n", [], "method must be one of"),
        ("metrics: [format]\nprimary_metric: format\n", [], "metric 'format' needs format_regex"),
        ("split: [0.5, 0.5, 0.5]\n", [], "split must be three positive shares"),
        ("label_pattern: 'P[1-4]'\nmetrics: [accuracy]\nprimary_metric: accuracy\n", [], "label_pattern needs a group"),
        ("format_regex: '(['\n", [], "format_regex is not a valid regex"),
        ("canary_min_samples: 5\n", [], "canary_min_samples must be at least 10"),
        ("max_examples_seen: 0\n", [], "max_examples_seen must be at least 1"),
        ("source: jsonl\n", [], "source=jsonl needs jsonl_path"),
        ("jsonl_path: /nonexistent.jsonl\n", [], "is not a file"),
        ("- a\n- b\n", [], "a mapping of field: value"),
    ],
)
def test_a_bad_config_is_refused_with_what_is_wrong(
    tmp_path: Path, yaml_text: str, flags: list[str], message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load(path, flags)


@pytest.mark.parametrize(
    ("cap", "train_examples", "epochs"),
    [(None, 10_000, 3), (480, 96, 3), (480, 160, 3), (480, 200, 2), (480, 400, 1), (480, 5_000, 1)],
)
def test_more_data_trains_fewer_whole_epochs_under_the_cap(cap: int | None, train_examples: int, epochs: int) -> None:
    config = load(None, ["--epochs", "3"] + ([] if cap is None else ["--max_examples_seen", str(cap)]))
    assert config.epochs_for(train_examples) == epochs
