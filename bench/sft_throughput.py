"""SFT throughput, lmforge against the seed-style run, side by side in one process on one GPU.

    python bench/sft_throughput.py --shapes qwen2.5-0.5b llama-3.2-1b --methods full lora qlora

For each shape and method, (a) the baseline: the plain HF Trainer (+ PEFT for LoRA, + PEFT's
k-bit preparation for QLoRA), every record right-padded to model_max_length (2048), SDPA, bf16
autocast, gradient checkpointing: FastChat's command lines; and (b) lmforge's variants: the
same Trainer loop with lmforge's packing (best-fit decreasing bins of 2048, restarting
positions, per-document attention), its fused loss (labelled positions only), and optionally
its compiled decoder blocks and Liger kernels.
Same randomly initialised model shape (bench/configs), same synthetic records: lengths drawn
from a log-normal with median ~450 tokens and a heavy tail, capped at 2048, the second half of
each record carrying loss. Prints useful (non-pad) tokens/s, MFU against 989 TFLOP/s (6 x
parameters per token for full training, 4 x for LoRA whose frozen weights get no gradient,
plus causal attention), peak GPU memory, and the ratio to the method's baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.config import TrainingArguments  # noqa: E402
from lmforge.data.collate import PackedCollator, PaddedCollator  # noqa: E402
from lmforge.data.pack import best_fit_decreasing, pack_records  # noqa: E402
from lmforge.flags import LoraArguments, ModelArguments
from lmforge.modeling.load import apply_lora, load_model, varlen_implementation  # noqa: E402
from lmforge.training.guards import NonFiniteGuard  # noqa: E402
from lmforge.training.step import Trainer  # noqa: E402

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


class PadTo2048(PaddedCollator):
    """The seed scripts' padding: every row to model_max_length."""

    def __call__(self, features):
        features = features + [{"input_ids": [0] * MAX_LEN, "labels": [-100] * MAX_LEN}]
        out = super().__call__(features)
        return {k: v[:-1] for k, v in out.items()}


class Clock(transformers.TrainerCallback):
    """Wall time from step `warmup` on (the first steps compile and warm the allocator) to the
    end of the last step. It waits for the GPU at those two points only: a wait at every step
    would keep the host from queueing ahead, which is part of what is measured."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            torch.cuda.synchronize()
            self.end = time.perf_counter()


class SyncAudit(transformers.TrainerCallback):
    """Where the host waits for the GPU: for `steps` steps from step `first`, PyTorch's sync
    debug mode warns at every synchronising call; each is counted by the Python frames it came
    from, and the counts per step are printed at the end."""

    def __init__(self, first: int = 2, steps: int = 2):  # before the Clock starts (step 4)
        self.first, self.steps, self.counts, self.saved = first, steps, {}, None

    def record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self.saved[0](message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        where = " <- ".join(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}:{f.name}" for f in frames[::-1][:7])
        self.counts[where] = self.counts.get(where, 0) + 1

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.first:
            self.saved = (warnings.showwarning, list(warnings.filters))
            warnings.simplefilter("always")
            warnings.showwarning = self.record
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kw):
        if self.saved is not None and state.global_step == self.first + self.steps:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, warnings.filters[:] = self.saved[0], self.saved[1]
            self.saved = None
            total = sum(self.counts.values())
            print(f"sync audit: {total / self.steps:g} host waits per step (steps {self.first}..{state.global_step})")
            for where, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
                print(f"  {n / self.steps:g}/step  {where}")


@dataclass
class Variant:
    name: str
    packed: bool = True
    """lmforge's packed rows (else each record padded to 2048)."""
    lmforge: bool = True
    """lmforge's loss and options; False: the plain HF Trainer behaviour (the model's own loss)."""
    gradient_checkpointing: bool = False
    compile_blocks: bool = False
    liger: bool = False
    attn: str = "sdpa"
    bf16_weights: bool = False
    """Full SFT: the model held in bf16, AdamW over fp32 masters (lmforge.modeling.optim); else fp32
    weights under bf16 autocast, as the seeds train."""
    extra: dict = field(default_factory=dict)
    """More TrainingArguments (e.g. loss_kernel)."""


def flops_per_token(config, n_params: int, mean_context: float, lora: bool) -> float:
    # 6N for forward + backward of trained weights (4N when frozen: no weight gradients), plus
    # causal attention, 6 (or 4) * layers * hidden * context... attention has no weights, so
    # its backward is always the full 2x forward.
    weights = (4 if lora else 6) * n_params
    return weights + 6 * config.num_hidden_layers * config.hidden_size * mean_context


def build_model(config, method: str, variant: Variant, base_dir: str | None):
    """The model a run trains: random init for full SFT; for LoRA / QLoRA the saved base with
    adapters (r 16, all linear layers), loaded as that side would load it."""
    torch.manual_seed(0)
    if method == "full":
        attn = variant.attn
        if attn == "varlen":
            attn = varlen_implementation()
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=torch.bfloat16 if variant.bf16_weights else torch.float32)
        model.config.use_cache = False  # as the seeds and lmforge train: no key / value cache per forward
        return model
    lora = LoraArguments(lora=True, lora_r=16, lora_alpha=32, q_lora=method == "qlora")
    if variant.lmforge:
        model_args = ModelArguments(model_name_or_path=base_dir, torch_dtype="bfloat16",
                                    attn_implementation=variant.attn)
        model = load_model(model_args, _Vocab(config.vocab_size), model_max_length=MAX_LEN, lora=lora)
        return apply_lora(model, lora, variant.gradient_checkpointing)
    # Plain HF + PEFT, as FastChat's train_lora.py does it.
    import peft

    extra = {}
    if method == "qlora":
        extra = {"quantization_config": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": 0}}
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16,
                                                              attn_implementation=variant.attn, **extra)
    model.config.use_cache = False  # as FastChat's train_lora.py
    if method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    if variant.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


class _Vocab:
    """What load_model needs of a tokenizer here: its length (no resize)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n


def run(shape: str, method: str, variant: Variant, config, rows, useful: list[int], context: list[float],
        batch: int, steps: int, out_dir: str, base_dir: str | None, callbacks: list | None = None) -> dict:
    model = build_model(config, method, variant, base_dir)
    n_params = sum(p.numel() for p in (model.get_base_model() if method != "full" else model).parameters())
    if method == "qlora":
        n_params = config_params(config)  # packed 4-bit storage counts bytes, not parameters
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"{shape}-{method}-{variant.name}"), max_steps=steps,
        per_device_train_batch_size=batch, learning_rate=1e-4, bf16=True, tf32=True,
        gradient_checkpointing=variant.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if variant.gradient_checkpointing else None,
        report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=steps,
        remove_unused_columns=False, train_sampling_strategy="sequential", dataloader_num_workers=2,
        optim="adamw_torch_fused", overwrite_output_dir=True, use_liger_kernel=variant.liger,
        fused_loss=variant.lmforge, compile_blocks=variant.compile_blocks,
        # The baselines keep the plain Trainer's NaN filter (on in transformers, off in lmforge,
        # whose non-finite guard below stands in for it without stalling the host).
        **{"logging_nan_inf_filter": not variant.lmforge, **variant.extra})
    if not variant.lmforge:
        args.accelerator_config.non_blocking = False  # the plain Trainer's default: a blocking copy a batch
    collator = (PackedCollator(0, pad_to_multiple_of=MAX_LEN if variant.compile_blocks else 8) if variant.packed
                else PadTo2048(0))
    clock = Clock(warmup=4)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows), data_collator=collator,
                      callbacks=[clock, *([NonFiniteGuard()] if variant.lmforge else []), *(callbacks or [])])
    trainer.train()
    seconds = clock.end - clock.start
    timed = slice(4 * batch, steps * batch)
    tps = sum(useful[timed]) / seconds
    mean_context = sum(context[timed]) / max(1, len(context[timed]))
    mfu = tps * flops_per_token(config, n_params, mean_context, method != "full") / PEAK_FLOPS
    peak = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"shape": shape, "method": method, "run": variant.name, "tokens_per_s": tps, "mfu": mfu,
            "peak_gib": peak, "params": n_params, "seconds": seconds}


def config_params(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def variants(method: str, liger: bool) -> list[Variant]:
    """The baseline first, then lmforge's variants; `DEFAULT` names those run without --only."""
    if method == "full":
        out = [Variant("seed-style", packed=False, lmforge=False, gradient_checkpointing=True),
               Variant("lmforge"), Variant("lmforge+compile", compile_blocks=True),
               Variant("lmforge+compile+flex", compile_blocks=True, attn="flex_attention"),
               Variant("lmforge+compile+flex+liger-loss", compile_blocks=True, attn="flex_attention",
                       extra={"loss_kernel": "liger"}),
               Variant("lmforge+compile+bf16", compile_blocks=True, bf16_weights=True),
               Variant("lmforge+compile+flex+bf16", compile_blocks=True, attn="flex_attention", bf16_weights=True),
               Variant("lmforge+compile+varlen", compile_blocks=True, attn="varlen"),
               Variant("lmforge+compile+varlen+bf16", compile_blocks=True, attn="varlen", bf16_weights=True),
               Variant("lmforge+compile+varlen+bf16+budget0.8", compile_blocks=True, attn="varlen", bf16_weights=True,
                       extra={"compile_memory_budget": 0.8})]
        out += [Variant(f"lmforge+compile+flex+bf16+budget{b:g}", compile_blocks=True, attn="flex_attention",
                        bf16_weights=True, extra={"compile_memory_budget": b}) for b in (0.6, 0.8)]
        # As first measured (2026-11-23): the Trainer's NaN filter reading every loss on the host.
        out += [Variant("lmforge+compile+flex+bf16+hostsync", compile_blocks=True, attn="flex_attention",
                        bf16_weights=True, extra={"logging_nan_inf_filter": True})]
        if liger:
            out.append(Variant("lmforge+compile+flex+liger", compile_blocks=True, liger=True,
                               attn="flex_attention"))
        return out
    if method == "lora":
        return [Variant("hf-peft-padded", packed=False, lmforge=False, gradient_checkpointing=True),
                Variant("lmforge"), Variant("lmforge+compile+flex", compile_blocks=True, attn="flex_attention"),
                Variant("lmforge+compile+varlen", compile_blocks=True, attn="varlen")]
    return [Variant("hf-peft-padded", packed=False, lmforge=False, gradient_checkpointing=True),
            Variant("lmforge+ckpt", gradient_checkpointing=True),
            Variant("lmforge+compile+flex+ckpt", gradient_checkpointing=True, compile_blocks=True,
                    attn="flex_attention"),
            Variant("lmforge+compile+flex", compile_blocks=True, attn="flex_attention"),
            Variant("lmforge+compile+varlen+ckpt", gradient_checkpointing=True, compile_blocks=True, attn="varlen")]


DEFAULT = {"seed-style", "hf-peft-padded", "lmforge", "lmforge+compile+flex+bf16", "lmforge+compile+varlen+bf16",
           "lmforge+compile+varlen+bf16+budget0.8", "lmforge+compile+varlen", "lmforge+compile+varlen+ckpt"}


def save_base(config, path: str) -> str:
    """A random-init bf16 base on disk, for the LoRA / QLoRA runs to load."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
    return path


def bench_shape(shape: str, methods: list[str], steps: int, batch: int, out_dir: str, liger: bool,
                only: list[str] | None = None, sync_audit: bool = False) -> list[dict]:
    config = transformers.AutoConfig.for_model(**json.load(open(f"bench/configs/{shape}.json")))
    need = batch * steps
    records = synthetic_records(need * 6, config.vocab_size)
    padded = records[:need]
    padded_useful = [len(r["input_ids"]) for r in padded]
    padded_context = [len(r["input_ids"]) / 2 for r in padded]
    lengths = [len(r["input_ids"]) for r in records]
    bins = best_fit_decreasing(lengths, MAX_LEN, seed=0)[:need]
    packed = [pack_records([records[i] for i in b]) for b in bins]
    packed_useful = [len(p["input_ids"]) for p in packed]
    packed_context = [sum(lengths[i] ** 2 for i in b) / 2 / max(1, sum(lengths[i] for i in b)) for b in bins]
    results = []
    for method in methods:
        base_dir = save_base(config, os.path.join(out_dir, f"{shape}-base")) if method != "full" else None
        baseline = None
        for variant in variants(method, liger):
            if only and variant.name not in only:
                continue
            data = (packed, packed_useful, packed_context) if variant.packed else (padded, padded_useful,
                                                                                  padded_context)
            try:
                row = run(shape, method, variant, config, *data, batch, steps, out_dir, base_dir,
                          callbacks=[SyncAudit()] if sync_audit else None)
            except torch.OutOfMemoryError:
                row = {"shape": shape, "method": method, "run": variant.name, "error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            baseline = baseline or (row if not variant.lmforge else None)
            if baseline is not None and "error" not in row and "error" not in baseline and row is not baseline:
                row["ratio"] = row["tokens_per_s"] / baseline["tokens_per_s"]
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"])
    parser.add_argument("--methods", nargs="+", default=["full"], choices=["full", "lora", "qlora"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--liger", action="store_true", help="also run lmforge with Liger's kernels (RMSNorm, "
                                                             "RoPE, SwiGLU; the loss is lmforge's either way)")
    parser.add_argument("--only", nargs="*", help="run only these variants (by name; the baseline too if named); "
                                                  "default: " + ", ".join(sorted(DEFAULT)))
    parser.add_argument("--out", default="/tmp/lmforge-bench")
    parser.add_argument("--sync_audit", action="store_true",
                        help="list where the host waits for the GPU in two steps of each run (slows those steps)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for shape in args.shapes:
        results += bench_shape(shape, args.methods, args.steps, args.batch, args.out, args.liger,
                               args.only or sorted(DEFAULT), args.sync_audit)
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", "peft") if _installed(p)}
    for p in ("liger-kernel", "bitsandbytes"):
        if _installed(p):
            versions[p] = md.version(p)
    print(f"device: {torch.cuda.get_device_name(0)}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{'run':<44} {'useful tok/s':>12} {'MFU':>6} {'peak GiB':>9} {'ratio':>6}")
    for r in results:
        name = f"{r['shape']} {r['method']} {r['run']}"
        if "error" in r:
            print(f"{name:<44} {r['error']}")
            continue
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"{name:<44} {r['tokens_per_s']:>12,.0f} {100 * r['mfu']:>5.1f}% {r['peak_gib']:>9.1f} {ratio:>6}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
