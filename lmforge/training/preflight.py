"""The pre-flight check, printed by rank 0 before the first step (and by `lmforge prepare
--show N` without training): the first rendered example(s) with the tokens that carry loss
marked, as a user checks a mask; the number of optimizer steps; tokens per step; and an
estimate of the memory the weights, gradients and optimizer state take.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import transformers

from lmforge.data.render import IGNORE_INDEX

# Plain-text markers around the tokens that carry loss; with a terminal, colour instead.
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


def label_spans(labels: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Runs of consecutive positions that carry loss or do not: (start, stop, trained)."""
    spans: list[tuple[int, int, bool]] = []
    for i, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if spans and spans[-1][2] == trained:
            spans[-1] = (spans[-1][0], i + 1, trained)
        else:
            spans.append((i, i + 1, trained))
    return spans


def highlight(tokenizer, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """The record's text with every run of trained tokens wrapped in [[ ]] (or coloured).
    Each run is decoded on its own, so the marks fall exactly on token boundaries (special
    tokens are shown as they are, the end-of-turn token included)."""
    opening, closing = (ANSI_TRAINED, ANSI_RESET) if color else (TRAINED_OPEN, TRAINED_CLOSE)
    parts = []
    for start, stop, trained in label_spans(labels):
        text = tokenizer.decode(list(input_ids[start:stop]), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        parts.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(parts)


def use_color(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")


def show_example(tokenizer, record: dict, title: str, color: bool) -> str:
    ids = list(record["input_ids"])
    labels = list(record.get("labels", ids))
    trained = sum(1 for t in labels if t != IGNORE_INDEX)
    marks = "green" if color else f"{TRAINED_OPEN}...{TRAINED_CLOSE}"
    head = f"{title} ({len(ids)} tokens, {trained} with loss, marked {marks}):"
    body = highlight(tokenizer, ids, labels, color)
    return head + "\n" + "\n".join("    " + line for line in body.split("\n"))


# ---------------------------------------------------------------------------------------------
# Steps, tokens per step, memory
# ---------------------------------------------------------------------------------------------


def optimizer_steps(rows: int, per_device_batch: int, accumulation: int, world_size: int, epochs: float,
                    max_steps: int, drop_last: bool = False) -> tuple[int, int]:
    """(optimizer steps of the run, optimizer steps per epoch) as the Trainer counts them:
    each process gets every world_size-th batch, a step is `accumulation` batches (a last,
    shorter group still steps), --max_steps wins over --num_train_epochs."""
    batches = rows // per_device_batch if drop_last else math.ceil(rows / per_device_batch)
    per_process = math.ceil(batches / world_size)
    per_epoch = max(math.ceil(per_process / accumulation), 1)
    return (max_steps if max_steps > 0 else math.ceil(epochs * per_epoch)), per_epoch


@dataclass
class MemoryEstimate:
    parameters: int
    trainable: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gradients_gib + self.optimizer_gib


def estimate_memory(model, args=None) -> MemoryEstimate:
    """Bytes of the weights as stored, of a gradient per trained weight (in its dtype), and of
    the optimizer's state (`lmforge.modeling.optim.state_bytes`; without `args`, AdamW's: two fp32 moments
    per trained weight, plus an fp32 master copy of a trained weight held in 16 bits). For the
    whole model, before any sharding across processes; activations not included."""
    from lmforge.modeling.optim import state_bytes

    params = trainable = weights = grads = optim = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves an empty placeholder
        size = p.element_size()
        params += n
        weights += n * size
        if p.requires_grad:
            trainable += n
            grads += n * size
            optim += n * state_bytes(args, p.dtype)
    gib = 2**30
    return MemoryEstimate(params, trainable, weights / gib, grads / gib, optim / gib)


@dataclass
class Plan:
    steps: int
    steps_per_epoch: int
    rows_per_step: int
    tokens_per_step: float
    trained_tokens_per_step: float
    max_tokens_per_step: Optional[int]
    memory: Optional[MemoryEstimate]


def make_plan(args: transformers.TrainingArguments, steps: int, steps_per_epoch: int, tokens: int,
              trained_tokens: int, row_length: Optional[int], memory: Optional[MemoryEstimate]) -> Plan:
    """Per-step figures from one epoch's tokens (`tokens` useful, `trained_tokens` with loss)."""
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return Plan(steps, steps_per_epoch, rows_per_step, tokens / steps_per_epoch, trained_tokens / steps_per_epoch,
                rows_per_step * row_length if row_length else None, memory)


def plan_lines(plan: Plan, args: transformers.TrainingArguments) -> list[str]:
    epochs = plan.steps / plan.steps_per_epoch
    lines = [f"optimizer steps: {plan.steps:,} ({epochs:.3g} epochs of {plan.steps_per_epoch:,}); "
             f"{plan.rows_per_step:,} rows a step = {args.per_device_train_batch_size} per device × "
             f"{args.gradient_accumulation_steps} accumulation × {args.world_size} process(es)"]
    bound = f" of at most {plan.max_tokens_per_step:,}" if plan.max_tokens_per_step else ""
    lines.append(f"tokens per step: ~{plan.tokens_per_step:,.0f} useful{bound}, ~{plan.trained_tokens_per_step:,.0f} "
                 "with loss")
    m = plan.memory
    if m is not None:
        lines.append(f"estimated memory: {m.total_gib:.2f} GiB = weights {m.weights_gib:.2f} + gradients "
                     f"{m.gradients_gib:.2f} + optimizer state {m.optimizer_gib:.2f} ({m.parameters / 1e6:,.2f}M "
                     f"parameters, {m.trainable / 1e6:,.2f}M trained; an estimate: activations come on top, "
                     "sharding divides it)")
    return lines


def speed_line(model, args) -> str:
    """The settings the step's speed depends on, as in effect (chosen or given)."""
    from lmforge.modeling.optim import LOW_BIT_STATE_BYTES, optim_name, wants_master_weights

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = str(next(base.parameters()).dtype).removeprefix("torch.")
    if wants_master_weights(model, args):
        weights += " weights, AdamW over fp32 masters"
    elif optim_name(args) in LOW_BIT_STATE_BYTES:
        weights += f" weights, {optim_name(args)} ({LOW_BIT_STATE_BYTES[optim_name(args)]} bytes of state a weight)"
    else:
        # accelerate autocasts fp16 on a GPU only (a CPU run with --fp16 computes in fp32).
        autocast = "bf16" if args.bf16 else "fp16" if args.fp16 and args.device.type != "cpu" else None
        weights += " weights" + (f" under {autocast} autocast" if autocast and weights.startswith("float32") else "")
    budget = getattr(args, "compile_memory_budget", None)
    compiled = ("compiled blocks" + (f" (activation memory budget {budget:g})" if budget and budget < 1 else "")
                if getattr(args, "compile_blocks", False) else "eager")
    attention = getattr(base.config, "_attn_implementation", None) or "default"
    checkpointing = "gradient checkpointing" if args.gradient_checkpointing else "no gradient checkpointing"
    graphs = "; CUDA graphs per micro-step" if getattr(args, "cuda_graphs", False) else ""
    return f"speed: {weights}; {compiled}; {attention} attention; {checkpointing}{graphs}"


class Preflight(transformers.TrainerCallback):
    """Prints the pre-flight check at the start of training (rank 0), once the Trainer knows
    the exact number of steps, and records its figures in lmforge_run.json for the report."""

    def __init__(self, tokenizer, example: Optional[dict], tokens: int, trained_tokens: int,
                 row_length: Optional[int], title: str = "first training example"):
        self.tokenizer = tokenizer
        self.example = example
        self.title = title
        self.tokens = tokens
        self.trained_tokens = trained_tokens
        self.row_length = row_length

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        batches = len(train_dataloader) if train_dataloader is not None else 0
        per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        memory = estimate_memory(model, args) if model is not None else None
        plan = make_plan(args, state.max_steps, per_epoch, self.tokens, self.trained_tokens, self.row_length, memory)
        lines = ["lmforge: pre-flight check"]
        if self.example is not None:
            lines.append(show_example(self.tokenizer, self.example, self.title, use_color()))
        lines += plan_lines(plan, args)
        if model is not None:
            lines.append(speed_line(model, args))
        print("\n".join(lines[:1] + ["  " + line.replace("\n", "\n  ") for line in lines[1:]]), flush=True)
        from lmforge.training.run_record import update_run_info

        update_run_info(args.output_dir, preflight={
            "steps": plan.steps, "tokens_per_step": round(plan.tokens_per_step),
            "memory_estimate_gib": round(memory.total_gib, 3) if memory else None,
            **({"memory": asdict(memory)} if memory else {}),
        })
