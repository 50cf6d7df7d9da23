"""The retraining config: defaults that validate, YAML then flags, and clear refusals."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from training.config import RetrainConfig, load
from training.sources import from_jsonl


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
        ("foo: [1\n", [], "not valid YAML"),
        ("{1: 2, a: 3}\n", [], "unknown config fields ['1', 'a']"),
        ("split: 0.5\n", [], "split must be a list of numbers, not 0.5"),
        ("source: jsonl\njsonl_path: 5\n", [], "jsonl_path must be a string, not 5"),
        ("lora_r: 8.5\n", [], "lora_r must be a whole number, not 8.5"),
        ("epochs: 2.5\n", [], "epochs must be a whole number"),
        ("epochs: abc\n", [], "epochs must be a whole number, not 'abc'"),
        ("metrics: rouge_l\n", [], "metrics must be a list of strings, not 'rouge_l'"),
        ("target_modules: q_proj\n", [], "target_modules must be a list of strings"),
        ("learning_rate: .inf\n", [], "learning_rate must be a finite number"),
        ("", ["--learning_rate", "inf"], "learning_rate must be a finite number"),
        ("publish_margin: -10\n", [], "publish_margin must be at least 0"),
        ("", ["--canary_max_error_rate", "-5"], "canary_max_error_rate must be a share above 0"),
        ("canary_max_error_rate: 0\n", [], "canary_max_error_rate must be a share above 0 and at most 1"),
        ("canary_max_error_rate: 1.5\n", [], "canary_max_error_rate must be a share above 0 and at most 1"),
        ("canary_max_negative_rate: 0\n", [], "canary_max_negative_rate must be a share above 0"),
        ("max_regression: .nan\n", [], "max_regression must be a finite number"),
        ("canary_max_negative_rate: 2\n", [], "canary_max_negative_rate must be a share above 0"),
        ("endpoint: text\n", [], "endpoint must be 'chat', 'completions' or unset, not 'text'"),
    ],
)
def test_a_bad_config_is_refused_with_what_is_wrong(
    tmp_path: Path, yaml_text: str, flags: list[str], message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load(path, flags)


def test_a_new_runs_files_are_kept_as_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json keeps them: a later step asked from another folder was refused (not a file), or read another file."""
    (tmp_path / "reg.jsonl").write_text('{"prompt": "hi", "reference": "hello"}\n')
    (tmp_path / "c.yaml").write_text("regression_jsonl: reg.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert load(tmp_path / "c.yaml").regression_jsonl == str(tmp_path / "reg.jsonl")


def test_yaml_reads_a_learning_rate_written_without_a_dot(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string: taken as the number it spells."""
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\n")
    assert load(path).learning_rate == 1e-4


@pytest.mark.parametrize(
    ("cap", "train_examples", "epochs"),
    [(None, 10_000, 3), (480, 96, 3), (480, 160, 3), (480, 200, 2), (480, 400, 1), (480, 5_000, 1)],
)
def test_more_data_trains_fewer_whole_epochs_under_the_cap(cap: int | None, train_examples: int, epochs: int) -> None:
    config = load(None, ["--epochs", "3"] + ([] if cap is None else ["--max_examples_seen", str(cap)]))
    assert config.epochs_for(train_examples) == epochs


def test_a_run_whose_jsonl_file_went_after_its_dataset_step_goes_on(tmp_path: Path) -> None:
    """A run's config is checked again each time its run.json is read: its JSONL source, copied into its dataset
    long since, stopped every later step once it was moved ("cannot be read by this version of loragate"). A new run
    is still refused it, and the dataset step names it."""
    saved = RetrainConfig(source="jsonl", jsonl_path=str(tmp_path / "gone.jsonl"), min_examples=1)
    assert saved.jsonl_path.endswith("gone.jsonl")
    (tmp_path / "c.yaml").write_text(f"source: jsonl\njsonl_path: {tmp_path / 'gone.jsonl'}\n")
    with pytest.raises(ValueError, match="jsonl_path .* is not a file"):
        load(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="jsonl_path .* is not a file"):
        from_jsonl(tmp_path / "gone.jsonl")
