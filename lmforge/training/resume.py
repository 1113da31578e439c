"""Resume: which checkpoint a run continues from (the newest complete one, or the one chosen
with --resume_from_checkpoint; an unrelated directory refused, an earlier run set aside when
starting over), and which changed flags a resumed run applies or refuses."""

from __future__ import annotations

import json
import os
import shutil

import transformers
from transformers.trainer import TRAINER_STATE_NAME

from lmforge.errors import LmforgeError
from lmforge.logs import say
from lmforge.report import PLOTS_DIR, REPORT_NAME
from lmforge.training.checkpoint import (
    CHECKPOINT_RE,
    STAGING_DIR,
    checkpoint_problem,
    find_checkpoints,
    last_complete_checkpoint,
    print_flushed,
    remove_staging_leftovers,
)
from lmforge.training.progress import LOG_FILE
from lmforge.training.run_lock import LOCK_NAME
from lmforge.training.run_record import RUN_INFO, read_run_info
from lmforge.training.save import FINAL_STAGING

# What an lmforge run writes before its first checkpoint (and the staging directory a killed
# first save leaves): a rerun of the same command may start over in a directory holding only these.
OWN_FILES = {RUN_INFO, LOG_FILE, "runs", STAGING_DIR, FINAL_STAGING, REPORT_NAME, PLOTS_DIR, LOCK_NAME}
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
    checkpoint = last_complete_checkpoint(output_dir, verify=True) if resume else None
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
    (`run_record.KEY_FLAGS`) that differ."""
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


# The data files' names: where the run recorded the files' content, that is compared instead
# (`recipe.check_resumed_data`), so the same data under another path resumes.
DATA_FLAGS = frozenset({"data_path", "eval_data_path", "train_files", "validation_files"})


def resume_policy(checkpoint: str, saved: dict | None, now: dict,
                  data_compared: bool = False) -> list[transformers.TrainerCallback]:
    """Say which flags differ from the run being resumed and what is done about each; refuse
    the ones a checkpoint cannot continue with. Returns the callbacks that apply the others.
    `data_compared`: the data files' content was compared, their paths are not."""
    if not saved:
        # No run record beside the checkpoint (a checkpoint copied on its own, or a record deleted).
        say(f"lmforge: {checkpoint}: no record of the flags its run started with (lmforge_run.json in the output "
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
        say("lmforge: resuming with changed flags, applied from the resumed step: "
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


def read_trainer_state(directory: str) -> dict | None:
    """The trainer_state.json of a checkpoint or a finished run, or None where it is absent or
    does not read."""
    try:
        with open(os.path.join(directory, TRAINER_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
