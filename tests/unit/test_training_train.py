"""The trainer on the real base: a tiny SFT run learns a fixed answer format and its adapter passes the
registry's check; early stopping keeps the best epoch; DPO and KTO train; what the engine could not serve is
refused before any training. A run's mechanics (an interrupted run resumes to the very same adapter, a stop ends
it with no adapter) are tested on SmolLM2 in miniature, whose steps take milliseconds.

The real-base runs are tiny (8 examples of about 40 tokens, 2 steps an epoch, about 1.5 s a step on a quiet
2-core AVX2 machine); one SFT run is shared by the tests that only read its result.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import training.train as train_module
from adapters.validate import BaseModelSpec, check_adapter
from training.config import RetrainConfig
from training.epochs import EpochLoss, best_epoch, epoch_losses
from training.hardware import choose_precision
from training.train import TrainingRefused, TrainingStopped, TrainResult, stopping, train

SERVICES = ("nginx", "postgres", "redis", "kafka", "api", "worker", "cron", "auth", "billing", "search", "mail", "dns")
SYSTEM = "Triage the alert."


def alert(i: int) -> str:
    return f"{SERVICES[i % len(SERVICES)]} down on h{i}"


def answer(i: int) -> str:
    return f"SEVERITY: P2 / ACTION: restart {SERVICES[i % len(SERVICES)]}"


def chat_row(i: int, completion: str | None = None) -> dict[str, Any]:
    """Conversational prompt-completion, as the dataset builder writes chat feedback."""
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": alert(i)}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": completion or answer(i)}]}


def text_row(i: int, completion: str | None = None) -> dict[str, Any]:
    """Plain-text prompt-completion, as the dataset builder writes /v1/completions feedback."""
    return {"prompt": f"Alert: {alert(i)}\n", "completion": completion or answer(i)}


def dpo_row(i: int) -> dict[str, Any]:
    prompt = text_row(i)["prompt"]
    return {"prompt": prompt, "chosen": answer(i), "rejected": f"Maybe look at {SERVICES[i % len(SERVICES)]}?"}


def write_dataset(folder: Path, train_rows: list[dict[str, Any]], validation_rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("validation", validation_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def tiny(**overrides: Any) -> RetrainConfig:
    values: dict[str, Any] = dict(epochs=3, batch_size=4, max_length=64, learning_rate=3e-3, seed=7)
    return RetrainConfig(**(values | overrides))


def tensors(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


@dataclass
class Run:
    result: TrainResult
    lines: list[str]


@pytest.fixture(scope="module", autouse=True)
def one_thread_beside_vllm() -> Iterator[None]:
    """Under pytest-xdist (`make test`) torch trains on one thread here: the other worker's vLLM replicas bind
    their OpenMP threads to the cores and spin between requests, and a 2-thread trainer's parallel regions wait on
    whichever of its threads shares a core with them. Measured on the AVX2 kind: the sft run, 16 s alone, had not
    ended after 180 s beside one replica answering requests one after another; on one thread it took 39 s."""
    before = torch.get_num_threads()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [chat_row(i) for i in range(12)]
    return write_dataset(tmp_path_factory.mktemp("sft-data"), rows[:8], rows[8:])


@pytest.fixture(scope="module")
def small_base_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 in miniature, for the tests of a run's mechanics: its config, tokenizer and chat template, with 2
    layers of width 64 and random (seeded) weights, which learn nothing in a few steps (early stopping and DPO
    and KTO are tested on the real base), but stop, checkpoint and resume as it does: those tests took 13-29 s
    each of a suite on the real base (AVX2 kind), 1-3 s on this."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("small-base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base_model_dir / name).exists():
            shutil.copy(base_model_dir / name, folder / name)
    config = AutoConfig.from_pretrained(base_model_dir)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    config.update(shape | {"num_key_value_heads": 2})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_run(small_base_dir: Path, sft_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train(tiny(), sft_data, small_base_dir, tmp_path_factory.mktemp("small-run"))


@pytest.fixture(scope="module")
def sft_run(base_model_dir: Path, sft_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    lines: list[str] = []
    result = train(tiny(), sft_data, base_model_dir, tmp_path_factory.mktemp("sft-run"), progress=lines.append)
    print(
        f"\nSFT throughput: {result.examples_per_s:.2f} examples/s, {result.tokens_per_s:.0f} tokens/s "
        f"({result.train_seconds:.1f} s in training epochs, {result.wall_seconds:.1f} s in all)"
    )
    return Run(result, lines)


def test_sft_learns_the_answer_format(sft_run: Run) -> None:
    result = sft_run.result
    assert [e.epoch for e in result.epochs] == [1, 2, 3]
    train_losses = [float(e.train_loss or "nan") for e in result.epochs]
    validation_losses = [float(e.validation_loss or "nan") for e in result.epochs]
    assert train_losses[-1] < train_losses[0] / 2, train_losses
    assert validation_losses == sorted(validation_losses, reverse=True), validation_losses
    assert validation_losses[-1] < validation_losses[0] / 2, validation_losses
    assert result.best_epoch == result.adapter_epoch == 3
    assert not result.early_stopped


def test_sft_result_describes_the_run(sft_run: Run) -> None:
    result = sft_run.result
    precision = choose_precision()
    assert (result.method, result.steps, result.train_examples) == ("sft", 6, 8)
    assert (result.device, result.dtype, result.qlora) == ("cpu", str(precision.dtype).removeprefix("torch."), False)
    assert result.examples_per_s > 0 and result.tokens_per_s > 20 * result.examples_per_s
    assert 0 < result.train_seconds < result.wall_seconds
    assert result.resumed_from is None
    assert json.loads(json.dumps(result.to_dict()))["epochs"][0]["epoch"] == 1
    assert len(sft_run.lines) == 4  # what is trained, then one line per epoch
    for epoch, line in enumerate(sft_run.lines[1:], 1):
        assert re.fullmatch(rf"epoch {epoch}/3: train loss \d+\.\d{{4}}, validation loss \d+\.\d{{4}}", line), line


def test_adapter_passes_the_registry_check(sft_run: Run, base_spec: BaseModelSpec) -> None:
    folder = sft_run.result.adapter_dir
    assert folder.name == "adapter" and (folder.parent / "checkpoints").is_dir()
    checked = check_adapter(folder, base_spec, max_rank=16)
    assert checked.rank == 8 and sorted(checked.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert checked == sft_run.result.adapter
    weights = tensors(sft_run.result)
    assert len(weights) == 30 * 4 * 2  # 30 layers, 4 modules, A and B
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().max() > 0 for name, t in weights.items() if "lora_B" in name)  # B starts at zero


class Interrupted(Exception):
    pass


def stop_after_first_epoch(line: str) -> None:
    if line.startswith("epoch 1/"):
        raise Interrupted(line)


def test_an_interrupted_run_resumes_to_the_same_adapter(
    small_run: TrainResult, small_base_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    """A second run with the same seed, killed after epoch 1's checkpoint and resumed, gives the uninterrupted
    run's adapter bit for bit: the LoRA init, data order and dropout all follow the seed, and a checkpoint
    carries the optimizer, scheduler and RNG states. (fp32 on CPU with the same thread count is exact.)"""
    with pytest.raises(Interrupted):
        train(tiny(), sft_data, small_base_dir, tmp_path, progress=stop_after_first_epoch)
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]

    lines: list[str] = []
    result = train(tiny(), sft_data, small_base_dir, tmp_path, resume=True, progress=lines.append)
    assert lines[0].endswith("resuming from checkpoint-2")
    assert [line.split(":")[0] for line in lines[1:]] == ["epoch 2/3", "epoch 3/3"]  # epoch 1 is not retrained
    assert result.resumed_from == tmp_path / "checkpoints" / "checkpoint-2"
    assert result.steps == 6 and result.epochs == small_run.epochs
    resumed, uninterrupted = tensors(result), tensors(small_run)
    assert resumed.keys() == uninterrupted.keys()
    assert any(t.abs().max() > 0 for name, t in uninterrupted.items() if "lora_B" in name), "B moved from zero"
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_a_stop_ends_training_at_a_steps_end_with_no_adapter(
    small_base_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    """SIGTERM or Ctrl-C reach the training thread through `stop` (training.retrain sets it): set once epoch 1's
    checkpoint is written, training ends one step into epoch 2, with no adapter and no checkpoint of the epoch it
    cut, so that `resume` goes on from epoch 1's."""
    stop = threading.Event()

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            stop.set()

    with pytest.raises(TrainingStopped, match="training stopped at step 3, no adapter written"):
        train(tiny(), sft_data, small_base_dir, tmp_path, progress=stop_after_first_epoch, stop=stop)
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_stop_during_an_epochs_evaluation_ends_it_with_no_checkpoint_of_that_epoch(
    small_base_dir: Path, sft_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while epoch 1 is evaluated (as long as a step or more on a large validation split): the evaluation
    ends at its next batch, and nothing of epoch 1 is kept (no checkpoint, no adapter)."""
    stop, real = threading.Event(), train_module.stopping

    def sigterm_in_the_evaluation(event: threading.Event) -> Any:
        callback = real(event)
        stops = callback.on_prediction_step

        def on_prediction_step(*args: Any, **kwargs: Any) -> Any:
            event.set()
            return stops(*args, **kwargs)

        callback.on_prediction_step = on_prediction_step  # type: ignore[method-assign]
        return callback

    monkeypatch.setattr(train_module, "stopping", sigterm_in_the_evaluation)
    with pytest.raises(TrainingStopped, match="stopped during the evaluation after step 2, no adapter written"):
        train(tiny(), sft_data, small_base_dir, tmp_path, stop=stop)
    assert not (tmp_path / "adapter").exists() and not list((tmp_path / "checkpoints").glob("checkpoint-*"))


def test_the_stopping_callback_overrides_the_epochs_evaluation_and_checkpoint() -> None:
    from transformers import TrainerControl

    stop = threading.Event()
    callback, control = stopping(stop), TrainerControl(should_evaluate=True, should_save=True)
    assert not callback.on_step_end(None, None, control).should_training_stop
    assert callback.on_prediction_step(None, None, control) is control, "an evaluation goes on until then"
    stop.set()
    stopped = callback.on_epoch_end(None, None, control)
    assert stopped.should_training_stop and not (stopped.should_evaluate or stopped.should_save)
    with pytest.raises(TrainingStopped, match="during the evaluation"):
        callback.on_prediction_step(None, types.SimpleNamespace(global_step=4), control)


def test_early_stopping_keeps_the_best_epoch(base_model_dir: Path, tmp_path: Path) -> None:
    """Validation answers unlike the trained ones: validation loss rises in epoch 2, training stops there (patience
    1) and the adapter is epoch 1's, not the last."""
    refusals = [text_row(i, "I cannot help with that.") for i in range(8, 12)]
    data = write_dataset(tmp_path / "data", [text_row(i) for i in range(8)], refusals)
    config = tiny(learning_rate=1e-2, early_stopping_patience=1)
    result = train(config, data, base_model_dir, tmp_path / "run")
    assert result.early_stopped and [e.epoch for e in result.epochs] == [1, 2]
    assert result.epochs[1].validation_loss > result.epochs[0].validation_loss  # type: ignore[operator]
    assert result.best_epoch == result.adapter_epoch == 1
    best, last = (
        load_file(str(tmp_path / f"run/checkpoints/checkpoint-{step}/adapter_model.safetensors")) for step in (2, 4)
    )
    kept = tensors(result)
    assert all(torch.equal(kept[name], best[name]) for name in kept)
    assert not all(torch.equal(kept[name], last[name]) for name in kept)


def kto_row(i: int) -> dict[str, Any]:
    """Thumbs: even rows up (the answer format), odd rows down (a useless answer)."""
    return {**text_row(i), "label": True} if i % 2 == 0 else {**text_row(i, "No idea."), "label": False}


@pytest.mark.parametrize(
    ("method", "row", "untrained_loss"),
    [("dpo", dpo_row, math.log(2)), ("kto", kto_row, 0.5)],  # sigmoid losses at a zero reward margin
    ids=["dpo", "kto"],
)
def test_preference_methods_train_servable_adapters(
    base_model_dir: Path,
    base_spec: BaseModelSpec,
    tmp_path: Path,
    method: str,
    row: Callable[[int], dict[str, Any]],
    untrained_loss: float,
) -> None:
    rows = [row(i) for i in range(12)]
    data = write_dataset(tmp_path / "data", rows[:8], rows[8:])
    config = tiny(method=method, epochs=1, lora_r=4, target_modules=["q_proj", "v_proj"])
    result = train(config, data, base_model_dir, tmp_path / "run")
    assert (result.method, result.steps, [e.epoch for e in result.epochs]) == (method, 2, [1])
    validation_loss = result.epochs[0].validation_loss
    assert validation_loss is not None and validation_loss < untrained_loss - 0.05
    assert check_adapter(result.adapter_dir, base_spec, max_rank=16).rank == 4


@pytest.mark.parametrize(
    ("overrides", "max_rank", "message"),
    [
        ({"lora_r": 32}, 16, "lora_r 32 is above the engine's max_lora_rank 16"),
        ({"lora_r": 8}, 4, "lora_r 8 is above the engine's max_lora_rank 4"),
        ({"target_modules": ["q_proj", "qkv_proj"]}, 16, r"target_modules \['qkv_proj'\] do not exist"),
    ],
)
def test_what_the_engine_cannot_serve_is_refused_before_training(
    base_model_dir: Path, sft_data: Path, tmp_path: Path, overrides: dict[str, Any], max_rank: int, message: str
) -> None:
    with pytest.raises(TrainingRefused, match=message):
        train(tiny(**overrides), sft_data, base_model_dir, tmp_path, max_rank=max_rank)
    assert list(tmp_path.iterdir()) == []


def test_qlora_without_bitsandbytes_is_refused(
    monkeypatch: pytest.MonkeyPatch, base_model_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(TrainingRefused, match="qlora needs bitsandbytes"):
        train(tiny(qlora=True), sft_data, base_model_dir, tmp_path)


def test_rows_the_method_cannot_read_are_refused(base_model_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingRefused, match=r"train.jsonl:1 lacks \['chosen', 'rejected'\]"):
        train(tiny(method="dpo"), sft_data, base_model_dir, tmp_path)
    empty = write_dataset(tmp_path / "empty", [chat_row(0)], [])
    with pytest.raises(TrainingRefused, match="validation.jsonl holds no examples"):
        train(tiny(), empty, base_model_dir, tmp_path)


def tool_row(i: int, arguments: object) -> dict[str, Any]:
    """A conversation whose earlier turn called a tool, with the tools it declared (JSON, as the builder writes)."""
    call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
    prompt = [
        {"role": "user", "content": alert(i)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "restarted twice today", "tool_call_id": f"call_{i}"},
    ]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer(i)}], "tools": json.dumps(tools)}


def test_conversations_with_tool_calls_train_as_they_were_written(small_base_dir: Path, tmp_path: Path) -> None:
    """Arrow gave a column one schema for all its rows: one call's arguments gained every other call's keys as None
    (`{"days": 3, "host": None}`: a call the model never made, which TRL does not strip), and two rows giving an
    argument two types (`5`, `"5"`), or arguments that are no object, failed the run at its fit. And the tools a
    prompt was asked with were dropped, though serving and the eval ask with them."""
    rows = [tool_row(i, {"host": f"h{i}"}) for i in range(4)] + [tool_row(4, {"days": 3}), tool_row(5, {"days": "3"})]
    rows += [tool_row(6, "not an object"), chat_row(7)]
    data = write_dataset(tmp_path / "tools", rows[:6], rows[6:])
    loaded = train_module.load_split(data, "train", "sft")
    assert [row["prompt"] for row in loaded] == [row["prompt"] for row in rows[:6]], "every row as it was written"
    assert loaded[0]["tools"] == rows[0]["tools"]
    validation = train_module.load_split(data, "validation", "sft")
    assert validation[0]["prompt"][1]["tool_calls"][0]["function"]["arguments"] == "not an object"
    assert validation[1]["tools"] is None and "tool_calls" not in validation[1]["prompt"][1]
    result = train(tiny(epochs=1), data, small_base_dir, tmp_path / "run")
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_text_rows_load_as_the_strings_they_are(tmp_path: Path) -> None:
    """A text completion's prompt and answer are strings: loaded as JSON, an answer " 4" became the number 4, one
    that is a JSON object text a dict, and "null" nothing."""
    rows = [
        {"prompt": "2+2 =", "completion": " 4"},
        {"prompt": "Alert as JSON:", "completion": '{"severity": "high"}'},
        {"prompt": "null", "completion": "null"},
    ]
    data = write_dataset(tmp_path / "text", rows, rows[:1])
    loaded = train_module.load_split(data, "train", "sft")
    assert [(row["prompt"], row["completion"]) for row in loaded] == [(r["prompt"], r["completion"]) for r in rows]


def test_epoch_losses_pair_each_epochs_train_and_validation_loss() -> None:
    history = [
        {"loss": 2.0, "epoch": 1.0, "step": 2},
        {"eval_loss": 1.5, "epoch": 1.0, "step": 2},
        {"loss": 1.0, "epoch": 2.0, "step": 4},
        {"eval_loss": 0.9, "epoch": 2.0, "step": 4},
        {"train_runtime": 3.0, "epoch": 2.0, "step": 4},
    ]
    epochs = epoch_losses(history)
    assert [(e.epoch, e.train_loss, e.validation_loss) for e in epochs] == [(1, 2.0, 1.5), (2, 1.0, 0.9)]
    assert best_epoch(epochs) == 2
    assert best_epoch((EpochLoss(1, 2.0, 0.5), EpochLoss(2, 1.0, 0.5), EpochLoss(3, 0.5, 0.7))) == 1  # ties: first
    assert best_epoch((EpochLoss(1, 2.0, None),)) is None


def test_a_max_length_that_leaves_no_answer_is_refused_before_training(
    small_base_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    """TRL drops examples whose answer `max_length` cuts away entirely: all of them at 16 tokens here (the chat
    template's default system prompt alone is longer), where torch failed with `num_samples=0`."""
    with pytest.raises(TrainingRefused, match="all 8 training examples are longer than max_length=16"):
        train(tiny(max_length=16), sft_data, small_base_dir, tmp_path / "run")


def test_a_validation_split_max_length_empties_is_refused_before_training(small_base_dir: Path, tmp_path: Path) -> None:
    """TRL drops the validation examples max_length leaves no answer in too: with all of them gone, the first epoch
    trained, then its evaluation had no eval_loss and early stopping failed on a KeyError."""
    long = [chat_row(i) for i in range(8, 12)]
    for row in long:
        row["prompt"][1]["content"] += " " + "details " * 80  # past max_length=64 before the answer begins
    data = write_dataset(tmp_path / "data", [chat_row(i) for i in range(8)], long)
    with pytest.raises(TrainingRefused, match="all 4 validation examples are longer than max_length=64"):
        train(tiny(), data, small_base_dir, tmp_path / "run")


def test_a_resumed_run_restores_early_stoppings_patience(tmp_path: Path) -> None:
    """transformers restores callbacks' state only when asked: a resumed run's patience began again at 0, and it
    trained more epochs than the run it resumed would have."""
    precision = choose_precision()
    assert train_module.trainer_args(tiny(), tmp_path, precision, 3).restore_callback_states_from_checkpoint
    off = tiny(early_stopping_patience=0)
    assert not train_module.trainer_args(off, tmp_path, precision, 3).restore_callback_states_from_checkpoint
