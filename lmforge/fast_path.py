"""The fastest measured way to train, chosen for the flags a user left unset.

A run on a CUDA GPU with `--bf16 True` (FastChat's and happy-llm's command lines) gets, unless a
flag says otherwise:
  - the model held in bf16 with AdamW over fp32 master weights (`lmforge.optim`) instead of fp32
    weights under bf16 autocast: no fp32 activations and residual stream, no casts of every weight
    on every use;
  - compiled decoder blocks (`model.compile_blocks`) where the rows all have one length (packed
    rows, pretraining blocks): the elementwise work small models are bound by is fused;
  - with them, an activation memory budget of 0.8: the compiler recomputes the cheapest
    activations in the backward instead of keeping them.
On the H200 (docs/bench_results.md) these took the Qwen2.5-0.5B shape from 89k to 137k useful
tokens/s and its peak memory from 34 to 20 GiB. Each choice is printed with the reason and the
flag that turns it off.

Where they are not chosen, and why:
  - no CUDA GPU: bf16 weights would also be computed in bf16 on a CPU, whose bf16 matmuls are
    slower than fp32 ones; and compiling a tiny CPU model costs more than it saves (the first
    compiled step alone takes ~20 s, a whole demo stage 30-60 s);
  - rows of varying length (--packing False, DPO's pairs): a compiled block would recompile per
    length or need every row padded to --model_max_length;
  - DeepSpeed or FSDP: their engines keep their own fp32 masters from fp32 weights, and compiled
    blocks under their parameter hooks were not measured;
  - --fp16: fp16 gradients need loss scaling, which the master-weight AdamW does not do; the
    weights stay fp32 under fp16 autocast (the Trainer's GradScaler).
"""

from __future__ import annotations

from dataclasses import dataclass

COMPILED_MEMORY_BUDGET = 0.8  # measured at no speed cost on the 0.5B shape (124.7k vs 123.8k tok/s, 19.6 vs 24.5 GiB)


@dataclass
class Choice:
    flag: str
    value: object
    why: str


def choose_fast_path(model_args, args, packed_rows: bool, cuda: bool | None = None) -> list[Choice]:
    """Fill `torch_dtype`, `compile_blocks` and `compile_memory_budget` where the command line
    left them unset (None), in place, and return each choice with its reason. `packed_rows`:
    every batch holds rows of one length (packed chat rows, pretraining blocks)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available() and not args.use_cpu
    engine = "DeepSpeed" if args.deepspeed else "FSDP" if args.fsdp else None
    choices: list[Choice] = []

    if model_args.torch_dtype is None:
        if not cuda:
            dtype, why = "float32", "no CUDA GPU: compiled blocks and bf16 weights pay off on a GPU only"
        elif engine:
            dtype, why = "float32", f"{engine} keeps its own fp32 master weights from fp32 ones"
        elif args.fp16:
            dtype, why = "float32", "--fp16 trains fp32 weights under fp16 autocast (loss scaling needs them)"
        elif args.bf16:
            dtype, why = "bfloat16", ("the model computes in bf16, AdamW updates fp32 master weights "
                                      "(--torch_dtype float32: fp32 weights under bf16 autocast)")
        else:
            dtype, why = "float32", "no --bf16"
        model_args.torch_dtype = dtype
        choices.append(Choice("torch_dtype", dtype, why))

    if args.compile_blocks is None:
        if not cuda:
            on, why = False, "no CUDA GPU: compiled blocks and bf16 weights pay off on a GPU only"
        elif engine:
            on, why = False, f"not measured under {engine}"
        elif not packed_rows:
            on, why = False, "rows of varying length (a compiled block would recompile per length)"
        else:
            on, why = True, "CUDA GPU and packed rows of one length (--compile_blocks False: eager)"
        args.compile_blocks = on
        choices.append(Choice("compile_blocks", on, why))

    if args.compile_memory_budget is None:
        budget = COMPILED_MEMORY_BUDGET if args.compile_blocks and cuda else 1.0
        args.compile_memory_budget = budget
        if args.compile_blocks and cuda:
            choices.append(Choice("compile_memory_budget", budget, "recomputes the cheapest activations in the "
                                  "backward: less memory at no measured speed cost (1: keep them all)"))
    return choices


def describe(choices: list[Choice]) -> list[str]:
    """The lines that say the choices made (none when the user set every flag): one a reason,
    flags that share a reason on one line."""
    by_reason: dict[str, list[Choice]] = {}
    for c in choices:
        by_reason.setdefault(c.why, []).append(c)
    return [f"lmforge: speed: {', '.join(f'--{c.flag} {c.value}' for c in group)} ({why})"
            for why, group in by_reason.items()]
