"""GRPO on lmforge's Trainer. One optimizer step, top to bottom:

    1. (every `num_iterations` steps) a generation batch: the next prompts of the epoch, each
       sampled `num_generations` times on the current weights (`rollout.Engine`), every
       completion rewarded (`rewards.Rewards`), the rewards made group-relative advantages
       (`loss.advantages`), and each completion given its weight in the step's loss
       (`loss.sequence_weights`); with num_iterations > 1 the sampling policy's log-probs, and
       with beta > 0 the reference's, computed once, here;
    2. the batch's prompt + completion documents dealt into the fewest packed rows of at most
       `--train_row_tokens` tokens (`rollout_rows`), a row a micro-batch, padding-free, each
       document attending to itself;
    3. per micro-batch: the policy's log-probs of the completion tokens (the output head applied
       to those positions only, a chunk at a time), the clipped surrogate (`loss.surrogate_loss`),
       backward; the Trainer then clips, steps the optimizer and the schedule.

Steps 1-2 run in the data loader the Trainer reads (`RolloutLoader`): the Trainer fetches a
step's micro-batches before training on them, and from there on its loop, gradient accumulation,
checkpoints, resume, logging and launchers are the SFT ones. A generation batch is a function
of the weights and (seed, batch index) only: a resumed run samples what the uninterrupted one
did; a checkpoint taken between the steps of one generation batch holds that batch
(`rollout.safetensors`), so the steps after it train on the very same completions.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from lmforge.data.collate import LABEL_POSITIONS, PackedCollator, add_batch_extras
from lmforge.data.pack import pack_records
from lmforge.data.render import IGNORE_INDEX
from lmforge.data.sampler import EpochShuffle
from lmforge.errors import LmforgeError
from lmforge.modeling.load import is_peft
from lmforge.modeling.loss import token_log_probs
from lmforge.rl.rollout import Completion, Engine, Prompt, Sampling
from lmforge.rl.surrogate import ScaleRewards, SurrogateConfig, advantages, sequence_weights, surrogate_loss
from lmforge.training.events import LmforgeCallback
from lmforge.training.samples import SAMPLES_NAME
from lmforge.training.step import Trainer

ROLLOUT_FILE = "rollout.safetensors"
SEQ, ADVANTAGE, WEIGHT, OLD_LOGPS, REF_LOGPS = "grpo_seq", "grpo_advantage", "grpo_weight", "grpo_old_logps", \
    "grpo_ref_logps"
GRPO_KEYS = (SEQ, ADVANTAGE, WEIGHT, OLD_LOGPS, REF_LOGPS)


@dataclass
class Rollout:
    """One generation batch, ready to train on for `num_iterations` steps."""

    index: int
    """The generation batch's index in the run (its sampling seed follows from it)."""
    micro_batches: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]
    """What is logged of it: rewards (total and per function), their std, completion lengths."""


def seed_of(seed: int, index: int) -> int:
    """The sampling seed of generation batch `index` of a run seeded `seed`."""
    return (seed * 1_000_003 + index) % (2**63)


def rollout_rows(completions: int, longest: int, row_tokens: int, per_device: int) -> int:
    """The micro-batches a generation batch of `completions` prompt + completion documents, each at
    most `longest` tokens, trains as: the fewest rows of `row_tokens` tokens that hold them at
    their longest (whatever is sampled, the count is the same at every step), or with
    `row_tokens` 0 `per_device` documents a row (TRL's split).

    Why rows, not TRL's micro-batches of per_device_train_batch_size completions: a generation
    batch of 64 completions of 256 tokens is 8 micro-batches of ~2.5k tokens there, each too
    short to keep a GPU busy (their kernel launches bound them); the loss weights are the whole
    step's (`sequence_weights`), so how the documents are dealt changes no gradient."""
    per_row = max(1, row_tokens // longest) if row_tokens else per_device
    return -(-completions // per_row)


def deal_rows(lengths: list[int], rows: int) -> list[list[int]]:
    """The documents (by index) of each of `rows` rows: longest first, dealt back and forth over
    the rows, so that every row holds at most ceil(n / rows) documents and about the same tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    dealt: list[list[int]] = [[] for _ in range(rows)]
    for k, i in enumerate(order):
        turn, at = divmod(k, rows)
        dealt[at if turn % 2 == 0 else rows - 1 - at].append(i)
    return [sorted(r) for r in dealt]


def packed_micro_batch(prompts: list[list[int]], completions: list[list[int]], trained: list[bool],
                       pad_id: int, varlen: bool) -> dict[str, torch.Tensor]:
    """Prompt + completion documents in one packed row; the completion tokens labelled (none of
    a masked completion's), `SEQ` the completion of each labelled position."""
    records = []
    for p, c, t in zip(prompts, completions, trained):
        records.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + (c if t else [IGNORE_INDEX] * len(c))})
    batch = PackedCollator(pad_id).rows([pack_records(records)])
    batch = add_batch_extras(batch, positions=True, offsets=varlen)
    counts = torch.tensor([len(c) if t else 0 for c, t in zip(completions, trained)])
    batch[SEQ] = torch.repeat_interleave(torch.arange(len(completions)), counts)
    return batch


class RolloutLoader:
    """The Trainer's training data: per optimizer step, its micro-batches; a new generation batch
    every `num_iterations` steps (see the module docstring). The epoch's prompt order is
    `EpochShuffle`'s; prompts left over at the end of an epoch (fewer than a generation batch)
    wait for the next epoch's order."""

    def __init__(self, trainer: "GrpoTrainer"):
        self.trainer = trainer
        args, grpo = trainer.args, trainer.grpo
        self.dataset = trainer.prompts  # what the Trainer counts as examples
        self.accumulation = args.gradient_accumulation_steps  # the generation batch's rows (`rollout_rows`)
        self.completions = trainer.completions  # a generation batch, per process
        self.per_batch = self.completions // grpo.num_generations  # prompts per generation batch and process
        self.world, self.rank = args.world_size, args.process_index
        self.batches_per_epoch = len(trainer.prompts) // (self.per_batch * self.world)
        if self.batches_per_epoch == 0:
            raise LmforgeError(f"{len(trainer.prompts)} prompts make no generation batch of {self.per_batch} prompts "
                               f"per process ({self.completions} completions / --num_generations "
                               f"{grpo.num_generations}) on {self.world} process(es)")
        self.order = EpochShuffle(len(trainer.prompts), args.data_seed if args.data_seed is not None else args.seed)
        self.skip = 0
        self.rollout: Rollout | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch * self.trainer.grpo.num_iterations * self.accumulation

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def skipped(self, n: int) -> "RolloutLoader":
        """This loader, starting `n` micro-batches into its epoch (a resumed run)."""
        self.skip = n
        return self

    def __iter__(self):
        order = list(self.order)
        start, self.skip = self.skip, 0
        per_batch = self.trainer.grpo.num_iterations * self.accumulation
        for position in range(start, len(self)):
            batch, within = divmod(position, per_batch)
            index = self.order.epoch * self.batches_per_epoch + batch
            if self.rollout is None or self.rollout.index != index:
                self.rollout = self.trainer.saved_rollout(index) if within else None
                if self.rollout is None:
                    first = (batch * self.world + self.rank) * self.per_batch
                    prompts = [self.trainer.prompts[i] for i in order[first:first + self.per_batch]]
                    self.rollout = self.trainer.make_rollout(prompts, index)
            yield self.rollout.micro_batches[within % self.accumulation]


class SaveRollout(LmforgeCallback):
    """Puts the generation batch in progress into each checkpoint, for a resume between its steps."""

    def __init__(self, trainer: "GrpoTrainer"):
        self.trainer = trainer

    def on_checkpoint_staged(self, args, state, staged_dir: str) -> None:
        loader = self.trainer.rollout_loader
        rollout = loader.rollout if loader is not None else None
        if rollout is None or not state.is_world_process_zero:
            return
        tensors = {f"{k}.{name}": t.contiguous() for k, batch in enumerate(rollout.micro_batches)
                   for name, t in batch.items()}
        save_file(tensors, os.path.join(staged_dir, ROLLOUT_FILE),
                  metadata={"index": str(rollout.index), "rows": str(len(rollout.micro_batches)),
                            "metrics": json.dumps(rollout.metrics)})


class GrpoTrainer(Trainer):
    """lmforge's Trainer with GRPO's data (`RolloutLoader`) and loss. Logs, averaged over the
    steps since the last log: `reward` and `reward_std`, each function's mean (`rewards/NAME`),
    `completion_length` (mean and max), `truncated` (the share of completions that reached
    --max_completion_length), `clip_ratio/low` and `clip_ratio/high`, `entropy` (the sampling
    distributions', per token) and `kl` with a reference."""

    def __init__(self, *args, grpo, prompts: list[Prompt], rewards, engine: Engine, tokenizer_decode,
                 stop_ids: list[int], pad_id: int, completions: int, rows: int,
                 reference: torch.nn.Module | None = None, eval_prompts: list[Prompt] | None = None, **kwargs):
        # `completions` (per_device_train_batch_size x gradient_accumulation_steps, as TRL reads
        # them) is the generation batch; the Trainer accumulates over the `rows` it is packed
        # into instead (`rollout_rows`). Set before the Trainer makes its accelerator, which reads it.
        kwargs["args"].gradient_accumulation_steps = rows
        super().__init__(*args, **kwargs)
        self.completions = completions
        self.grpo = grpo
        self.prompts = prompts
        self.eval_prompts = eval_prompts
        self.rewards = rewards
        self.engine = engine
        self.decode = tokenizer_decode
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.reference = reference.to(self.args.device) if reference is not None else None
        self.config = SurrogateConfig(grpo.epsilon, grpo.epsilon_high, grpo.beta, grpo.importance_sampling_level)
        self.sampling = Sampling(grpo.max_completion_length, grpo.temperature, grpo.top_p, grpo.top_k)
        # The loss of a micro-batch is its share of the step's loss already (`sequence_weights`):
        # the Trainer must not divide it by the accumulation steps again.
        self.loss_is_scaled_for_ga = True
        self.rollout_loader: RolloutLoader | None = None
        self.resumed_from: str | None = None
        self._metrics: dict[str, list] = defaultdict(list)  # floats, or tensors of the loss
        self._counted_step = -1
        self.add_callback(SaveRollout(self))

    # -------------------------------------------------------------------------------------
    # Data: the rollout loader
    # -------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        self.rollout_loader = RolloutLoader(self)
        return self.rollout_loader

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        # The skipped micro-batches are never sampled: the loader starts at the resumed one.
        return dataloader.skipped(num_batches)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.resumed_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def saved_rollout(self, index: int) -> Rollout | None:
        """Generation batch `index` as the checkpoint resumed from holds it, or None."""
        path = os.path.join(self.resumed_from, ROLLOUT_FILE) if self.resumed_from else None
        if path is None or not os.path.isfile(path):
            return None
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        if int(metadata["index"]) != index or int(metadata.get("rows", -1)) != self.args.gradient_accumulation_steps:
            return None  # another batch, or dealt into another number of rows (the prompts changed)
        tensors = load_file(path)
        batches: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, t in tensors.items():
            k, name = key.split(".", 1)
            batches[int(k)][name] = t
        return Rollout(index, [batches[k] for k in sorted(batches)], json.loads(metadata["metrics"]))

    def make_rollout(self, prompts: list[Prompt], index: int) -> Rollout:
        """Sample, reward and prepare one generation batch (step 1-2 of the module docstring)."""
        g = self.grpo.num_generations
        model = self.accelerator.unwrap_model(self.model)
        repeated = [p for p in prompts for _ in range(g)]  # a prompt's completions consecutive
        started = _now(self.args.device)
        completions, texts, scores, generated = self._sample_and_score(model, repeated, seed_of(self.args.seed, index))
        total = torch.as_tensor(scores.total, dtype=torch.float32)
        batch_std = None
        if self.grpo.scale_rewards == ScaleRewards.BATCH and self.accelerator.num_processes > 1:
            # The std of the whole generation batch, as one process would compute it: every process' rewards.
            batch_std = self.accelerator.gather(total.to(self.args.device)).std().item()
        adv = advantages(total, g, self.grpo.scale_rewards, batch_std)
        trained = [not (self.grpo.mask_truncated_completions and c.truncated) for c in completions]
        lengths = torch.tensor([len(c.ids) if t else 0 for c, t in zip(completions, trained)])
        # Counted over every process: each one's loss is then its share of the step's, and DDP's
        # mean of their gradients times the process count (`compute_loss`) is the step's gradient.
        counts = self.accelerator.reduce(torch.tensor([float(lengths.sum()), float(len(lengths))],
                                                      device=self.args.device), reduction="sum").tolist()
        weights = sequence_weights(lengths, self.grpo.loss_type, self.grpo.max_completion_length,
                                   step_tokens=counts[0], step_completions=int(counts[1]))
        batches = []
        documents = [len(p.input_ids) + len(c.ids) for p, c in zip(repeated, completions)]
        for rows in deal_rows(documents, self.args.gradient_accumulation_steps):
            batch = packed_micro_batch([repeated[i].input_ids for i in rows], [completions[i].ids for i in rows],
                                       [trained[i] for i in rows], self.pad_id, self._varlen())
            batch[ADVANTAGE] = adv[rows].clone()
            batch[WEIGHT] = weights[rows].to(torch.float32)
            self._add_log_probs(batch)
            batches.append(batch)
        metrics = self._rollout_metrics(total, scores, completions)
        metrics["time/generation_s"] = generated - started
        metrics["time/rollout_s"] = _now(self.args.device) - started  # generation, rewards, old / reference log-probs
        self._log_samples(repeated, texts, total, completions)
        return Rollout(index, batches, metrics)

    def _sample_and_score(self, model, repeated: list[Prompt], seed: int):
        """(completions, their texts, their rewards, the time generation ended) of one sampling
        of `repeated` (each prompt once per completion wanted) with `seed`."""
        completions = self.engine.complete(model, [p.input_ids for p in repeated], self.sampling, seed)
        generated = _now(self.args.device)
        texts = [self.decode(self._answer_ids(c)) for c in completions]
        scores = self.rewards.score(
            prompts=[p.messages for p in repeated],
            completions=[[{"role": "assistant", "content": t}] for t in texts],
            completion_ids=[c.ids for c in completions],
            columns=_columns(repeated), records=[p.location for p in repeated])
        return completions, texts, scores, generated

    def _answer_ids(self, completion: Completion) -> list[int]:
        """The completion's tokens without the end-of-turn token that closed it (its text)."""
        ids = completion.ids
        return ids[:-1] if ids and not completion.truncated and ids[-1] in self.stop_ids else ids

    def _varlen(self) -> bool:
        from lmforge.modeling.attention import VARLEN

        return self._attn_implementation() == VARLEN

    @torch.no_grad()
    def _add_log_probs(self, batch: dict) -> None:
        """The sampling policy's log-probs (several steps on one batch) and the reference's (a
        KL penalty), computed once per generation batch."""
        needs_old = self.grpo.num_iterations > 1
        needs_ref = self.grpo.beta > 0
        if not (needs_old or needs_ref):
            return
        model = self.model
        was_training = model.training
        model.eval()
        try:
            if needs_old:
                batch[OLD_LOGPS] = self._log_probs(model, self.fused_head, batch).float().cpu()
            if needs_ref:
                batch[REF_LOGPS] = self._reference_log_probs(model, batch).float().cpu()
        finally:
            model.train(was_training)

    def _reference_log_probs(self, model, batch: dict) -> torch.Tensor:
        if self.reference is not None:
            base = self.reference.get_base_model() if is_peft(self.reference) else self.reference
            head = base.get_output_embeddings() if self.fused_head is not None else None
            return self._log_probs(self.reference, head, batch)
        unwrapped = self.accelerator.unwrap_model(model)
        if not is_peft(unwrapped):
            raise LmforgeError("--beta > 0 needs a reference: LoRA (the adapter disabled) or a frozen copy")
        with unwrapped.disable_adapter():
            return self._log_probs(model, self.fused_head, batch)

    def _log_probs(self, model, head, batch: dict) -> torch.Tensor:
        """The sampling policy's or the reference's log-probs of a stored micro-batch, under the
        precision training uses."""
        device = self.args.device
        with self.accelerator.autocast():
            return self.completion_log_probs(model, head, {k: v.to(device) for k, v in batch.items()
                                                           if k not in GRPO_KEYS})

    def completion_log_probs(self, model, head, inputs: dict) -> torch.Tensor:
        """The log-probs of a micro-batch's completion tokens, in order (`inputs`: the packed row,
        its labels and labelled positions; consumed)."""
        positions = inputs.pop(LABEL_POSITIONS)
        labels = inputs.pop("labels")
        self.attend_per_document(model, inputs)
        return token_log_probs(model, head, inputs, labels, positions)

    # -------------------------------------------------------------------------------------
    # The loss
    # -------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seq, adv, weight = inputs.pop(SEQ), inputs.pop(ADVANTAGE), inputs.pop(WEIGHT)
        old, ref = inputs.pop(OLD_LOGPS, None), inputs.pop(REF_LOGPS, None)
        logp = self.completion_log_probs(model, self.fused_head, inputs).float()
        old = logp.detach() if old is None else old.float()
        parts = surrogate_loss(logp, old, ref, seq, adv.float(), weight.float(), self.config)
        rollout = self.rollout_loader.rollout if self.rollout_loader is not None else None
        if rollout is not None and self._counted_step != self.state.global_step:
            # Each step logs the generation batch it trains on (one batch serves num_iterations steps).
            self._counted_step = self.state.global_step
            for name, value in rollout.metrics.items():
                self._metrics[name].append(value)
        tokens = max(parts.tokens, 1)
        # Kept as tensors: reading them here would make the host wait for the GPU every micro-batch.
        self._metrics["clip_ratio/low"].append(parts.clipped_low / tokens)
        self._metrics["clip_ratio/high"].append(parts.clipped_high / tokens)
        if self.config.beta:
            self._metrics["kl"].append(parts.kl / tokens)
        # DDP averages the processes' gradients; the weights already divide by the whole step.
        loss = parts.loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    # -------------------------------------------------------------------------------------
    # Evaluation: rewards on held-out prompts
    # -------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The held-out prompts (--eval_data_path, --val_split), each sampled num_generations
        times as in training, rewarded: `eval_reward`, `eval_reward_std`, each function's mean,
        the completion lengths and the truncated share. The sampling seeds are the same at every
        evaluation, so that two evaluations differ by the weights only. Prompts are spread over
        the processes; the means are over all of them."""
        prompts = self.eval_prompts if eval_dataset is None else eval_dataset
        if not prompts:
            return {}
        g, rank, world = self.grpo.num_generations, self.args.process_index, self.args.world_size
        # A training generation batch's prompts at a time: what training showed fits in memory.
        per_batch = self.completions // g
        mine = prompts[rank::world]
        model = self.accelerator.unwrap_model(self.model)
        totals, per_function, completions = [], [], []
        # Every process runs the same number of generation batches: sharded weights gather at each forward.
        batches = -(-len(prompts[0::world]) // per_batch)
        for k in range(batches):
            chunk = mine[k * per_batch:(k + 1) * per_batch] or prompts[:1]  # fewer prompts here: one, not counted
            counted = len(mine[k * per_batch:(k + 1) * per_batch])
            repeated = [p for p in chunk for _ in range(g)]
            seed = seed_of(self.args.seed, -(world * k + rank) - 1)  # negative: never a training batch's
            out, _, scores, _ = self._sample_and_score(model, repeated, seed)
            totals.append(torch.as_tensor(scores.total, dtype=torch.float32)[:counted * g])
            per_function.append(torch.as_tensor(scores.per_function, dtype=torch.float32)[:counted * g])
            completions += out[:counted * g]
        total, functions = torch.cat(totals), torch.cat(per_function)
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        truncated = torch.tensor([float(c.truncated) for c in completions])
        found = ~torch.isnan(functions)
        sums = torch.cat([torch.stack([total.sum(), (total ** 2).sum(), torch.tensor(float(total.numel())),
                                       lengths.sum(), truncated.sum()]),
                          torch.where(found, functions, 0.0).sum(0), found.sum(0).float()]).double()
        sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu().tolist()
        n, names = sums[2], self.rewards.names
        mean = sums[0] / n
        metrics = {f"{metric_key_prefix}_reward": mean,
                   f"{metric_key_prefix}_reward_std": max((sums[1] - n * mean * mean) / max(n - 1, 1), 0.0) ** 0.5,
                   f"{metric_key_prefix}_completion_length": sums[3] / n,
                   f"{metric_key_prefix}_truncated": sums[4] / n}
        for j, name in enumerate(names):
            if sums[5 + len(names) + j]:
                metrics[f"{metric_key_prefix}_rewards/{name}"] = sums[5 + j] / sums[5 + len(names) + j]
        metrics = {k: round(v, 6) for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -------------------------------------------------------------------------------------
    # What is logged
    # -------------------------------------------------------------------------------------

    def _rollout_metrics(self, total: torch.Tensor, scores, completions: list[Completion]) -> dict[str, float]:
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        metrics = {"reward": total.mean().item(), "reward_std": total.std().item() if total.numel() > 1 else 0.0,
                   "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
                   "truncated": sum(c.truncated for c in completions) / len(completions)}
        measured = [(c.entropy, len(c.ids)) for c in completions if c.entropy == c.entropy and c.ids]
        if measured:  # per token, as the loss is aggregated by default
            metrics["entropy"] = sum(e * n for e, n in measured) / sum(n for _, n in measured)
        for name, column in zip(scores.names, scores.per_function.T):
            values = column[~torch.isnan(column)] if torch.is_tensor(column) else column
            if len(values):
                metrics[f"rewards/{name}"] = float(values.mean())
        return metrics

    def _log_samples(self, prompts: list[Prompt], texts: list[str], total: torch.Tensor,
                     completions: list[Completion]) -> None:
        n = self.grpo.log_completions
        step = self.state.global_step
        if not n or not self.is_world_process_zero() or step % max(int(self.args.logging_steps), 1):
            return
        lines = [{"step": step, "prompt": self.decode(p.input_ids), "generation": t,
                  "reference": f"reward {r:.3g}", "stopped": not c.truncated}
                 for p, t, r, c in zip(prompts[:n], texts[:n], total.tolist()[:n], completions[:n])]
        with open(os.path.join(self.args.output_dir, SAMPLES_NAME), "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        for i, line in enumerate(lines, 1):
            print(f"lmforge: completion {i} at step {step} ({line['reference']}): {line['generation']!r}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            names = sorted(self._metrics)
            values = torch.stack([_mean(self._metrics[n]) for n in names])
            values = self.accelerator.reduce(values.to(self.args.device), reduction="mean")
            logs.update({n: round(v, 6) for n, v in zip(names, values.tolist())})
            self._metrics.clear()
        super().log(logs, start_time)


def _mean(values: list) -> torch.Tensor:
    """The mean of logged values: floats, or the loss' 0-d tensors (read here, at the log)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in values]).mean()


def _now(device: torch.device) -> float:
    """The time once the device has finished what was queued (a timing of GPU work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _columns(prompts: list[Prompt]) -> dict[str, list]:
    """Each column of the records, one value per completion (a prompt's repeated for its group);
    a record that lacks a column others have gives None there."""
    names = dict.fromkeys(name for p in prompts for name in p.columns)
    return {name: [p.columns.get(name) for p in prompts] for name in names}
