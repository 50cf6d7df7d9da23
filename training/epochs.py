"""Per-epoch bookkeeping of a training run: each epoch's train and validation loss (from the trainer's
log history), the best epoch, and a trainer callback that times the epochs and reports each one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EpochLoss:
    epoch: int
    train_loss: float | None
    validation_loss: float | None


def epoch_losses(log_history: list[dict[str, Any]]) -> tuple[EpochLoss, ...]:
    """Per-epoch train loss (logged once per epoch) and validation loss, from the trainer's log history."""
    train: dict[int, float] = {}
    validation: dict[int, float] = {}
    for log in log_history:
        if "epoch" not in log:
            continue
        epoch = round(log["epoch"])
        if "loss" in log:
            train[epoch] = float(log["loss"])
        if "eval_loss" in log:
            validation[epoch] = float(log["eval_loss"])
    return tuple(EpochLoss(e, train.get(e), validation.get(e)) for e in sorted(set(train) | set(validation)))


def best_epoch(epochs: tuple[EpochLoss, ...]) -> int | None:
    """The first epoch with the lowest validation loss, as the trainer's own best-model tracking picks it."""
    scored = [(e.validation_loss, e.epoch) for e in epochs if e.validation_loss is not None]
    return min(scored)[1] if scored else None


class EpochWatch:
    """Times training epochs (throughput) and reports each epoch's losses; `as_trainer_callback` plugs it in."""

    def __init__(self, total_epochs: int, examples_per_epoch: int, progress: Progress | None) -> None:
        self.total_epochs = total_epochs
        self.examples_per_epoch = examples_per_epoch
        self.progress = progress
        self.seconds = 0.0
        self.tokens = 0
        self.examples = 0
        self._started = 0.0
        self._tokens_at_start = 0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.perf_counter()
        self._tokens_at_start = state.num_input_tokens_seen

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds += time.perf_counter() - self._started
        self.tokens += state.num_input_tokens_seen - self._tokens_at_start
        self.examples += self.examples_per_epoch

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One line per epoch, once its checkpoint is written (so a reported epoch survives a crash)."""
        if self.progress is None:
            return
        epoch = round(state.epoch)
        losses = {e.epoch: e for e in epoch_losses(state.log_history)}.get(epoch)
        parts = [f"{name} loss {value:.4f}" for name, value in loss_parts(losses)]
        self.progress(f"epoch {epoch}/{self.total_epochs}: {', '.join(parts) or 'no loss logged'}")


def loss_parts(losses: EpochLoss | None) -> list[tuple[str, float]]:
    if losses is None:
        return []
    named = [("train", losses.train_loss), ("validation", losses.validation_loss)]
    return [(name, value) for name, value in named if value is not None]


def as_trainer_callback(watch: EpochWatch) -> TrainerCallback:
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        on_epoch_begin = staticmethod(watch.on_epoch_begin)
        on_epoch_end = staticmethod(watch.on_epoch_end)
        on_save = staticmethod(watch.on_save)

    return Callback()
