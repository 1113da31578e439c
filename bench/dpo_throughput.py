"""LoRA DPO throughput through `lmforge dpo`, on a randomly initialised model shape.

    python bench/dpo_throughput.py --tokenizer .devdata/tokenizers/qwen2.5-0.5b-instruct \\
        --shape qwen2.5-0.5b --steps 40 --batch 8

Synthetic preference pairs (a prompt of about --prompt_words words, two answers of about
--answer_words words each, random English words: with Qwen's tokenizer about one token a word)
are written as a prompt/chosen/rejected JSONL file and trained on with the real entry,
`lmforge.dpo.main`: LoRA r16 on all linear layers, bf16 autocast, the reference is the
model with its adapter disabled. The first --warmup steps are not timed. The last line gives
tokens/s (prompt and answer tokens of both sides, no padding), pairs/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge import dpo  # noqa: E402

from cli_throughput import WORDS  # noqa: E402  (bench/ is this script's directory)

HERE = os.path.dirname(__file__)
SHAPES = {
    "qwen2.5-0.5b": json.load(open(os.path.join(HERE, "configs", "qwen2.5-0.5b.json"))),
    # A dry run on a CPU: the same vocabulary, a model small enough for a few steps.
    "tiny": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151936,
             "max_position_embeddings": 4096, "tie_word_embeddings": True},
}


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def write_pairs(path: str, n: int, prompt_words: int, answer_words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": sentence(rng, prompt_words), "chosen": sentence(rng, answer_words),
                                "rejected": sentence(rng, answer_words)}) + "\n")


def build_base(path: str, shape: str, tokenizer: str) -> None:
    config = transformers.AutoConfig.for_model(**SHAPES[shape])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)


class StepTimer(transformers.TrainerCallback):
    """Wall time at the end of every optimizer step (after the GPU finished it)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt_words", type=int, default=300)
    p.add_argument("--answer_words", type=int, default=200)
    p.add_argument("--work", default="/tmp/lmforge-dpo-bench")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `lmforge dpo` flags")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    base, data, out = (os.path.join(a.work, n) for n in ("base-" + a.shape, "pairs.jsonl", "out"))
    if not os.path.isdir(base):
        build_base(base, a.shape, a.tokenizer)
    write_pairs(data, a.steps * a.batch, a.prompt_words, a.answer_words)
    timer = StepTimer()
    gpu = torch.cuda.is_available()
    argv = ["--model_name_or_path", base, "--data_path", data, "--output_dir", out, "--overwrite_output_dir", "True",
            "--resume", "False", "--lora", "True", "--lora_r", "16", "--lora_alpha", "32", "--bf16", "True",
            "--max_steps", str(a.steps), "--per_device_train_batch_size", str(a.batch), "--learning_rate", "5e-5",
            "--model_max_length", "1024", "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--dataloader_pin_memory", str(gpu), "--data_cache_dir",
            os.path.join(a.work, "cache"), *a.extra]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    dpo.main(argv, callbacks=[timer])
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    run = json.load(open(os.path.join(out, "lmforge_run.json")))
    stats = run["train_data"]
    tokens_per_pair = stats["tokens"] / stats["kept"]
    timed = len(timer.times) - 1 - a.warmup
    seconds = timer.times[-1] - timer.times[a.warmup]
    pairs = timed * a.batch
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    logged = [h for h in state["log_history"] if "loss" in h]
    print("losses:", [(h["step"], h["loss"], h.get("rewards/margins")) for h in logged])
    device = torch.cuda.get_device_name(0) if gpu else "CPU"
    print(f"dpo lora r16 {a.shape} on {device}: {tokens_per_pair * pairs / seconds:,.0f} tokens/s (prompt + answer, "
          f"both sides, {tokens_per_pair:.0f} a pair) | {pairs / seconds:.2f} pairs/s | peak GPU memory {peak:.2f} GiB "
          f"| {timed} timed steps of {a.batch} pairs")


if __name__ == "__main__":
    main()
