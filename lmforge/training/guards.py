"""The guards that stop a run, each as a Trainer callback: non-finite gradients (before the
update is applied), a collapse (gradients vanished while the loss has not), SIGTERM / SIGINT (a
checkpoint at the next step boundary, then stop), and a resumed checkpoint that is already the
run's last step (train() left before a step the run did not ask for)."""

from __future__ import annotations

import math
import signal
import statistics
import threading

import torch
import transformers

from lmforge.errors import LmforgeError
from lmforge.modeling.optim import MasterWeightAdamW
from lmforge.training.checkpoint import checkpoint_problem, find_checkpoints, last_complete_checkpoint, print_flushed


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
    newest = last_complete_checkpoint(output_dir, quiet=True)
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


def stopped_error(stop: StopOnSignal, output_dir: str) -> TrainingStopped:
    name = signal.Signals(stop.signum).name
    newest = last_complete_checkpoint(output_dir, quiet=True)
    where = f"checkpoint written to {newest}" if newest else "no complete checkpoint could be written"
    return TrainingStopped(f"stopped by {name} at step {stop.stopped_at}, {where}; "
                           "run the same command again to resume", stop.signum)
