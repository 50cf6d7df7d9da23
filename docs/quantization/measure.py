#!/usr/bin/env python
"""Measure a vLLM (CPU) server for one quantisation setting, with LoRA enabled.

What it does, for one `--quantization` value (or none = bf16 baseline):
  1. starts `vllm.entrypoints.openai.api_server` in its own process group
     (setsid) with `--enable-lora`, waits for /health;
  2. sends one chat request to the base model (served name "base");
  3. POST /v1/load_lora_adapter for a test adapter, then one request with
     model=<lora name>;
  4. throughput: N rounds of C concurrent /v1/completions requests,
     max_tokens=32, ignore_eos=True, temperature=0, against the base and
     against the LoRA; reports generated tokens / wall second (median round);
  5. RSS of the server = sum of RSS over the whole process tree (psutil),
     sampled after load and again after the throughput runs (peak kept);
  6. kills the whole process group and prints / appends one JSON line.

Helper sub-command `make-adapter` writes a random rank-8 q_proj/v_proj LoRA
for SmolLM2-135M (seeded, normal*0.02) so no hub access is needed.

Examples:
  python measure.py make-adapter /tmp/qz/lora-test
  python measure.py run --label bf16 --adapter /tmp/qz/lora-test
  python measure.py run --label fp8 --adapter /tmp/qz/lora-test -- --quantization fp8
  python measure.py run --label w8a8 --model /tmp/qz/smollm-w8a8 --adapter /tmp/qz/lora-test
  python measure.py run --label w8a8-nolora --model /tmp/qz/smollm-w8a8 --no-lora

Everything after `--` is passed verbatim to the vLLM server.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

DEFAULT_MODEL = "/root/.cache/loragate/models/SmolLM2-135M-Instruct"
PYTHON = sys.executable
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash map is.",
    "List three uses of copper.",
    "What is the capital of France and why is it famous?",
    "Describe a cat to someone who has never seen one.",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "Summarise the plot of a fairy tale in two sentences.",
]


# --------------------------------------------------------------------------
def make_adapter(out: Path, rank: int = 8, layers: int = 30, hidden: int = 576,
                 kv_out: int = 192, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
           "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "SmolLM2-135M-Instruct", "bias": "none",
           "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
           "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        for name, o in (("q_proj", hidden), ("v_proj", kv_out)):
            p = f"base_model.model.model.layers.{i}.self_attn.{name}"
            t[f"{p}.lora_A.weight"] = (torch.randn(rank, hidden, generator=g) * 0.02).to(torch.bfloat16)
            t[f"{p}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.02).to(torch.bfloat16)
    save_file(t, str(out / "adapter_model.safetensors"))
    print(f"adapter written to {out}")


# --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def start_server(model: str, port: int, extra: list[str], log: Path,
                 lora: bool = True) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    cmd = [PYTHON, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port),
           *(["--enable-lora", "--max-loras", "4", "--max-lora-rank", "16"] if lora else []),
           "--disable-uvicorn-access-log", *extra]
    fh = open(log, "w")
    fh.write(" ".join(cmd) + "\n")
    fh.flush()
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)  # == setsid


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # make sure no stray children of the group survive
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_health(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("timeout waiting for /health")


def completion(url: str, model: str, prompt: str, max_tokens: int = 32) -> dict:
    r = requests.post(url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()


def ask(url: str, model: str) -> tuple[int, str]:
    """One greedy chat question: (HTTP status, answer or error text)."""
    r = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "max_tokens": 24, "temperature": 0.0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    return r.status_code, (r.json()["choices"][0]["message"]["content"] if r.ok else r.text[:300])


def throughput(url: str, model: str, conc: int, rounds: int) -> dict:
    rates = []
    with ThreadPoolExecutor(conc) as ex:
        completion(url, model, PROMPTS[0], 8)  # warm-up
        for _ in range(rounds):
            t0 = time.time()
            res = list(ex.map(lambda i: completion(url, model, PROMPTS[i % len(PROMPTS)]),
                              range(conc)))
            dt = time.time() - t0
            toks = sum(x["usage"]["completion_tokens"] for x in res)
            rates.append(toks / dt)
    return {"tok_s_median": round(statistics.median(rates), 1),
            "tok_s_rounds": [round(r, 1) for r in rates]}


def run(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.logdir) / f"{args.label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"label": args.label, "model": args.model, "extra": args.extra,
                 "log": str(log)}
    if args.no_lora:
        args.adapter = None
    proc = start_server(args.model, port, args.extra, log, lora=not args.no_lora)
    res["pgid"] = proc.pid
    try:
        res["startup_s"] = round(wait_health(url, proc, args.timeout), 1)
        time.sleep(2)
        res["rss_idle_mib"] = round(tree_rss(proc.pid) / 2**20)
        res["base_request"], res["base_text"] = ask(url, "base")
        if args.adapter:
            r = requests.post(url + "/v1/load_lora_adapter", timeout=120, json={
                "lora_name": "test-lora", "lora_path": args.adapter})
            res["load_lora"] = r.status_code
            res["load_lora_body"] = r.text[:300]
            res["lora_request"], res["lora_text"] = ask(url, "test-lora")
        res["base_throughput"] = throughput(url, "base", args.concurrency, args.rounds)
        if args.adapter and res.get("lora_request") == 200:
            res["lora_throughput"] = throughput(url, "test-lora", args.concurrency, args.rounds)
        res["rss_after_mib"] = round(tree_rss(proc.pid) / 2**20)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - report anything
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        tail = log.read_text(errors="replace").splitlines()[-40:]
        res["log_tail"] = [l for l in tail if "Error" in l or "error" in l][-8:]
    finally:
        stop_server(proc)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("make-adapter")
    a.add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("--label", required=True)
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--adapter", help="LoRA folder to hot-load (optional)")
    r.add_argument("--no-lora", action="store_true",
                   help="start without --enable-lora (to isolate LoRA incompatibilities)")
    r.add_argument("--concurrency", type=int, default=8)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--timeout", type=float, default=300)
    r.add_argument("--logdir", default="/tmp/qz/logs")
    r.add_argument("--results", default="/tmp/qz/results.jsonl")
    r.add_argument("extra", nargs="*", help="extra vLLM args (after --)")
    args = ap.parse_args()
    if args.cmd == "make-adapter":
        make_adapter(args.out)
        return
    res = run(args)
    with open(args.results, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
