"""The engine around the HF Trainer: output-directory policy, auto-resume, and the final save.

The Trainer runs the loop (DDP, FSDP, DeepSpeed, logging, checkpoints); lmforge decides what
goes in and checks what comes out.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
import transformers

from lmforge.attention import document_attention_mask
from lmforge.errors import LmforgeError
from lmforge.loss import fused_causal_lm_loss, fused_head_supported, use_liger
from lmforge.model import compile_blocks

BASE_CONFIG = "lmforge_base_config.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# What an lmforge run writes before its first checkpoint: a rerun of the same command may
# start over in a directory holding only these.
OWN_FILES = {"lmforge_run.json", "runs"}


def checkpoint_is_complete(path: str) -> bool:
    """The Trainer writes trainer_state.json last; a checkpoint whose state file parses and
    that holds model weights was finished."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return False
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES) or os.path.isdir(
        os.path.join(path, "pytorch_model_fsdp_0")
    )


def find_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N directory, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str, log=print) -> str | None:
    """The newest complete checkpoint; incomplete ones newer than it are reported and ignored."""
    for step, path in reversed(find_checkpoints(output_dir)):
        if checkpoint_is_complete(path):
            return path
        log(f"lmforge: ignoring incomplete checkpoint {path} (no readable trainer_state.json or weights)")
    return None


def resolve_resume(output_dir: str, resume: bool, overwrite: bool) -> str | None:
    """Where to resume from, or None to start fresh; refuses to train over unrelated files."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise LmforgeError(f"--output_dir {output_dir} is a file, not a directory")
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        return checkpoint
    foreign = set(os.listdir(output_dir)) - OWN_FILES if os.path.isdir(output_dir) else set()
    if foreign and not overwrite:
        raise LmforgeError(
            f"--output_dir {output_dir} is not empty and holds no complete checkpoint to resume from; "
            "pass --overwrite_output_dir True to train into it anyway, or choose another directory"
        )
    return None


def set_generation_defaults(model, tokenizer, end_of_turn_id: int | None) -> None:
    """Make generation stop at the template's end-of-turn token (and the tokenizer's EOS)."""
    stop = [t for t in (end_of_turn_id, tokenizer.eos_token_id) if t is not None]
    stop = list(dict.fromkeys(stop))
    gen = model.generation_config
    if stop:
        gen.eos_token_id = stop if len(stop) > 1 else stop[0]
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_final(trainer: transformers.Trainer, tokenizer, end_of_turn_id: int | None, output_dir: str) -> None:
    """Write the trained model (safetensors; for LoRA the adapter, which
    `PeftModel.from_pretrained(base, out)` loads), its tokenizer with the chat template it was
    trained with, a generation config that stops at the end of a turn, and trainer_state.json."""
    model = trainer.model
    unwrapped = getattr(model, "module", model)
    unwrapped.config.use_cache = True
    set_generation_defaults(unwrapped, tokenizer, end_of_turn_id)
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        if is_peft(unwrapped):
            unwrapped.generation_config.save_pretrained(output_dir)
            # The base config as trained (RoPE scaling, use_cache): `lmforge merge` builds the
            # merged model with it, so the merged model computes what the adapter run did.
            unwrapped.get_base_model().config.to_json_file(os.path.join(output_dir, BASE_CONFIG))


class NonFiniteGradients(LmforgeError):
    pass


class NonFiniteGuard(transformers.TrainerCallback):
    """Stops a run at the first optimizer step whose gradients hold NaN or inf (a non-finite
    loss gives those too), before the step is applied: the weights stay finite and the newest
    checkpoint on disk stays the last good one. The error names the step.

    Checked here rather than from logged losses because the Trainer's default
    `logging_nan_inf_filter` replaces a NaN loss by the running mean, and a checkpoint written
    between two logs would already hold NaN weights."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:  # DeepSpeed keeps its gradients to itself; it has its own overflow checks
            return
        try:
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        except (RuntimeError, TypeError, NotImplementedError):
            # Sharded (DTensor) gradients under FSDP: the engine's own norm is what to read
            # there; issue "Several GPUs" wires that in.
            return
        if not finite:
            step = state.global_step + 1
            newest = last_complete_checkpoint(args.output_dir, log=lambda *_: None)
            raise NonFiniteGradients(
                f"non-finite gradients (NaN or inf) at step {step}; stopped before applying it. "
                f"The last good checkpoint is {newest or 'none (no checkpoint was written yet)'}. "
                "Lower the learning rate, check the data of this step, or resume from the checkpoint."
            )


class Trainer(transformers.Trainer):
    """The HF Trainer with its loss hook filled: a packed batch (one carrying document_ids)
    gets the attention mask that keeps each record to itself, in the form the model's
    attention implementation takes; and the loss is computed without the full logits tensor
    (lmforge.loss) unless --fused_loss False or the model does not allow it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_head = self._fused_head()
        if getattr(self.args, "compile_blocks", False):
            compile_blocks(self.model, log=print if self.args.process_index == 0 else lambda *_: None)

    def _fused_head(self):
        if not getattr(self.args, "fused_loss", False):
            return None
        base = self.model.get_base_model() if is_peft(self.model) else self.model
        why = fused_head_supported(base)
        if why is None and (self.label_smoother is not None or self.compute_loss_func is not None):
            why = "a custom loss (label smoothing or compute_loss_func) is set"
        if self.args.process_index == 0:
            if why:
                print(f"lmforge: loss: the model's own ({why})")
            else:
                kernel = "Liger's kernel" if use_liger(self.args.loss_kernel, self.args.device) else "chunks"
                print(f"lmforge: loss: labelled positions only, projection and cross-entropy fused ({kernel})")
        return None if why else base.get_output_embeddings()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        document_ids = inputs.pop("document_ids", None)
        if document_ids is not None:
            config = getattr(model, "module", model).config
            mask = document_attention_mask(document_ids, config._attn_implementation, torch.float32)
            if mask is not None:
                inputs["attention_mask"] = mask
        if self.fused_head is None or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer then averages over accumulation steps itself
        loss = fused_causal_lm_loss(model, self.fused_head, inputs, num_items_in_batch, self.args.loss_kernel)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # As the Trainer does for a model's own loss: the gradients are averaged over
            # processes, while num_items_in_batch counts the labelled tokens of all of them.
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss


def train_and_save(model, args, tokenizer, train_dataset, eval_dataset, collator, checkpoint: str | None,
                   end_of_turn_id: int | None, run_info: dict) -> str:
    """The part every method shares: the Trainer, auto-resume, the final save."""
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[NonFiniteGuard()],
    )
    if args.process_index == 0:
        if is_peft(model):
            trainable, total = model.get_nb_trainable_parameters()
            print(f"lmforge: LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f} %)")
        write_run_info(args.output_dir, run_info)
    trainer.train(resume_from_checkpoint=checkpoint)
    save_final(trainer, tokenizer, end_of_turn_id, args.output_dir)
    if args.process_index == 0:
        print(f"lmforge: saved the {'adapter' if is_peft(model) else 'model'} to {args.output_dir}")
        if torch.cuda.is_available():
            print(f"lmforge: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return args.output_dir


def write_run_info(output_dir: str, info: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    info = {"argv": sys.argv, **info}
    tmp = os.path.join(output_dir, ".lmforge_run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, default=str)
    os.replace(tmp, os.path.join(output_dir, "lmforge_run.json"))
