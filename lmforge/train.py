"""The engine around the HF Trainer: output-directory policy, exact auto-resume, atomic
checkpoints, a checkpoint on SIGTERM / SIGINT, and the final save.

The Trainer runs the loop (DDP, FSDP, DeepSpeed, logging, checkpoints); lmforge decides what
goes in and checks what comes out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
from typing import Sequence

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmforge.attention import VARLEN, document_attention_mask
from lmforge.checkpoint import (
    CHECKPOINT_RE,
    STAGING_DIR,
    checkpoint_problem,
    clear_staged,
    find_checkpoints,
    last_complete_checkpoint,
    print_flushed,
    publish,
    remove_staging_leftovers,
    rotate,
    staging_root,
    tidy_staging,
    write_manifest,
)
from lmforge.data.collate import LABEL_POSITIONS, add_batch_extras, for_the_step
from lmforge.data.sampler import EpochShuffle
from lmforge.distributed import configure_fsdp_wrapping
from lmforge.errors import LmforgeError, is_disk_full
from lmforge.loss import fused_causal_lm_loss, fused_head_supported, use_liger
from lmforge.graphs import PADDED_POSITIONS, StepGraphs, bucketed, graphs_unsupported
from lmforge.model import compile_blocks
from lmforge.optim import MasterWeightAdamW, wants_master_weights
from lmforge.progress import LOG_FILE, ReportAtCheckpoints, add_perplexity, library_bars, quiet_deepspeed_import
from lmforge.progress import install as install_progress
from lmforge.report import PLOTS_DIR, REPORT_NAME, read_run_info, record_end, try_write_report, update_run_info
from lmforge.run_lock import LOCK_NAME
from lmforge.verify_save import check_saved_model, loaded_through_tie

# Before anything imports deepspeed (TrainingArguments with --deepspeed at parsing, the Trainer
# and accelerate in every run where it is installed): no "Setting accelerator to CPU" line.
quiet_deepspeed_import()

BASE_CONFIG = "lmforge_base_config.json"

# What an lmforge run writes before its first checkpoint (and the staging directory a killed
# first save leaves): a rerun of the same command may start over in a directory holding only these.
FINAL_STAGING = ".lmforge-final"  # the final save, before it is moved into the output directory
OWN_FILES = {"lmforge_run.json", LOG_FILE, "runs", STAGING_DIR, FINAL_STAGING, REPORT_NAME, PLOTS_DIR, LOCK_NAME}
# Where starting over puts the run a directory held before (checkpoints, final save, records).
PREVIOUS_RUN = "previous-run-{}"


def resolve_resume(output_dir: str, resume: bool, overwrite: bool, main_process: bool = True,
                   chosen: str | None = None) -> str | None:
    """Where to resume from (the newest complete checkpoint; newer incomplete ones are named and
    skipped; or `chosen`, --resume_from_checkpoint), or None to start fresh; refuses to train over
    unrelated files. The main process also deletes what a killed save left in the staging directory."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise LmforgeError(f"--output_dir {output_dir} is a file, not a directory")
    if main_process:  # this process holds the directory's lock: no other run writes there
        remove_staging_leftovers(output_dir)
        final = os.path.join(output_dir, FINAL_STAGING)
        if os.path.isdir(final):
            print_flushed(f"lmforge: removing {final}, left by a final save that did not finish")
            shutil.rmtree(final, ignore_errors=True)
    if chosen:
        return chosen_checkpoint(output_dir, chosen, main_process)
    # The checkpoint about to be loaded is verified whole (sizes and checksums), on every rank,
    # so that all ranks choose the same one.
    checkpoint = last_complete_checkpoint(output_dir, log=print_flushed if main_process else lambda _: None,
                                          verify=True) if resume else None
    if checkpoint is not None:
        return checkpoint
    foreign = set(os.listdir(output_dir)) - OWN_FILES if os.path.isdir(output_dir) else set()
    if foreign and not overwrite:
        raise LmforgeError(
            f"--output_dir {output_dir} is not empty and holds no complete checkpoint to resume from; "
            "pass --overwrite_output_dir True to train into it anyway, or choose another directory"
        )
    if main_process:
        set_previous_run_aside(output_dir)
    return None


def set_previous_run_aside(output_dir: str) -> str | None:
    """Starting over in a directory that holds an earlier run: its checkpoints (and those it
    abandoned), its final save and its records move to OUTPUT_DIR/previous-run-K, kept, never
    resumed from. Left in place, a later resume would pick the old run's newest checkpoint (or
    take its final save for this run's), and checkpoint rotation would count them. Returns the
    folder, or None when there was nothing of a run to move."""
    if not os.path.isdir(output_dir):
        return None
    names = set(os.listdir(output_dir))
    record = read_run_info(output_dir)
    final = set(record.get("final_save") or ()) | {TRAINER_STATE_NAME}  # trainer_state.json: the save is whole
    runs = {n for n in names if CHECKPOINT_RE.match(n) or n.startswith("abandoned-after-checkpoint-")}
    if not runs and TRAINER_STATE_NAME not in names:
        return None  # no checkpoint, no final save: what a killed first attempt left is simply replaced
    moving = sorted((runs | (final & names) | (OWN_FILES & names)) - {STAGING_DIR, FINAL_STAGING, LOCK_NAME})
    k = 1
    while os.path.exists(os.path.join(output_dir, PREVIOUS_RUN.format(k))):
        k += 1
    aside = os.path.join(output_dir, PREVIOUS_RUN.format(k))
    os.makedirs(aside)
    for name in moving:
        os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    print_flushed(f"lmforge: starting over in {output_dir}: the run it held ({len(runs)} checkpoint folder(s)"
                  f"{', its final save' if TRAINER_STATE_NAME in names else ''} and its records) moved to {aside}")
    return aside


# What a resumed run may change. The checkpoint holds the weights, the optimizer and scheduler
# state, the RNG and the position in the data; flags that change none of those apply from the
# resumed step (the learning rate is written into the restored optimizer and scheduler, which
# would otherwise keep the old one). Every other recorded flag shapes the data, the model or the
# batches the checkpoint was trained on: a change would mix two runs under one name, so it is refused.
RESUME_APPLIES = frozenset({
    "learning_rate", "max_steps", "num_train_epochs", "lr_scheduler_type", "warmup_steps", "max_grad_norm",
    "gradient_checkpointing", "attn_implementation", "eval_strategy", "eval_steps", "logging_steps",
    "save_strategy", "save_steps",
})


SCHEDULE_FLAGS = frozenset({"learning_rate", "max_steps", "num_train_epochs", "lr_scheduler_type", "warmup_steps"})


def changed_flags(saved: dict, now: dict) -> dict[str, tuple]:
    """{flag: (value the run was started or last resumed with, value now)} for the recorded flags
    (`report.KEY_FLAGS`) that differ."""
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


# The data files' names: where the run recorded the files' content, that is compared instead
# (`recipe.check_resumed_data`), so the same data under another path resumes.
DATA_FLAGS = frozenset({"data_path", "eval_data_path", "train_files", "validation_files"})


def resume_policy(checkpoint: str, saved: dict | None, now: dict, log=print,
                  data_compared: bool = False) -> list[transformers.TrainerCallback]:
    """Say which flags differ from the run being resumed and what is done about each; refuse
    the ones a checkpoint cannot continue with. Returns the callbacks that apply the others.
    `data_compared`: the data files' content was compared, their paths are not."""
    if not saved:
        # No run record beside the checkpoint (a checkpoint copied on its own, or a record deleted).
        log(f"lmforge: {checkpoint}: no record of the flags its run started with (lmforge_run.json in the output "
            "directory); they are not compared with these")
        return []
    changes = changed_flags(saved, now)
    if data_compared:
        changes = {k: v for k, v in changes.items() if k not in DATA_FLAGS}
    refused = {k: v for k, v in changes.items() if k not in RESUME_APPLIES}
    if refused:
        listed = ", ".join(f"--{k} {a} → {b}" for k, (a, b) in refused.items())
        raise LmforgeError(
            f"resuming from {checkpoint} with changed flags that shape the data, the model or the batches it was "
            f"trained on ({listed}); run the command it was started with (lmforge_run.json), pass another "
            "--output_dir, or --resume False --overwrite_output_dir True to start over in this one")
    if changes:
        log("lmforge: resuming with changed flags, applied from the resumed step: "
            + ", ".join(f"--{k} {a} → {b}" for k, (a, b) in changes.items()))
    if changes.keys() & SCHEDULE_FLAGS:
        # The restored optimizer holds the rate the old schedule gave the last step; the rate
        # (new or not) is recomputed on the schedule these flags now describe.
        return [ApplyLearningRate(now["learning_rate"])]
    return []


class ApplyLearningRate(transformers.TrainerCallback):
    """A new --learning_rate for a resumed run: the restored optimizer and scheduler carry the
    old one (the scheduler's base rates come from its state); both are set to the new rate before
    the first resumed step, with the schedule's position kept."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if optimizer is None:
            return
        for group in optimizer.param_groups:
            group["initial_lr"] = self.learning_rate
            group["lr"] = self.learning_rate
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [self.learning_rate for _ in scheduler.base_lrs]
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas:  # LambdaLR, HF's schedules: the rate at the restored position
                for group, factor in zip(optimizer.param_groups, lambdas):
                    group["lr"] = self.learning_rate * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def chosen_checkpoint(output_dir: str, chosen: str, main_process: bool) -> str:
    """--resume_from_checkpoint: a complete checkpoint of this run, verified. The checkpoints after
    it belong to the abandoned continuation (a diverged run, say): they are moved aside into
    OUTPUT_DIR/abandoned-after-checkpoint-N, kept but never resumed from, so that a later
    automatic resume cannot pick them up again."""
    problem = checkpoint_problem(chosen, verify=True) if os.path.isdir(chosen) else "no such directory"
    if problem:
        raise LmforgeError(f"--resume_from_checkpoint {chosen}: not a complete checkpoint ({problem})")
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(chosen)))
    if not match or os.path.realpath(os.path.dirname(os.path.normpath(chosen))) != os.path.realpath(output_dir):
        raise LmforgeError(f"--resume_from_checkpoint {chosen}: not a checkpoint-N directory of --output_dir "
                           f"{output_dir}")
    step = int(match.group(1))
    newer = [path for s, path in find_checkpoints(output_dir) if s > step]
    if newer and main_process:
        aside = os.path.join(output_dir, f"abandoned-after-checkpoint-{step}")
        os.makedirs(aside, exist_ok=True)
        for path in newer:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        print_flushed(f"lmforge: resuming from {chosen}: the {len(newer)} later checkpoint(s) moved to {aside}")
    return chosen


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


def save_final(trainer: transformers.Trainer, tokenizer, end_of_turn_id: int | None, output_dir: str) -> str | None:
    """Write the trained model (safetensors; for LoRA the adapter, which
    `PeftModel.from_pretrained(base, out)` loads), its tokenizer with the chat template it was
    trained with, a generation config that stops at the end of a turn, and trainer_state.json.

    Complete or absent: everything is written under OUTPUT_DIR/.lmforge-final first and moved
    into OUTPUT_DIR only once all of it is written (a failure, a full disk say, removes the
    staging directory and leaves no partial model behind); trainer_state.json comes last, so
    its presence says the final output is whole.

    Under FSDP and ZeRO-3 each process holds a shard: the weights are gathered into one whole
    model (or adapter) written by the main process, and what was written is checked against the
    model (`lmforge.verify_save`) before it is moved in. Returns that check's summary on the main process."""
    model = trainer.model
    unwrapped = getattr(model, "module", model)
    unwrapped.config.use_cache = True
    set_generation_defaults(unwrapped, tokenizer, end_of_turn_id)
    staging = os.path.join(output_dir, FINAL_STAGING)
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    summary = None
    try:
        if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
            # The Trainer writes no model for a sharded state-dict type (its checkpoints are then
            # DCP shards); the final output must be whole whatever the checkpoints are.
            state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank
            if trainer.args.should_save:
                trainer._save(staging, state_dict=state_dict)
        else:
            # DDP: the main process writes its copy. FSDP (full state dict): gathered to the main
            # process. ZeRO-3: the 16-bit weights gathered (stage3_gather_16bit_weights_on_model_save),
            # for LoRA the adapter's only.
            trainer.save_model(staging)
        if main:
            summary = check_saved_model(staging, unwrapped)
            tokenizer.save_pretrained(staging)
            if is_peft(unwrapped):
                unwrapped.generation_config.save_pretrained(staging)
                # The base config as trained (RoPE scaling, use_cache): `lmforge merge` builds the
                # merged model with it, so the merged model computes what the adapter run did.
                unwrapped.get_base_model().config.to_json_file(os.path.join(staging, BASE_CONFIG))
        trainer.accelerator.wait_for_everyone()  # every rank's part of the save is on disk
    except BaseException as e:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise disk_full_error(output_dir, "the final model", e) or e
        raise
    if main:
        saved = sorted(os.listdir(staging))
        move_entries(staging, output_dir)
        # What the final save wrote, so that starting over can set exactly this aside.
        update_run_info(output_dir, final_save=saved + [TRAINER_STATE_NAME])
    trainer.save_state()
    return summary


DISK_NEARLY_FULL = 64 * 2**20  # bytes: less than this left, a failed write is taken for a full disk


def disk_full_error(directory: str, what: str, error: BaseException) -> LmforgeError | None:
    """The one-line error for a save that failed because the disk is full, or None when the
    disk has room (the failure is something else, raised as it is). A full disk surfaces in many
    forms: OSError ENOSPC from Python's writes, a RuntimeError from torch.save's zip writer
    ("unexpected pos ...") or from safetensors, with no errno to tell; the free space does."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if not is_disk_full(error) and free >= DISK_NEARLY_FULL:
        return None
    what = getattr(error, "filename", None) or what
    return LmforgeError(
        f"no space left on the disk of {directory} while writing {what} ({free / 2**20:.1f} MiB free); nothing "
        "half-written is used (a checkpoint is complete or absent). Free space or point --output_dir at a larger "
        "disk, then run the same command again to resume")


def move_entries(staging: str, output_dir: str) -> None:
    """Move every entry of `staging` into `output_dir` (replacing what is there), then remove it."""
    for name in sorted(os.listdir(staging)):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


class NonFiniteGradients(LmforgeError):
    pass


def all_finite(grads: list[torch.Tensor], device) -> bool:
    """Whether every gradient is finite. Under FSDP the gradients are DTensors of which each
    process holds a shard (on the CPU with offload): each process checks its shards, and one
    all-reduce makes every process reach the same answer, so all stop at the same step."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(g, DTensor) for g in grads)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        by_device.setdefault(local.device, []).append(local)
    finite = all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group))).all()) for group in by_device.values())
    if sharded and torch.distributed.is_initialized():
        flag = torch.tensor([1 if finite else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


class NonFiniteGuard(transformers.TrainerCallback):
    """Stops a run at the first optimizer step whose gradients hold NaN or inf (a non-finite
    loss gives those too), before the step is applied: the weights stay finite and the newest
    checkpoint on disk stays the last good one. The error names the step.

    Checked here rather than from logged losses because the Trainer's default
    `logging_nan_inf_filter` replaces a NaN loss by the running mean, and a checkpoint written
    between two logs would already hold NaN weights (lmforge turns that filter off: this guard
    covers it, and the filter reads the loss on the host every micro-step).

    Without waiting for the GPU: reading a flag on the host each step would stall the host
    until the GPU has finished the step, and small models, whose steps are bound by how fast
    the host launches kernels, lost about a tenth of their speed to it (docs/bench_results.md).
    So under torch's fused AdamW the flag stays on the device and is handed to the optimizer
    as `found_inf`, which makes the fused update a no-op (as under AMP's loss scaler); the host
    reads the flag when the GPU is done with it, at the latest one step later, and always
    before a checkpoint is saved, a log written or the run ends. Other optimizers, and
    gradients sharded over processes, are checked on the spot."""

    # Under a loss scaler an overflow is expected now and then: the scaler skips that step and
    # halves its scale. Gradients that stay non-finite at every scale (a NaN loss) halve it step
    # after step; below this the run is stopped (from fp16's default 65536: 16 steps in a row).
    LOWEST_LOSS_SCALE = 1.0

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor, object]] = []  # (step, host flag, event)
        self.state = None  # the Trainer's state: its logged gradient norms say when a divergence began
        self.scaler = None  # --fp16's loss scaler, when there is one

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.state = state
        step = state.global_step + 1
        self._check(args, wait=False)
        self.scaler = getattr(optimizer, "scaler", None)  # accelerate's optimizer wrapper holds it
        if self.scaler is not None and self.scaler.is_enabled():
            return  # it has checked the gradients and skips a step that overflowed
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:  # DeepSpeed keeps its gradients to itself; it has its own overflow checks
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        try:
            if _takes_found_inf(inner) and _one_local_device(grads):
                # The clipping's norm, when the optimizer measured one this step: no second pass.
                norm = getattr(inner, "grad_norm", None)
                norms = [norm] if norm is not None else torch._foreach_norm(grads)
                bad = ~torch.isfinite(torch.stack(norms)).all()
                inner.found_inf = bad.to(torch.float32)  # the fused update does nothing where it is 1
                self._defer(step, bad)
                return
            finite = all_finite(grads, args.device)
        except (RuntimeError, TypeError, NotImplementedError):
            return  # gradients of a kind this check does not know: the engine's own checks remain
        if not finite:
            self._stop(step, args)

    def on_step_end(self, args, state, control, **kwargs):
        # Before this step's checkpoint, log or evaluation (they come after on_step_end), and
        # at the end, the host waits for the flag; otherwise it reads what is already done.
        wait = (control.should_save or control.should_log or control.should_evaluate
                or control.should_training_stop or state.global_step >= state.max_steps)
        self._check(args, wait=wait)

    def on_train_end(self, args, state, control, **kwargs):
        self._check(args, wait=True)

    def _defer(self, step: int, bad: torch.Tensor) -> None:
        if bad.device.type != "cuda":
            self.pending.append((step, bad, None))
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((step, host, event))

    def _check(self, args, wait: bool) -> None:
        if wait and self.scaler is not None and self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            if scale < self.LOWEST_LOSS_SCALE:
                history = self.state.log_history if self.state is not None else []
                step = self.state.global_step if self.state is not None else 0
                raise NonFiniteGradients(
                    f"{nonfinite_message(step, args.output_dir, history)} (Under --fp16 the loss scaler skipped step "
                    f"after step: the gradients were non-finite at every scale down to {scale:g}.)")
        while self.pending:
            step, flag, event = self.pending[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            self.pending.pop(0)
            if bool(flag):
                self.pending.clear()
                self._stop(step, args)

    def _stop(self, step: int, args) -> None:
        history = self.state.log_history if self.state is not None else []
        raise NonFiniteGradients(nonfinite_message(step, args.output_dir, history))


class TrainingCollapsed(LmforgeError):
    pass


class CollapseGuard(transformers.TrainerCallback):
    """Stops a run whose gradients have vanished while its loss has not: the gradient norm is 0
    at `patience` logged steps in a row with a loss above 0. A far too large learning rate does
    this in one step (`--learning_rate 1e6` saturates every activation; the loss then sits at
    ln(vocabulary) for the whole run), and a run that went on would save a destroyed model and
    exit 0. Non-finite gradients are `NonFiniteGuard`'s."""

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.flat: list[int] = []  # the steps of the current run of zero-gradient logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        try:
            norm, loss = float(logs["grad_norm"]), float(logs["loss"])
        except (KeyError, TypeError, ValueError):
            return  # an evaluation log, or a run that does not log the gradient norm
        self.flat = self.flat + [state.global_step] if norm == 0.0 and loss > 0.0 else []
        if len(self.flat) >= self.patience:
            lr = f"--learning_rate {args.learning_rate:g}"
            raise TrainingCollapsed(
                f"the gradient norm has been 0 at steps {', '.join(map(str, self.flat))} while the loss stays at "
                f"{loss:.4g}: the model no longer learns (its activations saturated; {lr} may be far too high). "
                "Lower the learning rate and train again from the start (--overwrite_output_dir True)")


def divergence_start(history: list[dict], factor: float = 10.0, warmup: int = 3) -> tuple[int, int | None] | None:
    """(the first logged step whose gradient norm left its usual range, the last logged step
    before it), or None: a norm that is not finite, or above `factor` times the median of the norms
    logged before it (once `warmup` have been)."""
    norms: list[float] = []
    last_sane = None
    for entry in history:
        if "grad_norm" not in entry:
            continue
        norm = float(entry["grad_norm"])
        if not math.isfinite(norm) or (len(norms) >= warmup and norm > factor * statistics.median(norms)):
            return entry["step"], last_sane
        norms.append(norm)
        last_sane = entry["step"]
    return None


def nonfinite_message(step: int, output_dir: str, history: list[dict]) -> str:
    """What NonFiniteGuard says: where the run stopped, the checkpoint to go back to (the newest
    one from before the gradient norm left its usual range: a checkpoint can be finite and already
    ruined), and a command that continues from it."""
    head = f"non-finite gradients (NaN or inf) at step {step}; stopped before applying it. "
    start = divergence_start(history)
    if start is not None and start[0] <= step:
        first, last_sane = start
        good = [(s, p) for s, p in find_checkpoints(output_dir)
                if last_sane is not None and s <= last_sane and checkpoint_problem(p) is None]
        where = f"The gradient norm left its usual range at step {first}; "
        if not good:
            return head + where + ("no checkpoint was written before that: start again with a lower --learning_rate "
                                   "(--resume False --overwrite_output_dir True).")
        path = max(good)[1]
        return head + where + (f"the newest checkpoint from before that is {path}. Rerun with "
                               f"--resume_from_checkpoint {path} and a lower --learning_rate (a resume applies it), "
                               f"or check the data of steps {first} to {step}.")
    newest = last_complete_checkpoint(output_dir, log=lambda *_: None)
    if newest is None:
        return head + ("The last good checkpoint is none (no checkpoint was written yet): start again with a lower "
                       "--learning_rate, or check the data of this step.")
    return head + (f"The last good checkpoint is {newest}. Rerun with --resume_from_checkpoint {newest} and a lower "
                   "--learning_rate (a resume applies it), or check the data of this step.")


def _takes_found_inf(optimizer) -> bool:
    """torch's fused Adam / AdamW and lmforge's master-weight update: the updates that skip
    themselves on a device-side flag."""
    if isinstance(optimizer, MasterWeightAdamW):
        return optimizer.skips_on_found_inf()
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def _one_local_device(grads: list[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return not any(isinstance(g, DTensor) for g in grads) and len({g.device for g in grads}) == 1


class LmforgeCallback(transformers.TrainerCallback):
    """The events lmforge adds to the HF Trainer's (`transformers.TrainerCallback`). A callback
    passed to a method's `main(argv, callbacks=...)` (or to `train_and_save`) may define them;
    lmforge calls them on every callback of the Trainer that has the method (`lmforge_event`),
    so subclassing this class is optional. These are the no-op defaults:

      - `on_checkpoint_staged(args, state, staged_dir)`: on the main process, once the Trainer
        has written every file of checkpoint-`state.global_step` (all ranks' shards) into
        `staged_dir`, under its staging name, and before its manifest is written and it is
        published under its final name. A run killed here leaves an incomplete checkpoint.
      - `on_final_save(trainer)`: on every process, right after the final model is saved in the
        output directory (not after a run stopped by a signal). The in-memory model is still
        the trained one (sharded under FSDP / ZeRO-3: a forward pass there is a collective).
    """

    def on_checkpoint_staged(self, args, state, staged_dir: str) -> None:
        pass

    def on_final_save(self, trainer: transformers.Trainer) -> None:
        pass


def lmforge_event(trainer: transformers.Trainer, event: str, *args) -> None:
    """Call `event` (an `LmforgeCallback` method) on each of the Trainer's callbacks that has it."""
    for callback in trainer.callback_handler.callbacks:
        method = getattr(callback, event, None)
        if callable(method):
            method(*args)


class Trainer(transformers.Trainer):
    """The HF Trainer with a few hooks filled:
      - a packed batch (one carrying document_ids) gets the attention mask that keeps each
        record to itself, in the form the model's attention implementation takes;
      - the loss is computed without the full logits tensor (lmforge.loss) unless
        --fused_loss False or the model does not allow it; --compile_blocks compiles the blocks;
      - the training order is a function of (seed, epoch) only (`EpochShuffle`);
      - checkpoints are written under a staging name, listed in a manifest and renamed when
        complete, and rotation never deletes a good checkpoint for an incomplete one
        (`lmforge/checkpoint.py`).

    What resume restores, and from where (transformers 5 Trainer + these hooks): weights,
    optimizer, LR scheduler, grad scaler (the Trainer's checkpoint files); global step, epoch,
    logs (trainer_state.json); the python / numpy / torch CPU and CUDA RNG states, restored
    after the skipped batches are read and before the first resumed forward pass, so dropout
    draws what it drew; the gradient-accumulation position (checkpoints are written only at
    optimizer-step boundaries, and the Trainer skips global_step x accumulation micro-batches
    of the epoch); the data order (the epoch's permutation from `EpochShuffle`, packing fixed
    by the seed). On a CPU in fp32 a resumed run therefore reproduces the uninterrupted one
    bit for bit (tests/test_resume.py). On a GPU the data order, optimizer, scheduler and RNG
    states (CUDA included) are restored the same way, but kernels (atomic adds in attention and
    matmul backward, NCCL reductions) are not guaranteed to be bitwise deterministic from run to
    run, so a resumed curve agrees with the uninterrupted one to floating-point noise, not
    bit for bit.
    """

    _staging_for: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_head = self._fused_head()
        self.meter = install_progress(self)  # rank 0's progress bar / lines; tokens/s in the logs
        # The collator adds what this model's step needs (labelled positions for the fused loss,
        # document offsets for varlen attention), in the data loader, before the batch moves.
        self.data_collator = for_the_step(self.data_collator, label_positions=self.fused_head is not None,
                                          varlen_offsets=self._attn_implementation() == VARLEN)
        if getattr(self.args, "compile_blocks", False):
            compile_blocks(self.model, log=print if self.args.process_index == 0 else lambda *_: None,
                           mode=self.args.compile_mode,
                           memory_budget=getattr(self.args, "compile_memory_budget", None) or 1.0)

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

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        why = wants_master_weights(self.model, self.args)
        if why is None or isinstance(optimizer, MasterWeightAdamW):
            return optimizer
        # The Trainer's AdamW, its groups (weight decay or not) and settings, over fp32 masters.
        groups = [{k: v for k, v in g.items() if k not in ("initial_lr",)} for g in optimizer.param_groups]
        keep = ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused")
        self.optimizer = MasterWeightAdamW(groups, **{k: optimizer.defaults[k] for k in keep
                                                      if k in optimizer.defaults})
        if self.args.process_index == 0:
            how = "one Triton kernel a parameter group" if self.optimizer.uses_kernel else "torch's AdamW"
            print(f"lmforge: optimizer: AdamW over fp32 master weights ({why} in the model; the update: {how})")
        return self.optimizer

    def _clip_grad_norm(self, model):
        norm = self._master_grad_norm(self.args.max_grad_norm)
        return super()._clip_grad_norm(model) if norm is None else norm

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = self._master_grad_norm(float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _master_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        """With 16-bit weights over fp32 masters: the gradients' norm, clipped to `max_norm` in
        fp32 (None without masters). Clipping the 16-bit gradients instead would round each
        scaled gradient to 16 bits before the fp32 update; this way a step equals the step of
        fp32 weights under autocast. The optimizer applies the clipping's factor inside its
        update. Under --fp16's loss scaler the masters first take fp32 copies of the gradients,
        which the scaler unscales and checks (fp16 gradients cannot be unscaled, and their
        scaled norm overflows) and the clipping then scales."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(inner, MasterWeightAdamW):
            return None
        if self.accelerator.scaler is not None:
            return self.accelerator.clip_grad_norm_(inner.flush_grads(), max_norm)
        return inner.clip_grad_norm_(max_norm)

    _step_graphs: StepGraphs | None = None
    _graph_outputs: dict | None = None  # a graphed step's extra outputs (metrics), while it runs

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.meter.add(inputs)  # before the batch is reshaped: document_ids still tell padding apart
        graphs = self._graphs()
        if graphs is None:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = dict(self._prepare_inputs(self.graph_inputs(inputs)))  # padded on the CPU, then moved
        if num_items_in_batch is not None:  # a value of the batch: a static input of the graph
            inputs[NUM_ITEMS] = torch.as_tensor(num_items_in_batch, device=self.args.device)
        # A plain value the capture bakes in: part of the graph's key.
        inputs[ACCUMULATION] = self.current_gradient_accumulation_steps
        outputs = graphs.run(inputs, lambda batch: self._graphed_step(model, batch))
        loss = outputs.pop("loss")
        self.step_metrics(outputs)
        return loss

    def _graphed_step(self, model, batch: dict) -> dict[str, torch.Tensor]:
        batch.pop(ACCUMULATION)
        num_items = batch.pop(NUM_ITEMS, None)
        self._graph_outputs = {}
        try:
            loss = super().training_step(model, batch, num_items)
            return {"loss": loss, **self._graph_outputs}
        finally:
            self._graph_outputs = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            graphs = self._step_graphs
            if graphs is not None and self.args.process_index == 0:
                print(f"lmforge: CUDA graphs: {len(graphs.graphs)} recorded, {graphs.replays} micro-steps replayed, "
                      f"{graphs.eager} run eagerly (the first of each shape)")

    def _graphs(self) -> StepGraphs | None:
        if not getattr(self.args, "cuda_graphs", False):
            return None
        if self._step_graphs is None:
            why = graphs_unsupported(self.args, torch.cuda.is_available())
            if why:
                raise LmforgeError(f"--cuda_graphs True: {why}")
            self._step_graphs = StepGraphs([p for p in self.model.parameters() if p.requires_grad])
            if self.args.process_index == 0:
                print("lmforge: CUDA graphs: each micro-step shape is recorded once and replayed")
        return self._step_graphs

    @staticmethod
    def graph_inputs(inputs: dict) -> dict:
        """A batch as the graphed step takes it: its varying sizes padded to buckets."""
        return bucketed(inputs)

    def step_outputs(self, metrics: dict[str, torch.Tensor], training: bool) -> None:
        """Where `compute_loss` puts its metrics: a graphed training step hands them out as
        outputs of its graph (copied after each replay, then given to `step_metrics`); any other
        step gives them to `step_metrics` at once."""
        if training and self._graph_outputs is not None:
            self._graph_outputs.update(metrics)
        else:
            self.step_metrics(metrics, "train" if training else "eval")

    def step_metrics(self, metrics: dict[str, torch.Tensor], kind: str = "train") -> None:
        """A step's metrics, for the logs (DpoTrainer keeps them; the base Trainer has none)."""

    def log(self, logs, start_time=None):
        self.meter.annotate(logs, self.args)
        add_perplexity(logs)
        super().log(logs, start_time)

    def _issue_warnings_after_load(self, load_result):
        # A checkpoint of a model with tied weights holds each shared tensor once (save_pretrained
        # drops lm_head.weight when it is the embedding): loading the embedding loaded it, so it
        # is not reported missing. A key missing for any other reason still is.
        tied = loaded_through_tie(self.model, load_result.missing_keys)
        if tied and hasattr(load_result, "_replace"):  # torch's _IncompatibleKeys, a named tuple
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def _prepare_inputs(self, inputs):
        # Batches that did not come through the wrapped collator (a caller's own loop).
        inputs = add_batch_extras(inputs, self.fused_head is not None, self._attn_implementation() == VARLEN)
        return super()._prepare_inputs(inputs)

    def _attn_implementation(self) -> str:
        model = self.model
        return getattr(getattr(model, "module", model).config, "_attn_implementation", "")

    @staticmethod
    def attend_per_document(model, inputs: dict) -> None:
        """A packed batch's `document_ids` become the attention mask that keeps each document to
        itself, in the form the model's attention implementation takes (none for varlen, which
        reads the documents' offsets)."""
        document_ids = inputs.pop("document_ids", None)
        if document_ids is not None:
            config = getattr(model, "module", model).config
            mask = document_attention_mask(document_ids, config._attn_implementation, torch.float32)
            if mask is not None:
                inputs["attention_mask"] = mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions = inputs.pop(LABEL_POSITIONS, None)
        padded = inputs.pop(PADDED_POSITIONS, False)
        self.attend_per_document(model, inputs)
        if padded and (self.fused_head is None or return_outputs):
            raise LmforgeError("padded labelled positions need the fused loss (--fused_loss True)")
        if self.fused_head is None or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer then averages over accumulation steps itself
        loss = fused_causal_lm_loss(model, self.fused_head, inputs, num_items_in_batch, self.args.loss_kernel,
                                    positions, padded)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # As the Trainer does for a model's own loss: the gradients are averaged over
            # processes, while num_items_in_batch counts the labelled tokens of all of them.
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def _get_train_sampler(self, train_dataset=None):
        # Overridden so that the order of an epoch does not depend on the global RNG or on
        # accelerate's `use_seedable_sampler` (see lmforge/data/sampler.py). Only the default
        # shuffled order is replaced; group_by_length and the others stay the Trainer's.
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is torch.utils.data.RandomSampler and not sampler.replacement:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = EpochShuffle(len(sampler.data_source), seed)
        return sampler

    def _get_output_dir(self, trial):
        # Overridden so that, while `_save_checkpoint` runs, the Trainer writes the checkpoint
        # into the staging directory instead of OUTPUT_DIR (it derives the path from this).
        return self._staging_for or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        # Overridden to make the save atomic: the Trainer writes everything (weights, DeepSpeed
        # or FSDP shards, optimizer, scheduler, RNG, trainer_state.json) under the staging
        # name; once all ranks are done the main process adds the manifest, renames, rotates.
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = clear_staged(run_dir, name) if self.args.should_save else None
        self.accelerator.wait_for_everyone()  # no rank writes before the place is clear
        self._staging_for = staging_root(run_dir)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as e:
            raise disk_full_error(run_dir, name, e) or e
        finally:
            self._staging_for = None
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if staged is not None:
            self._complete_checkpoint(staged, os.path.join(run_dir, name), run_dir)
        self.accelerator.wait_for_everyone()

    def _complete_checkpoint(self, staged: str, final: str, run_dir: str) -> None:
        if self.state.best_model_checkpoint == staged:
            # The Trainer recorded the best checkpoint under its staging path; record the name
            # it is about to get (in the state saved inside it too).
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        lmforge_event(self, "on_checkpoint_staged", self.args, self.state, staged)
        write_manifest(staged, self.state.global_step)
        publish(staged, final)
        # The Trainer's own rotation ran inside the staging directory (nothing to rotate
        # there); this one counts complete checkpoints only.
        rotate(run_dir, self.args.save_total_limit, [final, self.state.best_model_checkpoint])
        tidy_staging(run_dir)


class TrainingStopped(LmforgeError):
    """SIGTERM / SIGINT stopped the run after a checkpoint; the exit status is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NothingLeftToTrain(Exception):
    """Raised inside `Trainer.train()` when the checkpoint it resumed is the run's last step."""


class StopWhenNothingLeft(transformers.TrainerCallback):
    """A run stopped during its final save resumes from a checkpoint at its last step. The
    Trainer's loop would train one more step before it compares the step count with
    --max_steps, moving the weights past what the run was asked for. `on_train_begin` comes
    after the weights, optimizer and schedule are loaded (for DeepSpeed and FSDP the shards load
    only inside train(), so loading them beforehand is not an option): train() is left there,
    with the model as the checkpoint holds it, and the caller redoes only the final save."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step >= state.max_steps:
            raise NothingLeftToTrain


class StopOnSignal(transformers.TrainerCallback):
    """SIGTERM (a scheduler's notice before preemption) or SIGINT (Ctrl-C) stops the run at
    the next optimizer-step boundary with a checkpoint, through the Trainer's own controls
    (should_save, should_training_stop). A second signal stops at once.

    The handler only records the signal: printing or saving from inside a handler could
    interrupt the Trainer's own writes. With several ranks, the ranks agree at every step on
    whether any was signalled (one all-reduce of an int), so all save the same step."""

    def __init__(self):
        self.received: int | None = None  # the signal this process got
        self.signum: int | None = None  # the signal the run stops for (from any rank)
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)  # the handler there before: KeyboardInterrupt, or exit
            return
        self.received = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # a launcher that ignores it (a background job's SIGINT) keeps ignoring it
            self._previous[signum] = signal.signal(signum, self.handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _signalled_on_any_rank(self, args) -> int | None:
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return self.received
        flag = torch.tensor([self.received or 0], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._signalled_on_any_rank(args)
        if signum is None or self.stopped_at is not None:
            return
        self.signum = signum
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        if state.is_world_process_zero:
            print_flushed(f"lmforge: {signal.Signals(signum).name} received: writing a checkpoint at step "
                f"{state.global_step}, then stopping")


NUM_ITEMS = "lmforge_num_items"  # a graphed step's labelled-token count, when the Trainer gives a tensor
ACCUMULATION = "lmforge_accumulation"  # what a graphed step's loss is divided by


def train_and_save(model, args, tokenizer, train_dataset, eval_dataset, collator, checkpoint: str | None,
                   end_of_turn_id: int | None, run_info: dict,
                   preflight: transformers.TrainerCallback | None = None,
                   callbacks: Sequence[transformers.TrainerCallback] = (), trainer_class: type | None = None,
                   trainer_kwargs: dict | None = None) -> str:
    """The part every method shares: the Trainer (`trainer_class`, lmforge's or a subclass, with
    `trainer_kwargs`), auto-resume, the final save, the run report (at each checkpoint and at
    the end). SIGTERM / SIGINT during training end it with a checkpoint and `TrainingStopped`.
    `callbacks` are added to lmforge's own; they may also take lmforge's events (`LmforgeCallback`)."""
    stop = StopOnSignal()
    configure_fsdp_wrapping(model, args, log=print if args.process_index == 0 else lambda *_: None)
    callbacks = [NonFiniteGuard(), CollapseGuard(), stop, ReportAtCheckpoints(), *([preflight] if preflight else []),
                 *callbacks]
    trainer = (trainer_class or Trainer)(  # looked up now: tests may replace lmforge.train.Trainer
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        **(trainer_kwargs or {}),
    )
    # First of all callbacks: it leaves train() before any other starts a bar or prints a plan.
    trainer.callback_handler.callbacks.insert(0, StopWhenNothingLeft())
    if args.process_index == 0:
        if is_peft(model):
            trainable, total = model.get_nb_trainable_parameters()
            print(f"lmforge: LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f} %)")
        write_run_info(args.output_dir, {**run_info, "device": describe_device(args),
                                         "world_size": args.world_size})
    stop.install()
    try:
        try:
            # lmforge's bar or lines are the progress: no "Writing model shards" bar per checkpoint.
            with library_bars(False):
                trainer.train(resume_from_checkpoint=checkpoint)
        except NothingLeftToTrain:
            if args.process_index == 0:
                print(f"lmforge: {checkpoint} is this run's last step; writing its final save, without training")
        if stop.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
            raise stopped_error(stop, args.output_dir)
        if eval_dataset is not None and last_eval_step(trainer.state) != trainer.state.global_step:
            # The final model's evaluation loss, also when --eval_steps did not fall on the last
            # step or --eval_strategy is no: the report and trainer_state.json end with it.
            trainer.evaluate()
        # A signal after the last step does not stop the short final save.
        with library_bars(not args.disable_tqdm):  # its "Writing model shards" bar only with bars
            summary = save_final(trainer, tokenizer, end_of_turn_id, args.output_dir)
        lmforge_event(trainer, "on_final_save", trainer)
    finally:
        stop.restore()
    if args.process_index == 0:
        print(f"lmforge: saved the {'adapter' if is_peft(model) else 'model'} to {args.output_dir} ({summary})")
        if torch.cuda.is_available():
            print(f"lmforge: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        record_end(args.output_dir, args.device)
        report = try_write_report(args.output_dir)
        if report:
            print(f"lmforge: run report: {report}")
    return args.output_dir


def read_trainer_state(directory: str) -> dict | None:
    """The trainer_state.json of a checkpoint or a finished run, or None where it is absent or
    does not read."""
    try:
        with open(os.path.join(directory, TRAINER_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def last_eval_step(state) -> int | None:
    """The step of the newest evaluation (its loss; GRPO's: its reward)."""
    return next((h["step"] for h in reversed(state.log_history) if "eval_loss" in h or "eval_reward" in h), None)


def describe_device(args) -> str:
    if args.device.type == "cuda":
        return torch.cuda.get_device_name(args.device)
    return args.device.type


def stopped_error(stop: StopOnSignal, output_dir: str) -> TrainingStopped:
    name = signal.Signals(stop.signum).name
    newest = last_complete_checkpoint(output_dir, log=lambda _: None)
    where = f"checkpoint written to {newest}" if newest else "no complete checkpoint could be written"
    return TrainingStopped(f"stopped by {name} at step {stop.stopped_at}, {where}; "
                           "run the same command again to resume", stop.signum)


def write_run_info(output_dir: str, info: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    info = {"argv": sys.argv, **info}
    tmp = os.path.join(output_dir, ".lmforge_run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, default=str)
    os.replace(tmp, os.path.join(output_dir, "lmforge_run.json"))
