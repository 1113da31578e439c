"""DPO on lmforge's Trainer: the preference losses, the reference model, precomputed reference
log-probabilities, and the metrics preference trainers log.

The per-sequence log-probabilities come from the final hidden states at the answer positions
only, the vocabulary projection done a chunk at a time (`lmforge.modeling.loss.sequence_log_probs`):
the [2B x length x vocab] logits are never built. That is what makes this better than scoring
pairs through `model(...).logits` (with Qwen's 151,936 tokens, 2 x 8 sequences of 512 tokens
are 10 GB of fp32 logits, and as much again for their gradient). TRL, which lmforge does not
depend on, does the same in its recent versions (1.16 tiles its head too, by replacing the
model's forward); lmforge keeps its own because the pairs come from its cache with exact,
checked masks, the head is redirected the way lmforge's SFT loss already does it (the model's
own forward runs, so FSDP and DeepSpeed hooks fire), and everything around the loss
(checkpoints, resume, signals, verified saves, distributed launch) is lmforge's SFT Trainer
unchanged. The losses are a few lines (`preference_loss`); tests compare them, and the whole
loss of a batch, with TRL's when it is installed.
"""

from __future__ import annotations

import copy
import hashlib
from collections import defaultdict

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.collate import CU_SEQLENS, LABEL_POSITIONS, REFERENCE_COLUMNS, SEQUENCE_STARTS, label_positions
from lmforge.data.store import FLOAT_COLUMN, CacheEntry, build_or_load
from lmforge.errors import LmforgeError
from lmforge.flags import DpoArguments, DpoLoss
from lmforge.logs import say
from lmforge.modeling.load import is_peft
from lmforge.modeling.loss import sequence_log_probs
from lmforge.training.graphs import PADDED_POSITIONS
from lmforge.training.step import Trainer

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", CU_SEQLENS)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss_type: DpoLoss, label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref) of each side, from
    the summed answer log-probabilities of the policy and of the reference ([B] each). IPO
    compares log-ratios averaged over each answer's tokens (`chosen_tokens`, `rejected_tokens`),
    so that its target margin 1 / (2 beta) does not depend on the answers' lengths."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == DpoLoss.SIGMOID:
        margin = chosen_ratio - rejected_ratio
        losses = (-F.logsigmoid(beta * margin) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * margin) * label_smoothing)
    elif loss_type == DpoLoss.IPO:
        if chosen_tokens is None or rejected_tokens is None:
            raise LmforgeError("the IPO loss needs the answers' token counts")
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == DpoLoss.HINGE:
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        raise LmforgeError(f"unknown DPO loss {loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every layer of the model (and in attention, which reads a float)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference for full fine-tuning: a copy of the starting model that never trains."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def output_head(model: nn.Module, fused: bool) -> nn.Module | None:
    """The head whose projection `sequence_log_probs` does itself, or None (the model's logits)."""
    if not fused:
        return None
    base = model.get_base_model() if is_peft(model) else model
    return base.get_output_embeddings()


def batch_log_probs(model: nn.Module, head: nn.Module | None, batch: dict,
                    positions: torch.Tensor | None = None, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probability, answer token count) for every side of a pair batch: its
    rows, or the sides packed in one row (`SEQUENCE_STARTS`)."""
    return sequence_log_probs(model, head, {k: batch[k] for k in MODEL_INPUTS if k in batch}, positions,
                              starts=batch.get(SEQUENCE_STARTS), padded=padded)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's parameters and buffers (names, dtypes, shapes, bytes): what keys
    precomputed reference log-probabilities, so that other weights never reuse them."""
    h = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        t = tensor.detach()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _autocast(args, device: torch.device):
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def compute_reference_log_probs(model: nn.Module, dataset, collator, args, fused: bool) -> tuple[list, list]:
    """The model's log-probabilities of each pair's chosen and rejected answer, in dataset order,
    in the precision training uses (autocast under --bf16 / --fp16)."""
    device = args.device
    was_training = model.training
    model.to(device).eval()
    head = output_head(model, fused)
    chosen, rejected = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collator)
    with torch.no_grad(), _autocast(args, device):
        for batch in loader:
            positions = label_positions(batch["labels"])
            batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            logps, _ = batch_log_probs(model, head, batch, positions)
            b = logps.shape[0] // 2
            chosen += logps[:b].double().cpu().tolist()
            rejected += logps[b:].double().cpu().tolist()
    model.train(was_training)
    return chosen, rejected


def reference_entry(model: nn.Module, data_entry: CacheEntry, collator, args, fused: bool,
                    cache_dir: str | None) -> CacheEntry:
    """The cached reference log-probabilities of `data_entry`'s pairs (built here or found),
    keyed by that entry (the data, tokenizer, template and length policy), the model's weights,
    and the precision and head path they were computed with."""
    h = hashlib.sha256()
    h.update(data_entry.path.rstrip("/").encode())
    h.update(model_fingerprint(model).encode())
    h.update(f"bf16={bool(args.bf16)} fp16={bool(args.fp16)} fused={fused}".encode())
    key = h.hexdigest()[:24]

    def build(tmp: str) -> dict:
        say(f"lmforge: computing the reference log-probabilities of {len(data_entry.dataset())} pairs")
        chosen, rejected = compute_reference_log_probs(model, data_entry.dataset(), collator, args, fused)
        schema = pa.schema([(c, FLOAT_COLUMN) for c in REFERENCE_COLUMNS])
        table = pa.table([pa.array(chosen, FLOAT_COLUMN), pa.array(rejected, FLOAT_COLUMN)], schema=schema)
        with pa.OSFile(f"{tmp}/tokens.arrow", "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        return {"pairs": len(chosen), "data": data_entry.path}

    entry = build_or_load(cache_dir, "dpo-ref", key, build)
    say(f"lmforge: reference log-probabilities: {entry.path}")
    return entry


def with_reference_columns(dataset, reference: CacheEntry):
    """The pair dataset with the two reference columns beside its token columns."""
    import datasets

    ref = reference.dataset()
    if len(ref) != len(dataset):
        raise LmforgeError(f"the reference log-probabilities in {reference.path} hold {len(ref)} rows, the data "
                           f"{len(dataset)}; delete that entry to compute them again")
    return datasets.concatenate_datasets([dataset, ref], axis=1)


class DpoTrainer(Trainer):
    """lmforge's Trainer with the DPO loss: each batch holds B chosen rows then B rejected rows
    (`PairCollator`); the policy scores them in one forward pass, the reference (the adapter
    disabled under LoRA, a frozen copy for full fine-tuning, or the precomputed `ref_logps`)
    in another without gradients. Logs TRL's metric names: rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (and nll with
    --sft_weight), averaged over the steps since the last log and over processes."""

    def __init__(self, *args, dpo: DpoArguments, reference: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self.reference = reference.to(self.args.device) if reference is not None else None
        # The loss is a mean over pairs: the Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                    "eval": defaultdict(list)}

    def reference_log_probs(self, model, inputs: dict, positions, padded: bool = False) -> torch.Tensor:
        if "ref_logps" in inputs:
            return inputs["ref_logps"].float()
        with torch.no_grad():
            if self.reference is not None:
                with self.accelerator.autocast():
                    head = output_head(self.reference, self.fused_head is not None)
                    return batch_log_probs(self.reference, head, inputs, positions, padded)[0]
            unwrapped = self.accelerator.unwrap_model(model)
            if not is_peft(unwrapped):
                raise LmforgeError("DPO needs a reference: LoRA, a frozen copy, or --precompute_ref_log_probs")
            with unwrapped.disable_adapter():
                return batch_log_probs(model, self.fused_head, inputs, positions, padded)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions = inputs.pop(LABEL_POSITIONS, None)
        padded = inputs.pop(PADDED_POSITIONS, False)
        self.attend_per_document(model, inputs)  # packed pairs (--packing True)
        # The reference first: its activations are freed before the policy's graph is built.
        ref = self.reference_log_probs(model, inputs, positions, padded)
        logps, counts = batch_log_probs(model, self.fused_head, inputs, positions, padded)
        ref = ref.to(logps.dtype)
        b = logps.shape[0] // 2
        losses, chosen_rewards, rejected_rewards = preference_loss(
            logps[:b], logps[b:], ref[:b], ref[b:], self.dpo.beta, self.dpo.loss_type, self.dpo.label_smoothing,
            counts[:b], counts[b:])
        loss = losses.mean()
        metrics = {}
        if self.dpo.sft_weight:
            nll = -logps[:b].sum() / counts[:b].sum()  # per chosen answer token
            loss = loss + self.dpo.sft_weight * nll
            metrics["nll"] = nll.detach()
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
        metrics["logps/chosen"] = logps[:b].detach().mean()
        metrics["logps/rejected"] = logps[b:].detach().mean()
        self.step_outputs(metrics, model.training)
        if return_outputs:
            return loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
        return loss

    def step_metrics(self, metrics: dict[str, torch.Tensor], kind: str = "train") -> None:
        for name, value in metrics.items():
            self._metrics[kind][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = self._metrics[kind]
        if metrics:
            names = sorted(metrics)
            values = torch.stack([torch.stack(metrics[n]).float().mean() for n in names])
            values = self.accelerator.reduce(values, reduction="mean")  # every process logs
            prefix = "eval_" if kind == "eval" else ""
            logs.update({prefix + n: round(v, 6) for n, v in zip(names, values.tolist())})
            metrics.clear()
        super().log(logs, start_time)
