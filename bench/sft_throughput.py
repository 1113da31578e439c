"""SFT throughput, lmforge against the seed-style run, side by side in one process on one GPU.

    python bench/sft_throughput.py --shapes qwen2.5-0.5b llama-3.2-1b --steps 20

(a) seed-style: the plain HF Trainer, every record right-padded to model_max_length (2048),
    SDPA, bf16 autocast over fp32 weights, gradient checkpointing (FastChat's command lines).
(b) lmforge: the same Trainer loop with lmforge's packing (best-fit decreasing bins of 2048,
    restarting positions, per-document attention), bf16, no gradient checkpointing.
Same randomly initialised model shape (bench/configs), same synthetic records: lengths drawn
from a log-normal with median ~450 tokens and a heavy tail, capped at 2048, the second half of
each record carrying loss. Prints useful (non-pad) tokens/s, MFU against 989 TFLOP/s (6 x
parameters per token plus causal attention), peak GPU memory, and lmforge / seed-style.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.config import TrainingArguments  # noqa: E402
from lmforge.data.collate import PackedCollator, PaddedCollator  # noqa: E402
from lmforge.data.packing import best_fit_decreasing, pack_records  # noqa: E402
from lmforge.train import Trainer  # noqa: E402

PEAK_FLOPS = 989e12
MAX_LEN = 2048


def synthetic_records(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(MAX_LEN, max(16, int(rng.lognormvariate(math.log(450), 0.8))))
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        half = length // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Clock(transformers.TrainerCallback):
    """Wall time and useful tokens from step `warmup` on."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.end = time.perf_counter()


def flops_per_token(config, n_params: int, mean_context: float) -> float:
    # 6N for the weights (forward + backward) plus causal attention: 6 * layers * hidden * context.
    return 6 * n_params + 6 * config.num_hidden_layers * config.hidden_size * mean_context


def run(name: str, config, rows, collator, batch: int, steps: int, gradient_checkpointing: bool, attn: str,
        useful_per_row: list[int], context_per_row: list[float], out_dir: str, liger: bool = False) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, name), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-4, bf16=True, tf32=True, gradient_checkpointing=gradient_checkpointing,
        report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=steps,
        remove_unused_columns=False, train_sampling_strategy="sequential", dataloader_num_workers=2,
        optim="adamw_torch_fused", overwrite_output_dir=True, use_liger_kernel=liger)
    clock = Clock(warmup=3)
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=Rows(rows), data_collator=collator, callbacks=[clock]).train()
    seconds = clock.end - clock.start
    timed = slice(3 * batch, steps * batch)
    useful = sum(useful_per_row[timed])
    context = sum(context_per_row[timed]) / max(1, len(context_per_row[timed]))
    tps = useful / seconds
    mfu = tps * flops_per_token(config, n_params, context) / PEAK_FLOPS
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return {"run": name, "tokens_per_s": tps, "mfu": mfu, "peak_gib": peak, "params": n_params}


def bench_shape(shape: str, steps: int, batch: int, attn: str, out_dir: str, liger: bool = False) -> list[dict]:
    config = transformers.AutoConfig.for_model(**json.load(open(f"bench/configs/{shape}.json")))
    need = batch * steps
    records = synthetic_records(need * 6, config.vocab_size)
    # (a) seed-style: one record per row, padded to 2048.
    padded = [r for r in records[:need]]
    padded_useful = [len(r["input_ids"]) for r in padded]
    padded_context = [len(r["input_ids"]) / 2 for r in padded]

    class PadTo2048(PaddedCollator):
        def __call__(self, features):
            features = features + [{"input_ids": [0] * MAX_LEN, "labels": [-100] * MAX_LEN}]
            out = super().__call__(features)
            return {k: v[:-1] for k, v in out.items()}

    seed = run(f"{shape}-seed-style", config, padded, PadTo2048(0), batch, steps, True, "sdpa",
               padded_useful, padded_context, out_dir)
    # (b) lmforge: packed bins of 2048.
    lengths = [len(r["input_ids"]) for r in records]
    bins = best_fit_decreasing(lengths, MAX_LEN, seed=0)[:need]
    packed = [pack_records([records[i] for i in b]) for b in bins]
    packed_useful = [len(p["input_ids"]) for p in packed]
    packed_context = [sum(lengths[i] ** 2 for i in b) / 2 / max(1, sum(lengths[i] for i in b)) for b in bins]
    rows = [seed]
    for use_liger in ([False, True] if liger else [False]):
        ours = run(f"{shape}-lmforge-packed-{attn}{'-liger' if use_liger else ''}", config, packed,
                   PackedCollator(0), batch, steps, False, attn, packed_useful, packed_context, out_dir, use_liger)
        ours["ratio"] = ours["tokens_per_s"] / seed["tokens_per_s"]
        rows.append(ours)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attn", default="sdpa", help="lmforge's attention: sdpa (boolean document mask) "
                                                     "or flex_attention (BlockMask)")
    parser.add_argument("--liger", action="store_true", help="also run lmforge with Liger kernels (fused linear "
                                                                 "cross-entropy, RMSNorm, RoPE, SwiGLU)")
    parser.add_argument("--out", default="/tmp/lmforge-bench")
    args = parser.parse_args()
    results = []
    for shape in args.shapes:
        results += bench_shape(shape, args.steps, args.batch, args.attn, args.out, args.liger)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; transformers {transformers.__version__}")
    print(f"{'run':<44} {'useful tok/s':>12} {'MFU':>6} {'peak GiB':>9} {'ratio':>6}")
    for r in results:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"{r['run']:<44} {r['tokens_per_s']:>12,.0f} {100 * r['mfu']:>5.1f}% {r['peak_gib']:>9.1f} {ratio:>6}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
