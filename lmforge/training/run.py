"""`train_and_save`: the part every method (sft, lora, pretrain, dpo, grpo) shares once its data
and model are built: the Trainer with lmforge's guards, auto-resume, the final save, the run
report.

In run.py rather than in training/__init__.py so that importing a light module of the package
(run_record.py, which `lmforge report` reads without torch) does not import the Trainer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import transformers

from lmforge.logs import library_bars, say
from lmforge.modeling.load import is_peft
from lmforge.report import try_write_report
from lmforge.training.distributed import configure_fsdp_wrapping
from lmforge.training.events import lmforge_event
from lmforge.training.guards import (
    CollapseGuard,
    NonFiniteGuard,
    NothingLeftToTrain,
    StopOnSignal,
    StopWhenNothingLeft,
    stopped_error,
)
from lmforge.training.progress import ReportAtCheckpoints
from lmforge.training.run_record import record_end, write_run_info
from lmforge.training.save import save_final
from lmforge.training.step import Trainer


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
    configure_fsdp_wrapping(model, args)
    guards = [NonFiniteGuard(), CollapseGuard(), stop, ReportAtCheckpoints(), *([preflight] if preflight else [])]
    trainer = (trainer_class or Trainer)(  # looked up now: tests may replace lmforge.training.run.Trainer
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=tokenizer, callbacks=[*guards, *callbacks], **(trainer_kwargs or {}))
    # First of all callbacks: it leaves train() before any other starts a bar or prints a plan.
    trainer.callback_handler.callbacks.insert(0, StopWhenNothingLeft())
    if is_peft(model):
        trainable, total = model.get_nb_trainable_parameters()
        say(f"lmforge: LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f} %)")
    if args.process_index == 0:  # the run record has one writer
        write_run_info(args.output_dir, {**run_info, "device": describe_device(args),
                                         "world_size": args.world_size})
    stop.install()
    try:
        train_to_the_end(trainer, checkpoint, stop, evaluate=eval_dataset is not None)
        # A signal after the last step does not stop the short final save.
        with library_bars(not args.disable_tqdm):  # its "Writing model shards" bar only with bars
            summary = save_final(trainer, tokenizer, end_of_turn_id, args.output_dir)
        lmforge_event(trainer, "on_final_save", trainer)
    finally:
        stop.restore()
    say(f"lmforge: saved the {'adapter' if is_peft(model) else 'model'} to {args.output_dir} ({summary})")
    finish_run(args)
    return args.output_dir


def train_to_the_end(trainer: transformers.Trainer, checkpoint: str | None, stop: StopOnSignal,
                     evaluate: bool) -> None:
    """Train from `checkpoint` (None: the start) to the last step, then (`evaluate`: the run has
    held-out data) evaluate the final model if the last evaluation was earlier. Raises
    `TrainingStopped` when a signal stopped it first."""
    args = trainer.args
    try:
        # lmforge's bar or lines are the progress: no "Writing model shards" bar per checkpoint.
        with library_bars(False):
            trainer.train(resume_from_checkpoint=checkpoint)
    except NothingLeftToTrain:
        say(f"lmforge: {checkpoint} is this run's last step; writing its final save, without training")
    if stop.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        raise stopped_error(stop, args.output_dir)
    if evaluate and last_eval_step(trainer.state) != trainer.state.global_step:
        # The final model's evaluation loss, also when --eval_steps did not fall on the last
        # step or --eval_strategy is no: the report and trainer_state.json end with it.
        with trainer.compile_settings():  # as train() runs under them
            trainer.evaluate()


def finish_run(args) -> None:
    """After the final save: the peak GPU memory said; the run record closed and the report
    written, by the main process."""
    if torch.cuda.is_available():
        say(f"lmforge: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.process_index == 0:  # the run record and the report have one writer
        record_end(args.output_dir, args.device)
        report = try_write_report(args.output_dir)
        if report:
            print(f"lmforge: run report: {report}")


def last_eval_step(state) -> int | None:
    """The step of the newest evaluation (its loss; GRPO's: its reward)."""
    return next((h["step"] for h in reversed(state.log_history) if "eval_loss" in h or "eval_reward" in h), None)


def describe_device(args) -> str:
    if args.device.type == "cuda":
        return torch.cuda.get_device_name(args.device)
    return args.device.type
