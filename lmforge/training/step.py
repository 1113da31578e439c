"""One training step: the HF Trainer's loop (transformers' `Trainer._run_epoch`) with lmforge's
hooks filled. The rest of a run lives beside this file: guards.py (what stops a run), resume.py,
save.py (the final save), run_record.py (lmforge_run.json), events.py, run.py (`train_and_save`).

One optimizer step, in order, and what does each part:
 1. Fetch: the Trainer's `get_batch_samples` draws the window's gradient_accumulation_steps
    micro-batches at once, so that `num_items_in_batch` counts the labelled tokens of the whole
    window (of every process, by default): the loss is normalised over the window, not per
    micro-batch. The order is `EpochShuffle` (`_get_train_sampler`): a function of (seed, epoch)
    only, so a resumed run reads what the uninterrupted one read. The collator (`for_the_step`)
    adds, in the loader's workers, what the step needs: labelled positions for the fused head,
    offsets for varlen attention.
 2. `training_step`, each micro-batch: the token meter counts it (tokens/s in the logs); under
    --cuda_graphs the batch is padded to a bucketed shape and the whole micro-step replayed from a
    graph. Then the Trainer's step: `_prepare_inputs` moves the batch, `compute_loss`, backward.
 3. Forward with the fused head (`compute_loss`): a packed batch's document_ids become the mask
    that keeps each record to itself; the model is called with its output head computing the
    loss of the labelled positions instead of logits (`lmforge.modeling.loss.fused_causal_lm_loss`), so
    the [tokens, vocabulary] logits never exist.
 4. Loss: that sum over num_items_in_batch; backward (`accelerator.backward`) accumulates the
    gradients; DDP's all-reduce waits for the window's last micro-batch.
 5. Clip (`_clip_grad_norm`, `_get_grad_norm`): over fp32 master weights the fp32 gradients' norm,
    else the Trainer's; the norm is logged.
 6. Guards (`on_pre_optimizer_step`): `NonFiniteGuard` checks the gradients before the update;
    under a fused AdamW it hands the optimizer a device-side flag (the update skips itself)
    rather than make the host wait for the GPU.
 7. Optimizer step: the AdamW of `create_optimizer` (over fp32 masters for a 16-bit model).
 8. Schedule: the Trainer steps the LR scheduler, zeroes the gradients, counts the step.
 9. `on_step_end`: `NonFiniteGuard` reads its deferred flag before a log or save comes;
    `StopOnSignal` agrees across ranks on a SIGTERM / SIGINT and asks for a checkpoint and a stop.
10. Log (`log`): tokens/s and perplexity added; `on_log`: `CollapseGuard`, progress, the log file.
    Evaluation when it is due.
11. Checkpoint (`_save_checkpoint`): the Trainer writes under a staging name (`_get_output_dir`),
    then the `on_checkpoint_staged` event, a manifest, the rename, rotation of complete
    checkpoints only; `on_save`: `ReportAtCheckpoints` rewrites report.md.
"""

from __future__ import annotations

import functools
import os

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmforge.data.collate import LABEL_POSITIONS, add_batch_extras, for_the_step
from lmforge.data.sampler import EpochShuffle
from lmforge.errors import LmforgeError
from lmforge.logs import say
from lmforge.modeling.attention import VARLEN, document_attention_mask
from lmforge.modeling.load import compile_blocks, compile_settings, decoder_blocks, is_peft
from lmforge.modeling.loss import fused_causal_lm_loss, fused_head_supported, use_liger
from lmforge.modeling.optim import MasterWeightAdamW, wants_master_weights, with_stochastic_rounding
from lmforge.training.checkpoint import clear_staged, publish, rotate, staging_root, tidy_staging, write_manifest
from lmforge.training.events import lmforge_event
from lmforge.training.graphs import PADDED_POSITIONS, StepGraphs, bucketed, graphs_unsupported
from lmforge.training.progress import add_perplexity
from lmforge.training.progress import install as install_progress
from lmforge.training.save import disk_full_error
from lmforge.training.verify_save import loaded_through_tie

NUM_ITEMS = "lmforge_num_items"  # a graphed step's labelled-token count, when the Trainer gives a tensor
ACCUMULATION = "lmforge_accumulation"  # what a graphed step's loss is divided by


class Trainer(transformers.Trainer):
    """The HF Trainer with a few hooks filled:
      - a packed batch (one carrying document_ids) gets the attention mask that keeps each
        record to itself, in the form the model's attention implementation takes;
      - the loss is computed without the full logits tensor (lmforge.modeling.loss) unless
        --fused_loss False or the model does not allow it; --compile_blocks compiles the blocks;
      - the training order is a function of (seed, epoch) only (`EpochShuffle`);
      - checkpoints are written under a staging name, listed in a manifest and renamed when
        complete, and rotation never deletes a good checkpoint for an incomplete one
        (`lmforge/training/checkpoint.py`).

    What resume restores, and from where (transformers 5 Trainer + these hooks): weights,
    optimizer, LR scheduler, grad scaler (the Trainer's checkpoint files); global step, epoch,
    logs (trainer_state.json); the python / numpy / torch CPU and CUDA RNG states, restored
    after the skipped batches are read and before the first resumed forward pass, so dropout
    draws what it drew; the gradient-accumulation position (checkpoints are written only at
    optimizer-step boundaries, and the Trainer skips global_step x accumulation micro-batches
    of the epoch); the data order (the epoch's permutation from `EpochShuffle`, packing fixed
    by the seed). On a CPU in fp32 a resumed run therefore reproduces the uninterrupted one
    bit for bit (tests/training/test_resume.py). On a GPU the data order, optimizer, scheduler and RNG
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
        self.fp8_layers = self._fp8()
        budget = getattr(self.args, "compile_memory_budget", None) or 1.0
        blocks = (compile_blocks(self.model, mode=self.args.compile_mode, memory_budget=budget)
                  if getattr(self.args, "compile_blocks", False) else 0)
        # Entered around train() (and the final evaluation, lmforge.training.run): the compiler's
        # settings hold while lmforge's blocks run, not for the whole process.
        self.compile_settings = functools.partial(compile_settings, budget, blocks, self.fp8_layers > 0)

    def _fp8(self) -> int:
        """Float8 matmuls in the decoder blocks' linear layers where `lmforge.modeling.fp8.choose` says so
        (before the blocks compile and the optimizer is made); the choice is said. Returns how many
        layers were converted."""
        from lmforge.modeling import fp8

        requested = getattr(self.args, "fp8", "false")
        cuda = torch.cuda.is_available() and self.args.device.type == "cuda"
        on, why = fp8.choose(requested, capability=torch.cuda.get_device_capability() if cuda else None,
                             torchao=fp8.installed(), compiled=bool(getattr(self.args, "compile_blocks", False)),
                             engine="DeepSpeed" if self.args.deepspeed else "FSDP" if self.args.fsdp else None,
                             adapters=is_peft(self.model) or getattr(self.model, "is_quantized", False),
                             hidden=getattr(self.model.config, "hidden_size", 0))
        layers = fp8.convert(self.model, decoder_blocks(self.model)) if on else 0
        if on or str(requested).lower() != "auto" or cuda:  # on a CPU, auto's "no" is not news
            say(f"lmforge: speed: {'float8' if on else 'no float8'} ({why})" + (f": {layers} layers" if on else ""))
        return layers

    def _fused_head(self):
        if not getattr(self.args, "fused_loss", False):
            return None
        base = self.model.get_base_model() if is_peft(self.model) else self.model
        why = fused_head_supported(base)
        if why is None and (self.label_smoother is not None or self.compute_loss_func is not None):
            why = "a custom loss (label smoothing or compute_loss_func) is set"
        if why:
            say(f"lmforge: loss: the model's own ({why})")
        else:
            kernel = "Liger's kernel" if use_liger(self.args.loss_kernel, self.args.device) else "chunks"
            say(f"lmforge: loss: labelled positions only, projection and cross-entropy fused ({kernel})")
        return None if why else base.get_output_embeddings()

    def create_optimizer(self, model=None):
        if said := with_stochastic_rounding(self.args, self.model):
            say(f"lmforge: optimizer: {said}")
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        why = wants_master_weights(self.model, self.args)
        if why is None or isinstance(optimizer, MasterWeightAdamW):
            return optimizer
        # The Trainer's AdamW, its groups (weight decay or not) and settings, over fp32 masters.
        groups = [{k: v for k, v in g.items() if k not in ("initial_lr",)} for g in optimizer.param_groups]
        keep = ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused")
        self.optimizer = MasterWeightAdamW(groups, **{k: optimizer.defaults[k] for k in keep
                                                      if k in optimizer.defaults})
        how = "one Triton kernel a parameter group" if self.optimizer.uses_kernel else "torch's AdamW"
        say(f"lmforge: optimizer: AdamW over fp32 master weights ({why} in the model; the update: {how})")
        return self.optimizer

    def _clip_grad_norm(self, model):
        # Private: the Trainer clips here, before `on_pre_optimizer_step`; no hook replaces the clipping.
        norm = self._master_grad_norm(self.args.max_grad_norm)
        return super()._clip_grad_norm(model) if norm is None else norm

    def _get_grad_norm(self, model, grad_norm=None):
        # Private: where the Trainer measures the norm it logs without clipping; no hook supplies it.
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
            with self.compile_settings():
                return super().train(*args, **kwargs)
        finally:
            graphs = self._step_graphs
            if graphs is not None:
                say(f"lmforge: CUDA graphs: {len(graphs.graphs)} recorded, {graphs.replays} micro-steps replayed, "
                    f"{graphs.eager} run eagerly (the first of each shape)")

    def _graphs(self) -> StepGraphs | None:
        if not getattr(self.args, "cuda_graphs", False):
            return None
        if self._step_graphs is None:
            why = graphs_unsupported(self.args, torch.cuda.is_available())
            if why:
                raise LmforgeError(f"--cuda_graphs True: {why}")
            self._step_graphs = StepGraphs([p for p in self.model.parameters() if p.requires_grad])
            say("lmforge: CUDA graphs: each micro-step shape is recorded once and replayed")
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
        # Private: the Trainer warns inside its checkpoint loading; no hook sees the load result.
        # A checkpoint of a model with tied weights holds each shared tensor once (save_pretrained
        # drops lm_head.weight when it is the embedding): loading the embedding loaded it, so it
        # is not reported missing. A key missing for any other reason still is.
        tied = loaded_through_tie(self.model, load_result.missing_keys)
        if tied and hasattr(load_result, "_replace"):  # torch's _IncompatibleKeys, a named tuple
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def _prepare_inputs(self, inputs):
        # Private: the one place every batch, training and evaluation, passes before the model;
        # the public `training_step` sees no evaluation batch.
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
        # The fused head: for this call the output head computes the summed cross-entropy of the
        # labelled positions instead of the logits (lmforge.modeling.loss), and the model hands it back in
        # its `logits` slot; the [tokens, vocabulary] logits are never made.
        loss = fused_causal_lm_loss(model, self.fused_head, inputs, num_items_in_batch, self.args.loss_kernel,
                                    positions, padded)
        counted = num_items_in_batch is not None
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and counted:
            # As the Trainer does for a model's own loss: the gradients are averaged over
            # processes, while num_items_in_batch counts the labelled tokens of all of them.
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def _get_train_sampler(self, train_dataset=None):
        # Private: the Trainer's one place that builds the sampler; the public `get_train_dataloader`
        # would have to be copied whole. Overridden so that the order of an epoch does not depend on
        # the global RNG or on accelerate's `use_seedable_sampler` (see lmforge/data/sampler.py). Only the default
        # shuffled order is replaced; group_by_length and the others stay the Trainer's.
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is torch.utils.data.RandomSampler and not sampler.replacement:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = EpochShuffle(len(sampler.data_source), seed)
        return sampler

    def _get_output_dir(self, trial):
        # Private: the Trainer derives a checkpoint's path from it; no argument or hook moves it.
        # Overridden so that, while `_save_checkpoint` runs, the Trainer writes the checkpoint
        # into the staging directory instead of OUTPUT_DIR (it derives the path from this).
        return self._staging_for or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        # Private: the Trainer's checkpoint writer; `on_save` runs once the files are in place, too late.
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
