"""Does float8 training learn as bf16 does? `lmforge pretrain` twice on real text from the same
random initialisation and data order, once with --fp8 false and once with --fp8 true, and the
two loss curves side by side: the mean training loss over the last `--tail` logged steps of each,
their ratio, and tokens/s.

    python bench/fp8_quality.py --tokenizer .devdata/tokenizers/qwen2.5-0.5b-instruct \\
        --text .devdata/tinyshakespeare.txt .devdata/c4_demo.jsonl --shape llama-3.2-1b --steps 300

Real text, not the synthetic words of the throughput benches: random words have no structure
whose learning float8's rounding could slow. Each run is a process of its own (`lmforge pretrain`
through its CLI), 8 blocks of 2048 tokens a step, the seed flags otherwise (`--bf16 True`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(mode: str, a: argparse.Namespace) -> dict:
    out = os.path.join(a.work, mode)
    config = a.shape if a.shape.endswith(".json") else os.path.join(HERE, "configs", f"{a.shape}.json")
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config_name", config,
           "--tokenizer_name", a.tokenizer, "--train_files", *a.text, "--block_size", "2048", "--bf16", "True",
           "--per_device_train_batch_size", "8", "--max_steps", str(a.steps), "--learning_rate", str(a.lr),
           "--warmup_steps", str(a.steps // 20), "--lr_scheduler_type", "cosine", "--logging_steps", "1",
           "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--output_dir", out,
           "--overwrite_output_dir", "True", "--resume", "False", "--disable_tqdm", "True", "--fp8", mode,
           "--data_cache_dir", os.path.join(a.work, "cache")]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=a.timeout)
    if proc.returncode != 0:
        sys.exit(f"--fp8 {mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = [h for h in json.load(f)["log_history"] if "loss" in h]
    losses = [h["loss"] for h in history]
    speed = [line for line in proc.stdout.splitlines() if "float8" in line]
    return {"losses": losses, "tail": sum(losses[-a.tail:]) / len(losses[-a.tail:]), "seconds": time.time() - started,
            "said": speed[:1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--text", nargs="+", required=True, help="training text files (.txt / .jsonl with a text field)")
    p.add_argument("--shape", default="llama-3.2-1b", help="a config of bench/configs, or a config file")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--tail", type=int, default=20, help="logged steps averaged at the end")
    p.add_argument("--timeout", type=int, default=900, help="seconds a run may take")
    p.add_argument("--work", default="/tmp/lmforge-fp8-quality")
    p.add_argument("--json", help="write the curves and figures here")
    a = p.parse_args()
    results = {mode: run(mode, a) for mode in ("false", "true")}
    bf16, fp8 = results["false"], results["true"]
    print(f"{a.shape}, {a.steps} steps of 8 x 2048 tokens; mean loss of the last {a.tail} steps")
    for mode, r in results.items():
        print(f"  --fp8 {mode:5}  first {r['losses'][0]:.4f}  last-{a.tail} {r['tail']:.4f}  "
              f"wall {r['seconds']:.0f} s  {r['said'][0] if r['said'] else ''}")
    print(f"  float8 / bf16 final loss: {fp8['tail'] / bf16['tail']:.4f} ({100 * (fp8['tail'] / bf16['tail'] - 1):+.2f} %)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "steps": a.steps, **results}, f)


if __name__ == "__main__":
    main()
