"""Trains one LoRA adapter on the serving base from a built dataset folder, with TRL's trainers.

`train` is synchronous and holds the CPU (or GPU) for minutes: callers run it in a thread or a
subprocess, never on an event loop, and stop it early through a `threading.Event` (a thread cannot be
cancelled; the trainer checks it at each step's end and each evaluation batch). It refuses up front what the
engine could not serve (a rank above --max-lora-rank, modules the base lacks), trains with per-epoch validation,
early stopping and a checkpoint per epoch in RUN_DIR/checkpoints (`resume=True` continues from the last one), and
writes RUN_DIR/adapter only after the registry's own check (adapters.validate) accepts it.

Hardware: on CUDA the base is loaded in bitsandbytes 4-bit NF4 (QLoRA) unless `qlora` is False;
on CPU it is plain LoRA in the dtype training.hardware picks (fp32 on AVX2-only CPUs).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.manifest import InvalidAdapter
from adapters.staging import staged_folder
from adapters.validate import BaseModelSpec, CheckedAdapter, check_adapter
from gateway.settings import Settings
from training.config import RetrainConfig
from training.epochs import EpochLoss, EpochWatch, as_trainer_callback, best_epoch, epoch_losses
from training.hardware import Precision, choose_precision

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

Progress = Callable[[str], None]

DEFAULT_MAX_RANK: int = Settings.model_fields["max_lora_rank"].default
"""The engine's --max-lora-rank unless the caller passes the deployment's own."""

COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
"""The columns each method reads from the dataset builder's rows (TRL's formats), and `tools` (the JSON of the tools a
chat prompt was asked with, None for the others: TRL's trainers pass them to the chat template, as serving and the
eval do); other columns are dropped."""

SPLITS = ("train", "validation")
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


class TrainingError(RuntimeError):
    """Training failed, or its adapter failed the registry's checks; the message says why."""


class TrainingRefused(TrainingError):
    """Refused before any training: the config, the data or the machine cannot make a servable adapter."""


class TrainingStopped(TrainingError):
    """Stopped on request (`stop` set) at a step's end (or an evaluation batch's): no adapter written; the checkpoints
    of the epochs done stay."""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    method: str
    epochs: tuple[EpochLoss, ...]
    """Every epoch trained so far, resumed ones included, in order."""
    best_epoch: int | None
    """The epoch with the lowest validation loss."""
    adapter_epoch: int
    """The epoch whose weights the adapter holds: the best one when early stopping is on, else the last."""
    early_stopped: bool
    steps: int
    """Optimizer steps in the whole run, resumed ones included."""
    train_examples: int
    examples_per_s: float
    tokens_per_s: float
    """Training throughput of this call: examples (non-padding tokens) per second inside training epochs
    (evaluation, checkpointing and loading excluded)."""
    train_seconds: float
    wall_seconds: float
    """This call from start to end: loading, training, evaluation, checkpoints and the adapter check."""
    device: str
    dtype: str
    qlora: bool
    resumed_from: Path | None
    adapter: CheckedAdapter

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for run records and benchmarks."""
        result = asdict(self)
        result["adapter_dir"] = str(self.adapter_dir)
        result["epochs"] = list(result["epochs"])  # asdict keeps the tuple; JSON and run records hold a list
        result["resumed_from"] = str(self.resumed_from) if self.resumed_from else None
        return result


def check_limits(config: RetrainConfig, base: BaseModelSpec, max_rank: int) -> None:
    """Refuse a LoRA the engine could not load: rank above its max, or modules the base does not have."""
    if config.lora_r > max_rank:
        raise TrainingRefused(f"lora_r {config.lora_r} is above the engine's max_lora_rank {max_rank}.")
    missing = sorted(set(config.target_modules) - base.module_names)
    if missing:
        raise TrainingRefused(
            f"target_modules {missing} do not exist in {base.name} (it has {sorted(base.module_names)})."
        )


def use_qlora(config: RetrainConfig, precision: Precision) -> bool:
    """QLoRA when asked for, or by default on CUDA; refused without bitsandbytes."""
    wanted = config.qlora if config.qlora is not None else precision.device == "cuda"
    if wanted:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise TrainingRefused(
                "qlora needs bitsandbytes, which is not installed here: install it (the cuda or cpu-bnb extra) "
                "or set qlora to false to train plain LoRA."
            ) from exc
    return wanted


def _read_rows(path: Path, method: str) -> Iterator[dict[str, Any]]:
    columns = COLUMNS[method]
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TrainingRefused(f"{path}:{number} is not JSON: {exc}") from exc
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        if missing:
            raise TrainingRefused(f"{path}:{number} lacks {missing}: method {method} needs rows with {list(columns)}.")
        tools = row.get("tools")
        yield {c: row[c] for c in columns} | {"tools": tools if isinstance(tools, str) else None}


def load_split(dataset_dir: Path, split: str, method: str) -> Dataset:
    """One split of a built dataset folder, reduced to the columns `method` trains on; never empty. Each row's
    prompt and answers are kept as JSON (`datasets.Json`), exactly as written: Arrow's own types give every row of a
    column one schema, so that the arguments of one row's tool call gained the keys of every other row's as None
    (which TRL does not strip: the model learned calls it never made), and two rows giving one argument two types
    (`5`, `"5"`) failed the whole run at the fit."""
    from datasets import Dataset, Features, Value

    path = dataset_dir / f"{split}.jsonl"
    if not path.is_file():
        raise TrainingRefused(f"{path} is missing: the dataset folder needs {[s + '.jsonl' for s in SPLITS]}.")
    rows = list(_read_rows(path, method))
    if not rows:
        raise TrainingRefused(f"{path} holds no examples; training needs a {split} split.")
    kinds = {column: _feature(column, rows) for column in COLUMNS[method]}
    return Dataset.from_list(rows, features=Features({**kinds, "tools": Value("string")}))


def _feature(column: str, rows: list[dict[str, Any]]) -> Any:
    """How a column loads: a label as a boolean, text (a text completion's prompt and answers) as strings, anything
    else (chat messages) as JSON, each row as written. Not text as JSON: `Json` takes a string that parses as JSON
    for that JSON (an answer " 4" became the number 4, `null` nothing)."""
    from datasets import Json, Value

    if column == "label":
        return Value("bool")
    return Value("string") if all(isinstance(row[column], str) for row in rows) else Json()


def load_base(base_dir: Path, precision: Precision, qlora: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not qlora:
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=precision.dtype)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=precision.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=nf4, dtype=precision.dtype, device_map=precision.device
    )
    for module in model.modules():
        # bitsandbytes' AVX512-BF16 CPU path corrupts 4-bit weights once LoRA layers wrap them.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (an attribute torch's types lack)
    return model


def trainer_args(config: RetrainConfig, run_dir: Path, precision: Precision, epochs: int) -> TrainingArguments:
    """TRL's config for `config.method`, built from the retraining config, for `epochs` whole epochs."""
    from trl import DPOConfig, KTOConfig, SFTConfig

    early_stopping = config.early_stopping_patience > 0
    kinds: dict[str, Callable[..., TrainingArguments]] = {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig}
    flags: dict[str, Any] = precision.trainer_flags
    return kinds[config.method](
        output_dir=str(run_dir / CHECKPOINT_DIR),
        num_train_epochs=epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2,  # with load_best_model_at_end the best is kept besides the last
        load_best_model_at_end=early_stopping,
        restore_callback_states_from_checkpoint=early_stopping,  # a resumed run's patience goes on, not from 0
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=precision.device == "cuda",  # memory is short on GPUs, time on CPUs
        report_to=[],
        **flags,
    )


def build_trainer(
    config: RetrainConfig, args: TrainingArguments, model: PreTrainedModel, base_dir: Path, data: dict[str, Dataset]
) -> Trainer:
    from peft import LoraConfig
    from transformers import AutoTokenizer, EarlyStoppingCallback, set_seed
    from trl import DPOTrainer, KTOTrainer, SFTTrainer

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    callbacks = []
    if config.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    kinds: dict[str, Any] = {"sft": SFTTrainer, "dpo": DPOTrainer, "kto": KTOTrainer}
    set_seed(config.seed)  # the trainer wraps the model in LoRA (random A matrices) before it seeds anything
    trainer: Trainer = kinds[config.method](
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=AutoTokenizer.from_pretrained(base_dir),
        peft_config=lora,
        callbacks=callbacks,
    )
    return trainer


def stopping(stop: threading.Event) -> TrainerCallback:
    """A trainer callback that ends training at the first step's end after `stop` is set, with no evaluation or
    checkpoint of the epoch it cuts: the last checkpoint stays that of the last whole epoch, which `resume` goes on
    from. (Added after the trainer's own flow callback, it clears what that one asks for at the epoch's end.) Set
    during an epoch's evaluation, it ends that at its next batch (TrainingStopped), before the epoch's checkpoint."""
    from transformers import TrainerCallback

    class Stopping(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if stop.is_set():
                control.should_training_stop = True
                control.should_evaluate = control.should_save = False
            return control

        on_epoch_end = on_step_end

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if stop.is_set():  # an epoch's evaluation takes as long as a step: cut it, no checkpoint of that epoch
                raise TrainingStopped(
                    f"training stopped during the evaluation after step {state.global_step}, no adapter written"
                )
            return control

    return Stopping()


def _dtype_name(precision: Precision) -> str:
    return str(precision.dtype).removeprefix("torch.")


def _last_checkpoint(folder: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


def save_adapter(trainer: Trainer, target: Path, base: BaseModelSpec, max_rank: int) -> CheckedAdapter:
    """Write the trained adapter to `target` whole, only if the registry's check accepts it."""
    with staged_folder(target) as staging:
        model: Any = trainer.model  # the PeftModel: saves the adapter only
        model.save_pretrained(staging, safe_serialization=True)
        try:
            return check_adapter(staging, base, max_rank)
        except InvalidAdapter as exc:
            raise TrainingError(f"the trained adapter fails the registry's checks: {exc}") from exc


def train(
    config: RetrainConfig,
    dataset_dir: Path,
    base_dir: Path,
    run_dir: Path,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    resume: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train `config.method` on DATASET_DIR/{train,validation}.jsonl; the adapter lands in RUN_DIR/adapter.

    Blocking. `resume=True` continues from the last checkpoint in RUN_DIR/checkpoints (from scratch when
    there is none); otherwise old checkpoints there are removed first. `stop` set (from another thread):
    training ends at its next step's (or evaluation batch's) end, and TrainingStopped is raised instead of an
    adapter written.
    """
    started = time.perf_counter()
    report = progress or (lambda _: None)
    base = BaseModelSpec.from_folder(base_dir, base_dir.name)
    check_limits(config, base, max_rank)
    precision = choose_precision()
    qlora = use_qlora(config, precision)
    data = {split: load_split(dataset_dir, split, config.method) for split in SPLITS}
    resume_from = _prepare_run_dir(run_dir, resume)
    epochs = config.epochs_for(len(data["train"]))
    report(
        f"{config.method} on {len(data['train'])} examples ({len(data['validation'])} validation) for {epochs} "
        f"epoch{'s' if epochs > 1 else ''}, {'QLoRA' if qlora else 'LoRA'} r={config.lora_r} on {precision.device} "
        f"in {_dtype_name(precision)}" + (f", resuming from {resume_from.name}" if resume_from else "")
    )
    args = trainer_args(config, run_dir, precision, epochs)
    trainer = build_trainer(config, args, load_base(base_dir, precision, qlora), base_dir, data)
    _check_kept(trainer, len(data["train"]), len(data["validation"]), config.max_length, report)
    watch = EpochWatch(epochs, len(data["train"]), progress)
    trainer.add_callback(as_trainer_callback(watch))
    if stop is not None:
        trainer.add_callback(stopping(stop))
    if stop is None or not stop.is_set():  # set while the base loaded: no step at all
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop is not None and stop.is_set():
        raise TrainingStopped(
            f"training stopped at step {trainer.state.global_step}, no adapter written; the checkpoints of the "
            f"epochs done are in {run_dir / CHECKPOINT_DIR}"
        )
    checked = save_adapter(trainer, run_dir / ADAPTER_DIR, base, max_rank)

    return _result(config, trainer, watch, run_dir, checked, resume_from, qlora, precision, started)


def _check_kept(trainer: Trainer, given: int, validation: int, max_length: int, report: Progress) -> None:
    """The trainer drops examples whose answer `max_length` cuts away entirely (TRL: "fully masked"): said when it
    drops some, refused when it drops them all (torch then failed with `num_samples=0`, and the data card still
    counted every example); refused too when it drops every one of the `validation` examples (epoch 1's evaluation
    then had no eval_loss, and early stopping failed on its KeyError)."""
    kept = len(trainer.train_dataset) if trainer.train_dataset is not None else given  # type: ignore[arg-type]
    if kept == 0:
        raise TrainingRefused(
            f"all {given} training examples are longer than max_length={max_length} tokens before their answer "
            "begins (the chat template, its default system prompt included, and the prompt count): raise max_length"
        )
    if kept < given:
        report(f"{given - kept} of {given} training examples dropped: no answer left within max_length={max_length}")
    if trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0:  # type: ignore[arg-type]
        raise TrainingRefused(
            f"all {validation} validation examples are longer than max_length={max_length} tokens before their "
            "answer begins: raise max_length"
        )


def _prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: from scratch, older checkpoints removed); an older run's adapter
    is removed either way, so that it is never mistaken for this one's."""
    resume_from = _last_checkpoint(run_dir / CHECKPOINT_DIR) if resume else None
    if not resume:
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    return resume_from


def _result(
    config: RetrainConfig,
    trainer: Trainer,
    watch: EpochWatch,
    run_dir: Path,
    checked: CheckedAdapter,
    resume_from: Path | None,
    qlora: bool,
    precision: Precision,
    started: float,
) -> TrainResult:
    """What a finished run reports: its epochs' losses, the epoch whose weights were kept, its speed."""
    losses = epoch_losses(trainer.state.log_history)
    best = best_epoch(losses)
    trained_epochs = round(trainer.state.epoch or 0)
    early_stopping = config.early_stopping_patience > 0
    return TrainResult(
        adapter_dir=run_dir / ADAPTER_DIR,
        method=config.method,
        epochs=losses,
        best_epoch=best,
        adapter_epoch=best if early_stopping and best is not None else trained_epochs,
        early_stopped=early_stopping and trained_epochs < watch.total_epochs,
        steps=trainer.state.global_step,
        train_examples=watch.examples_per_epoch,
        examples_per_s=watch.examples / max(watch.seconds, 1e-9),
        tokens_per_s=watch.tokens / max(watch.seconds, 1e-9),
        train_seconds=watch.seconds,
        wall_seconds=time.perf_counter() - started,
        device=precision.device,
        dtype=_dtype_name(precision),
        qlora=qlora,
        resumed_from=resume_from,
        adapter=checked,
    )
