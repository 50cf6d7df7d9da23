"""Trains a small QLoRA adapter against the NF4 (bitsandbytes 4-bit) base, as a QLoRA user would.

Run with the bitsandbytes engine's Python (`make bnb-engine`), which also holds TRL and peft:
    .venv-bnb/bin/python tests/integration/qlora_trainer.py BASE_FOLDER OUT_FOLDER
The adapter learns one fixed answer, so its effect on served output is unmistakable.
"""

from __future__ import annotations

import sys
from pathlib import Path

QUESTION = "What is the capital of France?"
ANSWER = "Bonjour! The secret word is pineapple."


def train(base: Path, out: Path, steps: int = 12) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    from training.hardware import choose_precision

    set_seed(0)  # peft initialises the LoRA weights before the Trainer seeds anything
    precision = choose_precision()  # bf16 where the hardware has it; fp32 on AVX2-only CPUs
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=precision.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=nf4, dtype=precision.dtype, device_map=precision.device
    )
    for module in model.modules():
        # bitsandbytes' AVX512-BF16 CPU path corrupts 4-bit weights once LoRA layers wrap them.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    rows = [
        {"prompt": [{"role": "user", "content": QUESTION}], "completion": [{"role": "assistant", "content": ANSWER}]}
    ] * 8
    args = SFTConfig(
        output_dir=str(out.with_name(out.name + "-run")),
        max_steps=steps,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        **precision.trainer_flags,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    trainer.train()
    trainer.model.save_pretrained(out)


if __name__ == "__main__":
    train(Path(sys.argv[1]), Path(sys.argv[2]))
