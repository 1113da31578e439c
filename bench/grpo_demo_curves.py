"""GRPO's learning beside TRL's on the embedded demo's task: both trainers start from the demo's
fine-tuned model, on the same prompts (the carrying sums its fine-tuning data taught with a slip),
the same exact-answer reward function, group size, lengths, batch, learning rate, schedule and
seed. Prints each trainer's mean reward per stretch of steps, per seed, and the held-out accuracy
each reaches; the reward curves should agree within the spread between seeds. Runs on a CPU.

    lmforge demo --output_dir /tmp/demo          # or let this script run it
    PYTHONPATH=/path/to/trl/site python bench/grpo_demo_curves.py --demo /tmp/demo --seeds 0 1 2

TRL (1.16) and `datasets` need only be importable here; neither is a dependency of lmforge.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from lmforge.demo import QA, SCALE, evaluate  # noqa: E402

G, COMPLETIONS_PER_STEP, MAX_COMPLETION, MAX_PROMPT = 8, 64, 8, 64


def accuracy(prompts, completions, **columns):
    """lmforge's built-in exact-answer reward, under a plain function's name (TRL logs by it)."""
    from lmforge.rl.rewards import Accuracy

    return Accuracy("answer")(prompts, completions, **columns)


def run_lmforge(demo: str, out: str, seed: int, steps: int) -> list[float]:
    from lmforge import grpo

    grpo.main(["--model_name_or_path", os.path.join(demo, "model"), "--output_dir", out,
               "--data_path", os.path.join(demo, "grpo_prompts.jsonl"), "--reward_funcs", f"{__file__}:accuracy",
               "--num_generations", str(G), "--per_device_train_batch_size", str(COMPLETIONS_PER_STEP),
               "--max_prompt_length", str(MAX_PROMPT), "--max_completion_length", str(MAX_COMPLETION),
               "--temperature", str(SCALE.grpo_temperature), "--learning_rate", str(SCALE.grpo_learning_rate),
               "--max_steps", str(steps), "--warmup_steps", "0", "--lr_scheduler_type", "cosine",
               "--weight_decay", "0.0", "--seed", str(seed), "--logging_steps", "1", "--save_strategy", "no",
               "--report_to", "none", "--disable_tqdm", "True", "--log_completions", "0",
               "--overwrite_output_dir", "True", "--resume", "False"])
    return rewards_logged(out)


def run_trl(demo: str, out: str, seed: int, steps: int) -> list[float]:
    import dataclasses

    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(os.path.join(demo, "grpo_prompts.jsonl"))]
    data = datasets.Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    wanted = dict(output_dir=out, num_generations=G, per_device_train_batch_size=COMPLETIONS_PER_STEP,
                  max_prompt_length=MAX_PROMPT, max_completion_length=MAX_COMPLETION,
                  temperature=SCALE.grpo_temperature, learning_rate=SCALE.grpo_learning_rate, max_steps=steps,
                  warmup_steps=0, lr_scheduler_type="cosine", weight_decay=0.0, seed=seed, logging_steps=1,
                  save_strategy="no", report_to="none", disable_tqdm=True, beta=0.0, loss_type="dapo",
                  epsilon=0.2, scale_rewards="group", use_cpu=True, bf16=False)
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    trainer = GRPOTrainer(model=os.path.join(demo, "model"), reward_funcs=[accuracy],
                          args=GRPOConfig(**{k: v for k, v in wanted.items() if k in fields}), train_dataset=data)
    trainer.train()
    trainer.save_model(out)
    trainer.processing_class.save_pretrained(out)
    return rewards_logged(out, trainer.state.log_history)


def rewards_logged(out: str, history: list[dict] | None = None) -> list[float]:
    if history is None:
        with open(os.path.join(out, "trainer_state.json")) as f:
            history = json.load(f)["log_history"]
    return [h["reward"] for h in history if "reward" in h]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="an `lmforge demo` output directory (made if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=SCALE.grpo_steps)
    p.add_argument("--stretch", type=int, default=10, help="steps per mean reward printed")
    p.add_argument("--work", default="/tmp/lmforge-grpo-curves")
    a = p.parse_args()
    if not os.path.isdir(os.path.join(a.demo, "model")):
        from lmforge.cli import main as cli

        cli(["demo", "--output_dir", a.demo])
    held_out = [QA(**json.loads(line)) for line in open(os.path.join(a.demo, "held_out_sums.jsonl"))]
    before = evaluate(os.path.join(a.demo, "model"), held_out).accuracy
    curves: dict[str, list[list[float]]] = {"lmforge": [], "trl": []}
    after: dict[str, list[float]] = {"lmforge": [], "trl": []}
    for seed in a.seeds:
        for name, fn in (("lmforge", run_lmforge), ("trl", run_trl)):
            out = os.path.join(a.work, f"{name}-{seed}")
            curves[name].append(fn(a.demo, out, seed, a.steps))
            after[name].append(evaluate(out, held_out).accuracy)
            result = {"trainer": name, "seed": seed, "rewards": curves[name][-1], "held_out": after[name][-1]}
            print(f"RESULT {json.dumps(result)}", flush=True)
    spans = [(s, min(s + a.stretch, a.steps)) for s in range(0, a.steps, a.stretch)]
    print(f"\nmean reward per stretch of steps (seeds {a.seeds}); held-out accuracy {before:.1%} before GRPO")
    print(f"{'trainer':<9}{'seed':>5}" + "".join(f"{f'{s + 1}-{e}':>10}" for s, e in spans) + f"{'held-out':>10}")
    for name in curves:
        for seed, curve, acc in zip(a.seeds, curves[name], after[name]):
            cells = "".join(f"{statistics.mean(curve[s:e]):>10.3f}" for s, e in spans)
            print(f"{name:<9}{seed:>5}{cells}{acc:>10.1%}")
    for name in curves:
        means = [statistics.mean(statistics.mean(c[s:e]) for c in curves[name]) for s, e in spans]
        print(f"{name + ' mean':<14}" + "".join(f"{m:>10.3f}" for m in means)
              + f"{statistics.mean(after[name]):>10.1%}")


if __name__ == "__main__":
    main()
