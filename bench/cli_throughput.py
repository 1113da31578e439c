"""Throughput of `lmforge sft | lora | dpo` as users run them, beside the seed-style Trainer and
TRL, in one run on one GPU, with one clock.

    python bench/cli_throughput.py --tokenizer .devdata/tokenizers/qwen2.5-0.5b-instruct \\
        --rows 0.5b-full-seed 0.5b-full-trl 0.5b-full-lmforge 1b-lora-trl 1b-lora-lmforge ...
    python bench/cli_throughput.py --list          # the rows and what each runs

Every row runs in a process of its own (`--run ROW`; no compiled code, allocator state or patched
model class carries over) on the same synthetic data, written once: single-turn chat records whose
lengths (in random English words, about a token each with Qwen's or Llama's tokenizer) are drawn
from a log-normal with median 450 and a heavy tail, capped so that a rendered record fits 2048
tokens, the user turn holding the first half and the assistant (the loss) the second; for DPO,
preference pairs (a 300-word prompt, two 200-word answers) as message lists. Models are random
initialisations of the shapes in bench/configs (the LoRA and DPO bases saved once, in bf16).

The clock is the same for every row: a callback and a wrapper of `transformers.Trainer.training_step`
(which lmforge's, TRL's and the seed-style trainers all go through). From the start of step
`--warmup` + 1 to the end of the last step it counts the useful (non-pad) tokens of every batch
(`lmforge.training.progress.useful_tokens`, summed on the GPU) and waits for the GPU only at the window's two
ends. DPO rows are compared by pairs a second (the same pairs each step on every side).

Rows:
  *-seed     FastChat's train.py: the plain HF Trainer, fp32 weights under bf16 autocast, every
             record right-padded to 2048, gradient checkpointing, SDPA, the model's own loss.
  *-trl      TRL's SFTTrainer (DPOTrainer for dpo rows) at its fastest that runs here: best-fit
             packing (always padding-free), completion-only loss, bf16 weights, SDPA (flash-attn has
             no wheel; flex_attention compiles per length and did not finish a step in 150 s), Liger
             kernels, no gradient checkpointing (TRL's default is on: slower, not needed at this size).
  *-lmforge  the lmforge command line with the seed flags (`--bf16 True`, batch 8, 2048) and nothing
             else: lmforge's defaults for this machine. Rows with a suffix add flags (see --list).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MAX_LEN = 2048
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()
SHAPES = {"0.5b": "qwen2.5-0.5b", "1b": "llama-3.2-1b", "7b": "qwen2.5-7b", "tiny": None}
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32768,
        "tie_word_embeddings": True}


@dataclass
class Row:
    shape: str
    method: str  # full, lora, qlora, dpo
    runner: str  # seed, trl, lmforge
    extra: list[str] = field(default_factory=list)
    """More `lmforge` flags (lmforge rows)."""
    max_len: int = MAX_LEN
    batch: int = 8
    long: bool = False
    """Records of 16-30k words (long-context rows) instead of the chat mix."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of the row's process (e.g. inductor settings)."""

    def describe(self) -> str:
        return " ".join([self.runner, self.method, SHAPES[self.shape] or "tiny", f"{self.batch}x{self.max_len}",
                         *self.extra, *(f"{k}={v}" for k, v in self.env.items())])


def _rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for shape in ("0.5b", "1b", "7b", "tiny"):
        rows[f"{shape}-full-seed"] = Row(shape, "full", "seed")
        rows[f"{shape}-full-trl"] = Row(shape, "full", "trl")
        rows[f"{shape}-full-lmforge"] = Row(shape, "full", "lmforge")
        # lmforge's eager path, as the defaults were before the fast path was chosen for a GPU.
        rows[f"{shape}-full-lmforge-eager"] = Row(shape, "full", "lmforge",
                                                  ["--compile_blocks", "False", "--torch_dtype", "float32"])
        rows[f"{shape}-full-lmforge-budget1"] = Row(shape, "full", "lmforge", ["--compile_memory_budget", "1"])
        # --fp16 (GPUs without bf16): fp32 weights under fp16 autocast (the default) against fp16
        # weights over fp32 masters, both under the loss scaler.
        fp16 = ["--bf16", "False", "--fp16", "True"]
        rows[f"{shape}-full-lmforge-fp16"] = Row(shape, "full", "lmforge", fp16)
        rows[f"{shape}-full-lmforge-fp16w"] = Row(shape, "full", "lmforge", [*fp16, "--torch_dtype", "float16"])
        rows[f"{shape}-lora-trl"] = Row(shape, "lora", "trl")
        rows[f"{shape}-lora-lmforge"] = Row(shape, "lora", "lmforge")
        # What LoRA's input dropout (0.05, FastChat's and TRL's value) costs: the same row without it.
        rows[f"{shape}-lora-lmforge-dropout0"] = Row(shape, "lora", "lmforge", ["--lora_dropout", "0"])
        rows[f"{shape}-qlora-lmforge"] = Row(shape, "qlora", "lmforge")
        rows[f"{shape}-qlora-lmforge-dropout0"] = Row(shape, "qlora", "lmforge", ["--lora_dropout", "0"])
        for budget in ("0.1", "0.2", "0.3"):
            rows[f"{shape}-qlora-lmforge-budget{budget}"] = Row(shape, "qlora", "lmforge",
                                                                 ["--compile_memory_budget", budget])
        rows[f"{shape}-qlora-lmforge-ckpt"] = Row(shape, "qlora", "lmforge", ["--gradient_checkpointing", "True"])
        rows[f"{shape}-dpo-trl"] = Row(shape, "dpo", "trl", max_len=1024)
        rows[f"{shape}-dpo-lmforge"] = Row(shape, "dpo", "lmforge", max_len=1024)
        rows[f"{shape}-dpo-lmforge-compile"] = Row(shape, "dpo", "lmforge", ["--compile_blocks", "True"], max_len=1024)
        rows[f"{shape}-dpo-lmforge-graphs"] = Row(shape, "dpo", "lmforge", ["--cuda_graphs", "True"], max_len=1024)
        rows[f"{shape}-full-lmforge-graphs"] = Row(shape, "full", "lmforge", ["--cuda_graphs", "True"])
        # Inductor's C++ wrapper: the compiled graphs launch their kernels from C++, not Python.
        cpp = {"TORCHINDUCTOR_CPP_WRAPPER": "1"}
        rows[f"{shape}-dpo-lmforge-cppwrap"] = Row(shape, "dpo", "lmforge", max_len=1024, env=cpp)
        rows[f"{shape}-full-lmforge-cppwrap"] = Row(shape, "full", "lmforge", env=cpp)
        rows[f"{shape}-dpo-lmforge-packed"] = Row(shape, "dpo", "lmforge", ["--packing", "True"], max_len=1024)
        rows[f"{shape}-dpo-lmforge-packed-eager"] = Row(shape, "dpo", "lmforge",
                                                        ["--packing", "True", "--compile_blocks", "False"],
                                                        max_len=1024)
        rows[f"{shape}-long-lmforge"] = Row(shape, "full", "lmforge", max_len=32768, batch=1, long=True)
        rows[f"{shape}-long-lmforge-ckpt"] = Row(shape, "full", "lmforge", ["--gradient_checkpointing", "True"],
                                                 max_len=32768, batch=1, long=True)
        # PyTorch's varlen kernel where flash-attn-4 would be chosen: what the Hopper kernel gains.
        torch_attn = ["--varlen_kernel", "torch"]
        rows[f"{shape}-full-lmforge-torchattn"] = Row(shape, "full", "lmforge", torch_attn)
        rows[f"{shape}-lora-lmforge-torchattn"] = Row(shape, "lora", "lmforge", torch_attn)
        # 8-bit AdamW states over bf16 weights (no fp32 masters): 6 bytes a weight, what lets the
        # 7B shape train fully on one GPU.
        rows[f"{shape}-full-lmforge-8bit"] = Row(shape, "full", "lmforge", ["--optim", "adamw_torch_8bit"])
        # bf16 matmuls where --fp8 auto would choose float8: what float8 gains.
        rows[f"{shape}-full-lmforge-bf16"] = Row(shape, "full", "lmforge", ["--fp8", "false"])
        rows[f"{shape}-long-lmforge-torchattn"] = Row(shape, "full", "lmforge", torch_attn, max_len=32768, batch=1,
                                                      long=True)
    return rows


ROWS = _rows()


# --- data ---------------------------------------------------------------------------------------

def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_chat(path: str, n: int, seed: int = 0, long: bool = False) -> None:
    """`messages` records; the same file feeds lmforge, TRL (as prompt / completion) and the seed
    runner. Lengths in words: log-normal, median 450, capped at 1950 (the template's tokens on top
    stay under 2048); long records: 16,000-30,000 words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            total = rng.randint(16000, 30000) if long else min(1950, max(16, int(rng.lognormvariate(math.log(450), 0.8))))
            half = total // 2
            f.write(json.dumps({"messages": [{"role": "user", "content": words(rng, half)},
                                             {"role": "assistant", "content": words(rng, total - half)}]}) + "\n")


def write_pairs(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": words(rng, 300)}],
                                "chosen": [{"role": "assistant", "content": words(rng, 200)}],
                                "rejected": [{"role": "assistant", "content": words(rng, 200)}]}) + "\n")


def model_config(shape: str, tokenizer):
    import transformers

    if SHAPES[shape] is None:
        return transformers.AutoConfig.for_model(**TINY, vocab_size=len(tokenizer))
    with open(os.path.join(HERE, "configs", SHAPES[shape] + ".json")) as f:
        config = json.load(f)
    if len(tokenizer) > config["vocab_size"]:
        # The Llama shape with Qwen's tokenizer: Qwen's embedding rows (the tokenizer's, padded to 64).
        config["vocab_size"] = 151936 if len(tokenizer) <= 151936 else -(-len(tokenizer) // 64) * 64
        config.pop("bos_token_id", None), config.pop("eos_token_id", None)
    return transformers.AutoConfig.for_model(**config)


def config_file(shape: str, work: str, tokenizer) -> str:
    path = os.path.join(work, f"config-{shape}.json")
    if not os.path.isfile(path):
        model_config(shape, tokenizer).to_json_file(path)
    return path


def saved_base(shape: str, work: str, tokenizer) -> str:
    """A random-init bf16 base on disk, with the tokenizer, for LoRA / QLoRA / DPO rows."""
    import torch
    import transformers

    path = os.path.join(work, f"base-{shape}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(model_config(shape, tokenizer), dtype=torch.bfloat16)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del model
    return path


# --- the clock ----------------------------------------------------------------------------------

def install_clock(warmup: int):
    """The callback that times steps warmup+1 .. last, with `transformers.Trainer.training_step`
    wrapped to count the useful tokens of each batch in that window."""
    import torch
    import transformers

    from lmforge.training.progress import useful_tokens

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.counting, self.tokens, self.start, self.end, self.steps = False, 0, None, None, 0
            self.first_step = None
            self.extra: list = []  # more callbacks (the profile)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup and self.start is None:
                torch.cuda.synchronize()
                self.start, self.counting, self.first_step = time.perf_counter(), True, state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if self.counting and state.global_step >= state.max_steps:
                torch.cuda.synchronize()
                self.end, self.counting = time.perf_counter(), False
                self.steps = state.global_step - self.first_step

    clock = Clock()
    if not torch.cuda.is_available():  # a dry run of the rows on a CPU
        torch.cuda.synchronize = lambda *_: None
    # The outermost training_step of each class: lmforge's, when it replays a CUDA graph, does not
    # call the one it overrides. A call inside another counted call is not counted again.
    from lmforge.training.step import Trainer as LmforgeTrainer

    depth = [0]
    for cls in (transformers.Trainer, LmforgeTrainer):
        def counted(self, model, inputs, *args, _step=cls.training_step, **kwargs):
            if clock.counting and depth[0] == 0:
                clock.tokens = clock.tokens + useful_tokens(inputs)
            depth[0] += 1
            try:
                return _step(self, model, inputs, *args, **kwargs)
            finally:
                depth[0] -= 1

        cls.training_step = counted
    return clock


def kernel_kind(name: str) -> str:
    """A GPU kernel's part of the step, from its name (for the profile's summary)."""
    n = name.lower()
    for kind, marks in (("attention", ("flash", "fmha", "attention")),
                        ("optimizer", ("adam", "multi_tensor", "foreach", "fused_adam")),
                        ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "wgmma")),
                        ("compiled (triton)", ("triton",)),  # Inductor's, whatever they fuse (to_copy too)
                        ("copy / cast", ("copy", "memcpy", "cast", "to_copy")),
                        ("memset / fill", ("memset", "fill")),
                        ("loss / softmax", ("softmax", "log_softmax", "cross_entropy", "nll"))):
        if any(m in n for m in marks):
            return kind
    return "other"


def launched_by(events, kinds: tuple[str, ...], steps: int, top: int = 8) -> list[str]:
    """The costliest kernels of some kinds with the ops that launched them (three levels of
    callers, and the launching op's input shapes): where a step's copies come from."""
    cost: dict[tuple, list[float]] = {}
    for e in events:
        for k in getattr(e, "kernels", None) or []:
            if kernel_kind(k.name) not in kinds:
                continue
            chain, op = [], e
            while op is not None and len(chain) < 3:
                chain.append(op.name)
                op = op.cpu_parent
            key = (k.name[:70], " < ".join(chain), str(getattr(e, "input_shapes", ""))[:120])
            c = cost.setdefault(key, [0.0, 0])
            c[0] += k.duration / 1e3 / steps
            c[1] += 1 / steps
    lines = [f"costliest {' and '.join(kinds)} kernels, by launching op:"]
    for (name, chain, shapes), (ms, n) in sorted(cost.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms:7.2f} ms/step {n:5.0f}x  {name}  <- {chain}  {shapes}")
    return lines


def install_profile(first: int, steps: int, path: str):
    """A callback that profiles steps first+1 .. first+steps (before the clock's window) and
    writes what a step is made of to PATH.txt (and its trace to PATH.trace.json.gz)."""
    import gzip
    import shutil

    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    class Profile(transformers.TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and self.prof is None:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or state.global_step != first + steps:
                return
            torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / steps
            self.prof.__exit__(None, None, None)
            # GPU kernels only: an annotated range (Optimizer.step#...) is shown on the GPU timeline too.
            events = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and not getattr(e, "is_user_annotation", False)]
            spans = sorted((e.time_range.start, e.time_range.end) for e in events)
            busy, end = 0.0, -1.0
            for a, b in spans:  # the union of kernel intervals: time the GPU was running something
                busy += max(0.0, b - max(a, end))
                end = max(end, b)
            busy_s = busy / 1e6 / steps
            total = sum(e.device_time for e in events) / 1e6 / steps
            lines = [f"wall {1000 * wall:.1f} ms/step; GPU busy {1000 * busy_s:.1f} ms/step "
                     f"({100 * busy_s / wall:.0f} %); kernel time {1000 * total:.1f} ms/step; "
                     f"{len(events) / steps:.0f} kernels/step"]
            kinds: dict[str, list[float]] = {}
            for e in events:
                k = kinds.setdefault(kernel_kind(e.name), [0.0, 0])
                k[0] += e.device_time / 1e3 / steps
                k[1] += 1 / steps
            for kind, (ms, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
                lines.append(f"  {kind:<20} {ms:8.2f} ms/step  {n:6.0f} kernels/step")
            lines += launched_by(self.prof.events(), ("copy / cast", "other"), steps)
            host = {}
            for e in self.prof.events():
                if e.device_type == torch.autograd.DeviceType.CPU and any(
                        s in e.name for s in ("Synchronize", "aten::item", "_local_scalar_dense", "cudaMemcpy")):
                    host[e.name] = host.get(e.name, 0) + 1 / steps
            lines.append("host waits / copies per step: " + ", ".join(f"{k} {v:.0f}" for k, v in host.items()))
            averages = self.prof.key_averages()
            lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
            # Where the host's time goes (a launch-bound step waits on it): ops by their own CPU time.
            lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
            with open(path + ".txt", "w") as f:
                f.write("\n".join(lines) + "\n")
            trace = path + ".trace.json"
            self.prof.export_chrome_trace(trace)
            with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(trace)
            self.prof = None

    return Profile()


# --- the runners (inside the row's process) ------------------------------------------------------

def run_lmforge(row: Row, a, clock) -> None:
    from lmforge import dpo, sft

    common = ["--bf16", "True", "--per_device_train_batch_size", str(row.batch), "--max_steps", str(a.steps),
              "--learning_rate", "2e-5", "--save_strategy", "no", "--report_to", "none", "--logging_steps",
              str(a.steps), "--output_dir", os.path.join(a.work, "out", a.run), "--overwrite_output_dir", "True",
              "--resume", "False", "--disable_tqdm", "True", "--data_cache_dir", os.path.join(a.work, "cache")]
    tok = a.tokenizer
    if row.method == "dpo":
        base = saved_base(row.shape, a.work, _tokenizer(tok))
        dpo.main(["--model_name_or_path", base, "--data_path", os.path.join(a.work, "pairs.jsonl"),
                  "--lora", "True", "--lora_r", "16", "--lora_alpha", "32", "--model_max_length", str(row.max_len),
                  *common, *row.extra], callbacks=[clock, *clock.extra])
        return
    data = os.path.join(a.work, "long.jsonl" if row.long else "chat.jsonl")
    if row.method == "full":
        model = ["--config_name", config_file(row.shape, a.work, _tokenizer(tok)), "--tokenizer_name", tok]
    else:
        model = ["--model_name_or_path", saved_base(row.shape, a.work, _tokenizer(tok)), "--lora", "True",
                 "--lora_r", "16", "--lora_alpha", "32", *(["--q_lora", "True"] if row.method == "qlora" else [])]
    sft.main([*model, "--data_path", data, "--model_max_length", str(row.max_len), *common, *row.extra],
             callbacks=[clock, *clock.extra])


def _tokenizer(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def _chat_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_seed(row: Row, a, clock) -> None:
    """FastChat's train.py, reduced to what sets its speed: the HF Trainer, fp32 weights under
    bf16 autocast, rows right-padded to model_max_length, gradient checkpointing, its own loss."""
    import torch
    import transformers

    tokenizer = _tokenizer(a.tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for record in _chat_records(os.path.join(a.work, "chat.jsonl"))[: a.steps * row.batch]:
        ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(record["messages"][:1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        ids = ids[: row.max_len]
        labels = [-100] * len(prompt) + ids[len(prompt):]
        n = row.max_len - len(ids)
        rows.append({"input_ids": torch.tensor(ids + [pad] * n), "labels": torch.tensor(labels[: len(ids)] + [-100] * n),
                     "attention_mask": torch.tensor([1] * len(ids) + [0] * n)})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config(row.shape, tokenizer), dtype=torch.float32,
                                                          attn_implementation="sdpa")
    model.config.use_cache = False
    args = transformers.TrainingArguments(
        output_dir=os.path.join(a.work, "out", a.run), max_steps=a.steps, per_device_train_batch_size=row.batch,
        learning_rate=2e-5, bf16=True, gradient_checkpointing=True, save_strategy="no", report_to="none",
        logging_steps=a.steps, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock, *clock.extra]).train()


def run_trl(row: Row, a, clock) -> None:
    import datasets
    import torch
    import transformers
    import trl

    tokenizer = _tokenizer(a.tokenizer)
    torch.manual_seed(0)
    common = dict(output_dir=os.path.join(a.work, "out", a.run), max_steps=a.steps,
                  per_device_train_batch_size=row.batch, bf16=True, gradient_checkpointing=False,
                  save_strategy="no", report_to="none", logging_steps=a.steps, disable_tqdm=True,
                  max_length=row.max_len, use_cpu=not torch.cuda.is_available())
    lora = None
    if row.method in ("lora", "dpo"):
        import peft

        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                               task_type="CAUSAL_LM")
    if row.method == "dpo":
        model = transformers.AutoModelForCausalLM.from_pretrained(saved_base(row.shape, a.work, tokenizer),
                                                                  dtype=torch.bfloat16, attn_implementation="sdpa")
        data = datasets.Dataset.from_list(_chat_records(os.path.join(a.work, "pairs.jsonl")))
        config = trl.DPOConfig(learning_rate=5e-5, **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora, callbacks=[clock, *clock.extra])
        trainer.train()
        return
    if row.method == "full":
        model = transformers.AutoModelForCausalLM.from_config(model_config(row.shape, tokenizer),
                                                              dtype=torch.bfloat16, attn_implementation="sdpa")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(saved_base(row.shape, a.work, tokenizer),
                                                                  dtype=torch.bfloat16, attn_implementation="sdpa")
    records = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]}
               for r in _chat_records(os.path.join(a.work, "long.jsonl" if row.long else "chat.jsonl"))]
    config = trl.SFTConfig(packing=True, completion_only_loss=True, learning_rate=2e-5,
                           use_liger_kernel=_installed("liger_kernel"), **common)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=lora, callbacks=[clock, *clock.extra])
    trainer.train()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_row(a) -> None:
    """One row, in this process; its figures go to WORK/results/ROW.json."""
    import torch

    import faulthandler

    row = ROWS[a.run]
    # A row that runs out of time says where it was: every thread's stack, printed shortly before.
    faulthandler.dump_traceback_later(max(10, a.timeout - 15), exit=False)
    clock = install_clock(a.warmup)
    if a.profile:
        os.makedirs(os.path.join(a.work, "results"), exist_ok=True)
        first = a.warmup - a.profile - 1  # after compiling, ending a step before the timed window
        clock.extra = [install_profile(first, a.profile, os.path.join(a.work, "results", a.run + ".profile"))]
    if a.memory:
        from memory_peak import install_memory

        os.makedirs(os.path.join(a.work, "results"), exist_ok=True)
        # The last untimed step: compiled, and the recording's cost outside the clock's window.
        clock.extra.append(install_memory(a.warmup - 1, os.path.join(a.work, "results", a.run + ".memory")))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    {"lmforge": run_lmforge, "seed": run_seed, "trl": run_trl}[row.runner](row, a, clock)
    tokens = int(clock.tokens)
    seconds = clock.end - clock.start
    result = {"row": a.run, "run": row.describe(), "steps_timed": clock.steps, "seconds": seconds,
              "tokens_per_s": tokens / seconds, "pairs_per_s": clock.steps * row.batch / seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0}
    os.makedirs(os.path.join(a.work, "results"), exist_ok=True)
    with open(os.path.join(a.work, "results", a.run + ".json"), "w") as f:
        json.dump(result, f)


# --- the side-by-side run ------------------------------------------------------------------------

def versions() -> str:
    import importlib.metadata as md

    import torch

    out = []
    for p in ("torch", "transformers", "peft", "trl", "liger-kernel", "bitsandbytes"):
        try:
            out.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{device}, host CPU {host_cpu()}; " + ", ".join(out)


def host_cpu() -> str:
    """The host's processor model: rows bound by kernel launches (DPO) run at its pace."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else "unknown"
    except OSError:
        return "unknown"


def peer_of(name: str, runner: str) -> str | None:
    """The row a row is compared with: its shape and method's TRL or seed row."""
    shape, method = name.split("-")[:2]
    if method == "long":
        return None
    peer = f"{shape}-{method}-{runner}"
    return peer if peer in ROWS and peer != name else None


def table(results: dict[str, dict]) -> list[str]:
    lines = [f"{'row':<28} {'useful tok/s':>12} {'pairs/s':>8} {'peak GiB':>9} {'vs TRL':>7} {'vs seed':>8}  run"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<28} {r['error']}")
            continue
        dpo = ROWS[name].method == "dpo"
        key = "pairs_per_s" if dpo else "tokens_per_s"
        ratios = []
        for runner in ("trl", "seed"):
            peer = results.get(peer_of(name, runner) or "", {})
            ratios.append(f"{r[key] / peer[key]:.2f}x" if key in peer and ROWS[name].runner == "lmforge" else "")
        lines.append(f"{name:<28} {r['tokens_per_s']:>12,.0f} {r['pairs_per_s'] if dpo else 0:>8.2f} "
                     f"{r['peak_gib']:>9.1f} {ratios[0]:>7} {ratios[1]:>8}  {r['run']}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=["0.5b-full-seed", "0.5b-full-trl", "0.5b-full-lmforge"])
    p.add_argument("--tokenizer", default=os.path.join(ROOT, ".devdata", "tokenizers", "qwen2.5-0.5b-instruct"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--work", default="/tmp/lmforge-cli-bench")
    p.add_argument("--timeout", type=int, default=600, help="seconds a row may take")
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many steps before the timed window (its summary printed after the row)")
    p.add_argument("--memory", action="store_true",
                   help="record the allocator over the last untimed step and write what held its peak "
                        "(bench/memory_peak.py) beside the row's results, printed after the row")
    p.add_argument("--list", action="store_true")
    p.add_argument("--run", help=argparse.SUPPRESS)  # one row, in this process
    a = p.parse_args()
    if a.profile and a.warmup - a.profile - 1 < 1:
        p.error(f"--profile {a.profile} needs --warmup {a.profile + 2} or more: the profiled steps come after the "
                "first and end before the timed window")
    if a.list:
        for name, row in ROWS.items():
            print(f"{name:<28} {row.describe()}")
        return
    if a.run:
        return run_row(a)
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; --list shows them")
    os.makedirs(a.work, exist_ok=True)
    write_chat(os.path.join(a.work, "chat.jsonl"), a.records)
    write_chat(os.path.join(a.work, "long.jsonl"), 60, long=True)
    write_pairs(os.path.join(a.work, "pairs.jsonl"), 2 * a.steps * 8)
    results: dict[str, dict] = {}
    for name in a.rows:
        started = time.time()
        for kind in (".json", ".profile.txt", ".profile.trace.json.gz", ".memory.txt"):  # nothing left from an earlier run
            stale = os.path.join(a.work, "results", name + kind)
            if os.path.isfile(stale):
                os.remove(stale)
        cmd = [sys.executable, os.path.abspath(__file__), "--run", name, "--tokenizer", a.tokenizer, "--steps",
               str(a.steps if not ROWS[name].long else max(a.warmup + 5, a.steps // 4)), "--warmup", str(a.warmup),
               "--work", a.work, "--profile", str(a.profile), "--timeout", str(a.timeout),
               *(["--memory"] if a.memory else [])]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                                  env={**os.environ, **ROWS[name].env})
            path = os.path.join(a.work, "results", name + ".json")
            if done.returncode == 0 and os.path.isfile(path):
                with open(path) as f:
                    results[name] = json.load(f)
            else:
                # All it printed beside the results (a crash's stacks are longer than any summary).
                with open(os.path.join(a.work, "results", name + ".log"), "w") as f:
                    f.write(done.stdout + "\n" + done.stderr)
                tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
                results[name] = {"error": f"exit {done.returncode}: " + " | ".join(tail)[-600:]}
        except subprocess.TimeoutExpired as e:
            # What the row printed (its stacks, from faulthandler); bytes here even with text=True.
            printed = [(o.decode(errors="replace") if isinstance(o, bytes) else o or "") for o in (e.stdout, e.stderr)]
            print("\n".join("\n".join(printed).strip().splitlines()[-60:]), flush=True)
            results[name] = {"error": f"over {a.timeout} s"}
        print(json.dumps({name: results[name], "wall_s": round(time.time() - started, 1)}), flush=True)
        profile = os.path.join(a.work, "results", name + ".profile.txt")
        if os.path.isfile(profile):
            print(f"== profile of {name}\n" + open(profile).read(), flush=True)
        memory = os.path.join(a.work, "results", name + ".memory.txt")
        if os.path.isfile(memory):
            print(f"== memory of {name}\n" + open(memory).read(), flush=True)
    print(f"device: {versions()}")
    print(f"data: {a.records} single-turn chat records (log-normal words, median 450), {a.steps} steps, "
          f"the first {a.warmup} untimed")
    print("\n".join(table(results)))
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
