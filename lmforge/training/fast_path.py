"""The fastest measured way to train, chosen for the flags a user left unset.

A run on a CUDA GPU with `--bf16 True` (FastChat's and happy-llm's command lines) gets, unless a
flag says otherwise:
  - the model held in bf16 with AdamW over fp32 master weights (`lmforge.modeling.optim`) instead of fp32
    weights under bf16 autocast: no fp32 activations and residual stream, no casts of every weight
    on every use;
  - compiled decoder blocks (`modeling.load.compile_blocks`) where the rows all have one length (packed
    rows, pretraining blocks) or are DPO's pairs: the elementwise work small models are bound by
    is fused;
  - with them, an activation memory budget of 0.8: the compiler recomputes the cheapest
    activations in the backward instead of keeping them; 0.1 under --q_lora without gradient
    checkpointing (a 4-bit base is chosen to fit a small memory, so memory comes before speed
    there; QLoRA DPO takes the same rule, not measured).
  - for DPO's padded pairs on one GPU, CUDA graphs over whole micro-steps (lmforge.training.graphs): its
    step is bound by the host launching thousands of kernels.
Together they make FastChat's command line on the Qwen2.5-0.5B shape faster and lighter than fp32
weights run eagerly (measured: docs/bench_results.md, 2026-12-02, the command lines beside TRL).
Each choice is printed with its reason and the flag that turns it off.

Where they are not chosen, and why:
  - no CUDA GPU: bf16 weights would also be computed in bf16 on a CPU, whose bf16 matmuls are
    slower than fp32 ones; and compiling costs more than it saves there: a demo stage trains too
    few tokens to repay the compile time (measured: docs/bench_results.md, 2026-12-02, the
    command lines beside TRL, its CPU paragraph);
  - one record a row (--packing False): rows of many lengths, not measured compiled (DPO's pairs,
    also of many lengths, are compiled: after the second length the compiler makes the graph
    dynamic in it, and LoRA DPO trains faster so);
  - DeepSpeed or FSDP: their engines keep their own fp32 masters from fp32 weights, and compiled
    blocks under their parameter hooks were not measured;
  - --fp16: the weights stay fp32 under fp16 autocast and the Trainer's loss scaler. fp16
    weights over fp32 masters (--torch_dtype float16) train correctly under the scaler (it
    unscales and checks the masters' fp32 gradients, and the clipping measures them:
    tests/modeling/test_optim.py), but ran no faster than the bf16 default (measured: docs/bench_results.md,
    2026-12-03, CUDA graphs over DPO's micro-steps), and a model trained in bf16 can overflow fp16
    in its residual stream, which autocast keeps in fp32.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Less memory than 1.0 at no speed cost (measured: docs/bench_results.md, 2026-11-23, grouped heads
# to the varlen kernel).
COMPILED_MEMORY_BUDGET = 0.8
# QLoRA is chosen to fit a small memory: there the compiler keeps a tenth of the blocks' activations,
# a fraction of 0.8's memory for some speed (measured: docs/bench_results.md, 2026-12-02 (evening),
# QLoRA's memory budget).
QUANTIZED_MEMORY_BUDGET = 0.1


@dataclass
class Choice:
    flag: str
    value: object
    why: str


class Rows(enum.Enum):
    """What a method's batches hold."""

    PACKED = "packed"  # packed rows of one length (chat rows, pretraining blocks)
    PAIRS = "pairs"  # preference pairs padded to the longest of their batch (DPO)
    PACKED_PAIRS = "packed pairs"  # a batch's preference pairs packed in one row (DPO --packing True)
    PADDED = "padded"  # one record a row, padded to the longest of its batch (--packing False)
    ROLLOUTS = "rollouts"  # GRPO: completions sampled by `generate`, then packed prompt + completion rows


def choose_fast_path(model_args, args, rows: Rows, cuda: bool | None = None, quantized: bool = False) -> list[Choice]:
    """Fill `torch_dtype`, `compile_blocks` and `compile_memory_budget` where the command line
    left them unset (None), in place, and return each choice with its reason. `quantized`: a
    4-bit base model (QLoRA), where memory comes first."""
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
            dtype, why = "float32", ("--fp16: fp32 weights under fp16 autocast and a loss scaler (--torch_dtype "
                                     "float16: fp16 weights over fp32 masters, not measured as faster yet)")
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
        elif rows is Rows.ROLLOUTS:
            # Compiled blocks keep `generate` from compiling its static-cache decode step, and the
            # training half of a GRPO step is small: sampling took far longer with them and training
            # no less time (measured: docs/bench_results.md, 2026-12-07, GRPO on one H100).
            on, why = False, "GRPO: sampling's compiled decode step is faster without them (--compile_blocks True: on)"
        elif rows is Rows.PADDED:
            on, why = False, "rows of many lengths, not measured compiled (--packing True packs them)"
        elif rows in (Rows.PAIRS, Rows.PACKED_PAIRS):
            # The pairs' batches change length; after the second length the compiler makes the
            # blocks' graph dynamic in it, faster than eager (measured: docs/bench_results.md,
            # 2026-12-02, the command lines beside TRL).
            on, why = True, "CUDA GPU; pair batches compile to one graph of dynamic length (--compile_blocks False: eager)"
        else:
            on, why = True, "CUDA GPU and packed rows of one length (--compile_blocks False: eager)"
        args.compile_blocks = on
        choices.append(Choice("compile_blocks", on, why))

    if args.compile_memory_budget is None:
        if not (args.compile_blocks and cuda):
            args.compile_memory_budget = 1.0
        elif quantized and not args.gradient_checkpointing:
            args.compile_memory_budget = QUANTIZED_MEMORY_BUDGET
            choices.append(Choice("compile_memory_budget", QUANTIZED_MEMORY_BUDGET,
                                  "QLoRA: the compiler recomputes most activations in the backward: far less "
                                  "memory for some speed (0.8: the faster, larger setting)"))
        else:
            args.compile_memory_budget = COMPILED_MEMORY_BUDGET
            choices.append(Choice("compile_memory_budget", COMPILED_MEMORY_BUDGET, "recomputes the cheapest "
                                  "activations in the backward: less memory at no measured speed cost (1: keep "
                                  "them all)"))
    if getattr(args, "cuda_graphs", False) is None:
        from lmforge.training.graphs import graphs_unsupported

        on = rows is Rows.PAIRS and graphs_unsupported(args, cuda) is None
        args.cuda_graphs = on
        if on:
            choices.append(Choice("cuda_graphs", True, "DPO's step is bound by the host launching kernels; one CUDA "
                                  "graph per batch shape replaces them (--cuda_graphs False: launched one by one)"))
    return choices


def describe(choices: list[Choice]) -> list[str]:
    """The lines that say the choices made (none when the user set every flag): one a reason,
    flags that share a reason on one line."""
    by_reason: dict[str, list[Choice]] = {}
    for c in choices:
        by_reason.setdefault(c.why, []).append(c)
    return [f"lmforge: speed: {', '.join(f'--{c.flag} {c.value}' for c in group)} ({why})"
            for why, group in by_reason.items()]
