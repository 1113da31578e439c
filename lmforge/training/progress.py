"""What a run shows while it goes, on rank 0 only: one progress bar (or, with --disable_tqdm,
one progress line per log) with the step, loss, learning rate, useful tokens/s and ETA; the
token counts and peak memory added to every training log (so they reach trainer_state.json,
TensorBoard / wandb and the report); eval perplexity; the report rewritten at each checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Optional

import torch
import transformers
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lmforge.data.render import IGNORE_INDEX
from lmforge.report import perplexity, try_write_report
from lmforge.training.run_record import peak_memory_fields


def useful_tokens(batch: Mapping) -> torch.Tensor | int:
    """Tokens of a batch that are not padding: a packed row's padding has document id -1, a
    padded row's has attention mask 0; a batch with neither is all tokens."""
    if torch.is_tensor(batch.get("document_ids")):
        return (batch["document_ids"] >= 0).sum()
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2:
        return mask.sum()
    return batch["input_ids"].numel()


def trained_tokens(batch: Mapping) -> torch.Tensor | int:
    """Tokens the loss is computed on: labels after the causal shift that are not -100."""
    labels = batch.get("labels")
    if not torch.is_tensor(labels):
        return 0
    return (labels[..., 1:] != IGNORE_INDEX).sum()


class TokenMeter(transformers.TrainerCallback):
    """Counts the useful and the trained tokens of the training batches and turns them into
    log fields at each logging step: `tokens_per_second` (useful tokens of all processes per
    second of training since the last log), the running totals `tokens` and `trained_tokens`,
    and this process' peak memory. The counts stay tensors where the batch is until a log reads
    them, so counting adds no device sync per step (the Trainer's own num_input_tokens_seen
    syncs every micro-batch).

    Training time is the time up to each step's end, less what evaluation and checkpoint saves
    took: a log interval with an evaluation in it would otherwise show a throughput drop that
    is not the training's."""

    def __init__(self):
        self.useful: torch.Tensor | int = 0
        self.trained: torch.Tensor | int = 0
        self.total_useful = 0
        self.total_trained = 0
        self.session_useful = 0
        self.session_seconds = 0.0
        self.seconds = 0.0  # training time since the last log
        self.mark: Optional[float] = None  # the moment training time was counted up to

    def add(self, batch: Mapping) -> None:
        self.useful = self.useful + useful_tokens(batch)
        self.trained = self.trained + trained_tokens(batch)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run continues the totals it logged up to its checkpoint.
        last = next((h for h in reversed(state.log_history) if "tokens" in h), None)
        if last is not None:
            self.total_useful, self.total_trained = int(last["tokens"]), int(last.get("trained_tokens", 0))
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.mark is not None:
            now = time.perf_counter()
            self.seconds += now - self.mark
            self.mark = now

    def _skip(self) -> None:
        if self.mark is not None:
            self.mark = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self._skip()

    def on_save(self, args, state, control, **kwargs):
        self._skip()  # runs after the other callbacks' on_save (added last): the report is skipped too

    def _take(self, args) -> tuple[int, int]:
        counts = torch.tensor([int(self.useful), int(self.trained)], dtype=torch.int64)
        self.useful, self.trained = 0, 0
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
        useful, trained = counts.tolist()
        return useful, trained

    def annotate(self, logs: dict, args) -> None:
        """Add the token and memory fields to a training log (every process calls this at the
        same logging steps, so the all-reduce in it matches up)."""
        if "loss" in logs and self.mark is not None:
            useful, trained = self._take(args)
            self.total_useful += useful
            self.total_trained += trained
            self.session_useful += useful
            self.session_seconds += self.seconds
            logs["tokens_per_second"] = round(useful / max(self.seconds, 1e-9), 1)
            logs["tokens"] = self.total_useful
            logs["trained_tokens"] = self.total_trained
            logs.update(peak_memory_fields(args.device))
            self.seconds = 0.0
        elif "train_runtime" in logs and self.session_seconds > 0:
            # The run's summary: this session's useful tokens per second of training steps.
            logs["useful_tokens_per_second"] = round(self.session_useful / self.session_seconds, 1)


def add_perplexity(logs: dict) -> None:
    """eval_perplexity = exp(eval_loss), next to it in the logs (and in evaluate()'s metrics,
    which are this same dict)."""
    loss = logs.get("eval_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        logs["eval_perplexity"] = perplexity(loss)


def _short(value: float) -> str:
    return f"{value / 1e3:.1f}k" if value >= 1e4 else f"{value:.0f}"


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _preference_fields(logs: Mapping, prefix: str = "") -> dict[str, str]:
    """DPO's reward accuracy and margin (TRL's names), when the log has them."""
    fields = {}
    for key, name in (("rewards/accuracies", "reward acc"), ("rewards/margins", "margin")):
        if prefix + key in logs:
            fields[name] = _number(logs[prefix + key], ".3g")
    return fields


def _rl_fields(logs: Mapping, prefix: str = "") -> dict[str, str]:
    """GRPO's reward (its std, each function's mean), completion lengths, clipping, entropy and
    KL, when the log has them (an evaluation's: keys under `prefix`)."""
    fields = {}
    logs = {k[len(prefix):]: v for k, v in logs.items() if k.startswith(prefix)}
    if "reward" not in logs:  # not a GRPO log (DPO's "rewards/..." are its own)
        return fields
    fields["reward"] = f"{_number(logs['reward'], '.3g')} ± {_number(logs.get('reward_std', 0.0), '.2g')}"
    for key, value in logs.items():
        if key.startswith("rewards/"):  # each function's mean, by its name (a file's function: NAME)
            fields[key.split("/", 1)[1].rsplit(":", 1)[-1]] = _number(value, ".3g")
    if "completion_length" in logs:
        maximum = f"max {_number(logs['completion_length_max'], '.3g')}, " if "completion_length_max" in logs else ""
        fields["length"] = (f"{_number(logs['completion_length'], '.3g')} ({maximum}"
                            f"{100 * logs.get('truncated', 0.0):.0f} % cut)")
    clipped = logs.get("clip_ratio/low", 0.0) + logs.get("clip_ratio/high", 0.0)
    if "clip_ratio/low" in logs:
        fields["clipped"] = f"{100 * clipped:.1f} %"
    if "entropy" in logs:
        fields["entropy"] = _number(logs["entropy"], ".3g")
    if "kl" in logs:
        fields["kl"] = _number(logs["kl"], ".3g")
    return fields


def progress_fields(logs: Mapping) -> dict[str, str]:
    fields = {}
    if "loss" in logs:
        fields["loss"] = _number(logs["loss"])
    if "learning_rate" in logs:
        fields["lr"] = _number(logs["learning_rate"], ".3g")
    if "tokens_per_second" in logs:
        fields["tok/s"] = _short(logs["tokens_per_second"])
    fields.update(_preference_fields(logs))
    fields.update(_rl_fields(logs))
    return fields


class ProgressBar(ProgressCallback):
    """The Trainer's tqdm bar (steps, elapsed time, ETA) with the latest loss, learning rate
    and useful tokens/s on it: a training log updates the bar instead of printing a dict under
    it; an evaluation, the summary and any other log are one lmforge line each (`log_line`),
    written above the bar. Rank 0 only (as the Trainer's)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs and self.training_bar is not None:
            self.training_bar.set_postfix(progress_fields(logs), refresh=True)
            return
        line = log_line(state, logs)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:  # an evaluation after training, its bar closed
            print(line, flush=True)


class ProgressLines(PrinterCallback):
    """--disable_tqdm: one line a person reads per log, printed by rank 0 only, in place of the
    Trainer's log dicts (the logs themselves go to trainer_state.json, TensorBoard / wandb and
    the report): a training log's step, loss, learning rate, useful tokens/s, elapsed time and
    ETA; an evaluation's loss and perplexity; the run's summary (`log_line`)."""

    def __init__(self):
        self.started: Optional[float] = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        logs.pop("total_flos", None)  # as the Trainer's printer did: kept from the callbacks after it
        if not state.is_world_process_zero or not logs:
            return
        timing = () if self.started is None else (time.perf_counter() - self.started, state.global_step - self.first_step)
        print(log_line(state, logs, *timing), flush=True)


def progress_line(step: int, max_steps: int, logs: Mapping, elapsed: Optional[float] = None,
                  steps_done: int = 0) -> str:
    parts = [f"step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f} %)"]
    parts += [f"{k} {v}" for k, v in progress_fields(logs).items()]
    if elapsed is not None:
        parts.append(f"elapsed {_eta(elapsed)}")
        if steps_done > 0:
            parts.append(f"ETA {_eta(elapsed / steps_done * max(max_steps - step, 0))}")
    return "lmforge: " + ", ".join(parts)


def eval_line(step: int, max_steps: int, logs: Mapping) -> str:
    """An evaluation's log as one line: loss, perplexity (DPO: reward accuracy and margin; GRPO:
    rewards and lengths) and the time it took."""
    parts = []
    if "eval_loss" in logs:
        parts.append(f"loss {_number(logs['eval_loss'])}")
    if "eval_perplexity" in logs:
        parts.append(f"perplexity {_number(logs['eval_perplexity'])}")
    parts += [f"{k} {v}" for k, v in _preference_fields(logs, "eval_").items()]
    parts += [f"{k} {v}" for k, v in _rl_fields(logs, "eval_").items()]
    took = f" ({logs['eval_runtime']:.1f} s)" if isinstance(logs.get("eval_runtime"), (int, float)) else ""
    return f"lmforge: eval at step {step}/{max_steps}: " + ", ".join(parts) + took


def summary_line(step: int, max_steps: int, logs: Mapping) -> str:
    """The Trainer's end-of-training log (this session's) as one line."""
    head = f"lmforge: trained to step {step}/{max_steps}"
    if isinstance(logs.get("train_runtime"), (int, float)):
        head += f" in {_eta(logs['train_runtime'])}"
    parts = [head]
    if "train_loss" in logs:
        parts.append(f"mean loss {_number(logs['train_loss'])}")
    if isinstance(logs.get("useful_tokens_per_second"), (int, float)):
        parts.append(f"tok/s {_short(logs['useful_tokens_per_second'])}")
    return ", ".join(parts)


def log_line(state, logs: Mapping, elapsed: Optional[float] = None, steps_done: int = 0) -> str:
    """The one line a log is shown as: a training step's (with the time since training started
    and the steps done in it, its elapsed time and ETA), an evaluation's, the summary's, or, for
    a log of another kind (a callback's own), its fields. Only a training step's line starts with
    "lmforge: step " (scripts count those)."""
    step, max_steps = state.global_step, state.max_steps
    if "loss" in logs:
        return progress_line(step, max_steps, logs, elapsed, steps_done)
    if "train_runtime" in logs:
        return summary_line(step, max_steps, logs)
    if any(k.startswith("eval_") for k in logs):
        return eval_line(step, max_steps, logs)
    fields = ", ".join(f"{k} {_number(v)}" for k, v in logs.items() if k not in ("epoch", "total_flos"))
    return f"lmforge: log at step {step}/{max_steps}: {fields}"


LOG_FILE = "lmforge_log.jsonl"


class LogFile(transformers.TrainerCallback):
    """Every log as it happens, one JSON object a line, in OUTPUT_DIR/lmforge_log.jsonl (rank 0):
    the numbers the console's lines round, also for a run stopped before its first checkpoint
    (trainer_state.json is written only with one). A run starts by dropping the entries past the
    step it starts from (all of them for a fresh start; a resumed run's steps after its
    checkpoint, which it trains again), then appends."""

    def on_train_begin(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, LOG_FILE)
        if not state.is_world_process_zero or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if _logged_step(line) <= state.global_step]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
        with open(os.path.join(args.output_dir, LOG_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _logged_step(line: str) -> float:
    """The step of a lmforge_log.jsonl line; a line that does not read (a write cut short) counts
    as past every step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class ReportAtCheckpoints(transformers.TrainerCallback):
    """Rewrites OUTPUT_DIR/report.md after each checkpoint (the checkpoint is complete and in
    place when on_save runs), so a run stopped or killed later still has its report."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            try_write_report(args.output_dir)


def install(trainer: transformers.Trainer) -> TokenMeter:
    """Replace the Trainer's progress display by lmforge's and add the meter; returns the
    meter (the Trainer feeds it batches and asks it for log fields)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar())
    elif trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(ProgressLines())
    meter = TokenMeter()
    trainer.add_callback(meter)
    trainer.add_callback(LogFile())
    return meter
