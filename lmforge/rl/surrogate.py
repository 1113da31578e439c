"""The policy-gradient half of GRPO: group-relative advantages and the clipped surrogate loss,
on flat per-token tensors.

The tokens of a step's completions arrive flat (packed rows: no padding anywhere), each with
the index of the completion it belongs to (`seq`). The loss is written as a weighted sum over
tokens,

    loss = sum_i w_i * sum_{t in completion i} l_it

so that one formula covers the three aggregations in use and stays exact under gradient
accumulation and several micro-batches: the caller gives each completion its weight `w_i` from
counts over the whole optimizer step (`sequence_weights`), and the micro-batch losses add up to
the step's loss.

  - `dapo` (DAPO, the default): every completion token of the step counts the same,
    w_i = 1 / (completion tokens in the step);
  - `grpo` (the GRPO paper): each completion's tokens averaged, then the completions,
    w_i = 1 / (|y_i| * completions in the step);
  - `dr_grpo` (Dr. GRPO): a constant, w_i = 1 / (completions in the step * max completion length),
    so that no length bias enters through the normalisation.

Per token, with r_it the probability ratio of the current policy to the one that sampled the
completion (`old_logp`; equal to the current one at the first update of a generation batch):

    l_it = -min(r_it * A_i, clip(r_it, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * KL_it

where KL_it is the k3 estimator of KL(policy || reference), exp(q - p) - (q - p) - 1 with p, q
the policy's and the reference's log-probabilities (Schulman's estimator, as GRPO uses it). With
`level="sequence"` (GSPO) r_it is the completion's length-normalised sequence ratio,
exp(mean_t (p - p_old)), the same for each of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.flags import LossType, RatioLevel, ScaleRewards

# Added to a standard deviation before dividing by it: a group whose completions all got the
# same reward has std 0 and advantages 0, which this keeps at 0 rather than NaN.
STD_EPS = 1e-4


def advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = ScaleRewards.GROUP,
               batch_std: float | None = None) -> torch.Tensor:
    """Group-relative advantages of `rewards` [N] (N = prompts × `group_size`, a prompt's
    completions consecutive): each reward less its group's mean, divided as `scale` says. The
    standard deviation is the sample one (n - 1), as TRL computes it. `batch_std`: the std of
    the whole generation batch's rewards where `rewards` are one process' part of it."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == ScaleRewards.GROUP:
        return centred / (grouped.std(dim=1).repeat_interleave(group_size) + STD_EPS)
    if scale == ScaleRewards.BATCH:
        return centred / ((rewards.std() if batch_std is None else batch_std) + STD_EPS)
    return centred


def sequence_weights(lengths: torch.Tensor, loss_type: LossType, max_completion_length: int,
                     step_tokens: float | None = None, step_completions: int | None = None) -> torch.Tensor:
    """Each completion's weight w_i in the step's loss (see the module docstring), from the
    completion lengths [N] of this process' part of the optimizer step (masked completions at
    length 0). `step_tokens` / `step_completions`: the counts over every process of the step
    (default: these completions'), so that the processes' losses add up to the step's."""
    n = lengths.numel()
    lengths = lengths.to(torch.float64)
    tokens = float(lengths.sum()) if step_tokens is None else step_tokens
    completions = n if step_completions is None else step_completions
    if loss_type == LossType.DAPO:
        return torch.full((n,), 1.0 / max(tokens, 1.0), dtype=torch.float64)
    if loss_type == LossType.GRPO:
        return 1.0 / (lengths.clamp(min=1.0) * completions)
    return torch.full((n,), 1.0 / (completions * max_completion_length), dtype=torch.float64)


@dataclass(frozen=True)
class SurrogateConfig:
    epsilon: float = 0.2
    """The ratio's lower clip is 1 - epsilon."""
    epsilon_high: float = 0.2
    """The ratio's upper clip is 1 + epsilon_high (DAPO's clip-higher sets it above epsilon)."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference policy (0: no reference is computed)."""
    level: RatioLevel = RatioLevel.TOKEN
    """Token-level ratios, or GSPO's sequence-level ones."""


@dataclass
class LossParts:
    """A micro-batch's loss and what is logged about it (sums over its tokens, to be divided
    by the step's token count when logged)."""

    loss: torch.Tensor
    tokens: int
    clipped_low: torch.Tensor
    """Tokens whose ratio fell below 1 - epsilon with a negative advantage (the clip was active)."""
    clipped_high: torch.Tensor
    """Tokens whose ratio rose above 1 + epsilon_high with a positive advantage."""
    kl: torch.Tensor
    """The sum of the per-token KL estimates (0 without a reference)."""


def surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, seq: torch.Tensor,
                   advantage: torch.Tensor, weight: torch.Tensor, config: SurrogateConfig) -> LossParts:
    """The clipped surrogate (+ KL) over the completion tokens of a micro-batch.

    logp, old_logp, ref_logp: [T] log-probabilities of the T completion tokens under the current
    policy (with grad), the sampling policy and the reference; seq: [T] the index of each
    token's completion; advantage, weight: [N] per completion (`advantages`, `sequence_weights`)."""
    log_ratio = logp - old_logp
    if config.level == RatioLevel.SEQUENCE:
        n = advantage.numel()
        counts = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, seq, torch.ones_like(logp))
        per_seq = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, seq, log_ratio)
        log_ratio = (per_seq / counts.clamp(min=1))[seq]
    ratio = torch.exp(log_ratio)
    a = advantage.to(logp.dtype)[seq]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - config.epsilon, 1 + config.epsilon_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if config.beta and ref_logp is not None:
        delta = ref_logp - logp
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + config.beta * per_token_kl
        kl = per_token_kl.detach().sum()
    loss = (per_token * weight.to(logp.dtype)[seq]).sum()
    with torch.no_grad():
        low = ((ratio < 1 - config.epsilon) & (a < 0)).sum()
        high = ((ratio > 1 + config.epsilon_high) & (a > 0)).sum()
    return LossParts(loss, int(logp.numel()), low, high, kl)
