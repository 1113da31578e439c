"""GRPO steps side by side: `lmforge grpo` and TRL's GRPOTrainer on the same model shape,
prompts, reward, group size, lengths and batch, each row in a process of its own.

    python bench/grpo_throughput.py --tokenizer .devdata/tokenizers/qwen2.5-0.5b-instruct \\
        --shape qwen2.5-0.5b --rows lmforge trl lmforge-lora trl-lora --steps 8 --warmup 3

A step is 64 completions (8 prompts x G = 8) of exactly --completion_tokens tokens: the model
is randomly initialised, so it never ends a turn and every completion runs to the limit (the
same work in both trainers). The reward is a length reward with TRL's signature, the same
function in both. Per timed step (after --warmup untimed ones), by an outside clock around each
optimizer step (CUDA synchronised): the whole step, the generation inside it (the model's
`generate` calls, timed), the rest (rewards, log-probs, forward + backward, optimizer: the
training half), tokens generated / s and tokens trained / s (prompt + completion tokens of the
step's 64 sequences). The last lines print the table and lmforge's ratios to TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

G, PROMPTS_PER_STEP = 8, 8
SHAPES = {
    "qwen2.5-0.5b": os.path.join(HERE, "configs", "qwen2.5-0.5b.json"),
    # A dry run on a CPU: the same vocabulary, a model small enough for a few steps.
    "tiny": None,
}
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151936, "max_position_embeddings": 4096,
        "tie_word_embeddings": True}


def length_reward(prompts, completions, **kwargs):
    """Shorter is better: the same function for both trainers (TRL's signature)."""
    return [-len(c[0]["content"]) / 1000 for c in completions]


def write_prompts(path: str, n: int, words: int, seed: int = 0) -> None:
    from cli_throughput import WORDS

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}],
                                "messages": [{"role": "user", "content": text}]}) + "\n")


def build_base(path: str, shape: str, tokenizer: str) -> None:
    import torch
    import transformers

    config = TINY if shape == "tiny" else json.load(open(SHAPES[shape]))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)


class StepClock:
    """Times each optimizer step, from the end of the one before (lmforge samples while the
    Trainer fetches a step's batches, before the step's first callback; TRL inside it), and the
    model's `generate` calls in that time."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []  # (step seconds, generation seconds)
        self.generation = 0.0
        self.started = 0.0

    def wrap(self, model) -> None:
        import torch

        inner = model.generate

        def timed(*args, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.generation += time.perf_counter() - t

        model.generate = timed

    def callback(self):
        import torch
        import transformers

        clock = self

        class Callback(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                now = time.perf_counter()
                clock.steps.append((now - clock.started, clock.generation))
                clock.started, clock.generation = now, 0.0

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                trainer_model = model
                while hasattr(trainer_model, "module"):
                    trainer_model = trainer_model.module
                clock.wrap(trainer_model)
                clock.started, clock.generation = time.perf_counter(), 0.0

        return Callback()


def run_lmforge(a, base: str, prompts: str, out: str, lora: bool, clock: StepClock) -> None:
    from lmforge import grpo

    argv = ["--model_name_or_path", base, "--data_path", prompts, "--output_dir", out, "--bf16", "True",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "8", "--num_generations", str(G),
            "--max_completion_length", str(a.completion_tokens), "--max_prompt_length", "512",
            "--reward_funcs", f"{os.path.abspath(__file__)}:length_reward",  # the function TRL's row gets
            "--learning_rate", "1e-6", "--logging_steps", "1",
            "--max_steps", str(a.steps + a.warmup), "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--log_completions", "0", "--overwrite_output_dir", "True"]
    if lora:
        argv += ["--lora", "True", "--lora_r", "16", "--lora_alpha", "32"]
    grpo.main(argv + a.extra, callbacks=[clock.callback()])


def run_trl(a, base: str, prompts: str, out: str, lora: bool, clock: StepClock) -> None:
    import dataclasses

    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(prompts)]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    wanted = dict(output_dir=out, bf16=True, per_device_train_batch_size=8, gradient_accumulation_steps=8,
                  num_generations=G, max_completion_length=a.completion_tokens, max_prompt_length=512,
                  learning_rate=1e-6, logging_steps=1, max_steps=a.steps + a.warmup, save_strategy="no",
                  report_to="none", disable_tqdm=True, beta=0.0, loss_type="dapo", temperature=1.0)
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    config = GRPOConfig(**{k: v for k, v in wanted.items() if k in fields})
    peft = None
    if lora:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=base, reward_funcs=[length_reward], args=config, train_dataset=dataset,
                          peft_config=peft, callbacks=[clock.callback()])
    trainer.train()


def row(a) -> dict:
    """One row in this process: the timed steps' figures."""
    import torch

    work = os.path.abspath(a.work)
    base, prompts = os.path.join(work, f"base-{a.shape}"), os.path.join(work, "prompts.jsonl")
    out = os.path.join(work, "out", a.row)
    clock = StepClock()
    lora = a.row.endswith("-lora")
    (run_trl if a.row.startswith("trl") else run_lmforge)(a, base, prompts, out, lora, clock)
    timed = clock.steps[a.warmup:]
    step = statistics.median(s for s, _ in timed)
    gen = statistics.median(g for _, g in timed)
    completions = PROMPTS_PER_STEP * G
    generated = completions * a.completion_tokens
    prompt_tokens = completions * a.prompt_tokens_estimate
    return {"row": a.row, "steps": len(timed), "step_s": step, "generation_s": gen, "training_s": step - gen,
            "generated_tok_s": generated / gen if gen else 0.0,
            "trained_tok_s": (generated + prompt_tokens) / (step - gen) if step > gen else 0.0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", nargs="+", default=["lmforge", "trl"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--completion_tokens", type=int, default=256)
    p.add_argument("--prompt_words", type=int, default=48)
    p.add_argument("--work", default="/tmp/lmforge-grpo-bench")
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--prompt_tokens_estimate", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="flags added to the lmforge rows (after --)")
    a = p.parse_args()
    if a.row:
        print("RESULT " + json.dumps(row(a)), flush=True)
        return
    os.makedirs(a.work, exist_ok=True)
    base, prompts = os.path.join(a.work, f"base-{a.shape}"), os.path.join(a.work, "prompts.jsonl")
    if not os.path.isdir(base):
        build_base(base, a.shape, a.tokenizer)
    write_prompts(prompts, PROMPTS_PER_STEP * (a.steps + a.warmup) * 2, a.prompt_words)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(base)
    first = json.loads(open(prompts).readline())["messages"]
    prompt_tokens = len(tok.apply_chat_template(first, add_generation_prompt=True)["input_ids"])
    results = []
    for name in a.rows:
        cmd = [sys.executable, __file__, "--tokenizer", a.tokenizer, "--shape", a.shape, "--row", name,
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--completion_tokens", str(a.completion_tokens),
               "--work", a.work, "--prompt_tokens_estimate", str(prompt_tokens)] + (["--", *a.extra] if a.extra else [])
        started = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not lines:
                print(f"{name}: failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
                continue
            result = json.loads(lines[-1][len("RESULT "):])
        except subprocess.TimeoutExpired:
            print(f"{name}: over {a.timeout} s", flush=True)
            continue
        result["wall_s"] = time.time() - started
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{'row':<14}{'step s':>8}{'gen s':>8}{'train s':>9}{'gen tok/s':>11}{'train tok/s':>13}{'GiB':>7}")
    for r in results:
        print(f"{r['row']:<14}{r['step_s']:>8.2f}{r['generation_s']:>8.2f}{r['training_s']:>9.2f}"
              f"{r['generated_tok_s']:>11.0f}{r['trained_tok_s']:>13.0f}{r['peak_gib']:>7.1f}")
    by = {r["row"]: r for r in results}
    for ours, theirs in (("lmforge", "trl"), ("lmforge-lora", "trl-lora")):
        if ours in by and theirs in by:
            o, t = by[ours], by[theirs]
            print(f"{ours} / {theirs}: whole step {t['step_s'] / o['step_s']:.2f}x, generation "
                  f"{t['generation_s'] / o['generation_s']:.2f}x, training half "
                  f"{t['training_s'] / max(o['training_s'], 1e-9):.2f}x")
    if results:
        print(f"device: {results[0]['device']}")
    with open(os.path.join(a.work, "grpo_results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
