"""Trains a small QLoRA adapter with loragate's own trainer (`training.train`, `qlora: true`): TRL's
SFTTrainer with a peft LoRA on the base loaded in bitsandbytes 4-bit NF4, the path a CUDA machine takes by
default, here on bitsandbytes' CPU backend.

Run with the bitsandbytes engine's Python (`make bnb-engine`), which also holds TRL, peft and this project:
    .venv-bnb/bin/python tests/integration/qlora_trainer.py BASE_FOLDER OUT_FOLDER
The adapter learns one fixed answer, so its effect on served output is unmistakable.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

QUESTION = "What is the capital of France?"
ANSWER = "Bonjour! The secret word is pineapple."


def train(base: Path, out: Path) -> None:
    from training.config import RetrainConfig
    from training.train import train as fit

    dataset = out.with_name(out.name + "-dataset")
    dataset.mkdir(parents=True, exist_ok=True)
    row = {"prompt": [{"role": "user", "content": QUESTION}], "completion": [{"role": "assistant", "content": ANSWER}]}
    # Every row is the same, so a batch of one gives the gradient a batch of four does, in a quarter of the
    # tokens: 12 steps of one row trained in 10 s, of four in 24 s, to the same losses (AVX2 kind, alone).
    for split, count in (("train", 4), ("validation", 2), ("test", 2)):
        (dataset / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(count)))
    config = RetrainConfig(
        qlora=True,
        epochs=3,  # validation loss 0.0017 after 3 (0.0007 after 6): 3 halve the AVX2 kind's 5 minutes
        learning_rate=3e-3,
        batch_size=1,
        lora_dropout=0.0,
        early_stopping_patience=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    result = fit(config, dataset, base, out.with_name(out.name + "-run"), progress=print)
    assert result.qlora, "trained without the 4-bit base"
    print(f"QLoRA on {result.device} in {result.dtype}: {result.steps} steps in {result.train_seconds:.0f} s")
    shutil.copytree(result.adapter_dir, out)


if __name__ == "__main__":
    train(Path(sys.argv[1]), Path(sys.argv[2]))
