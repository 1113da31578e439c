"""GRPO's loss against a reference written from the papers' formulas: padded [completions ×
tokens] tensors, one completion at a time, fp32 on the CPU. lmforge's `surrogate_loss` takes the
same tokens flat, split into micro-batches whose losses add up to the step's."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.rl.surrogate import (
    STD_EPS,
    LossType,
    RatioLevel,
    ScaleRewards,
    SurrogateConfig,
    advantages,
    sequence_weights,
    surrogate_loss,
)

G, PROMPTS, T, V, MAX_LEN = 4, 2, 9, 5, 12
LENGTHS = [3, 9, 5, 7, 2, 8, 6, 4]  # completion lengths, prompt 0's four then prompt 1's


def reference_advantages(rewards: list[float], scale: str) -> list[float]:
    """A_i = (r_i - mean of its group) / (std of its group, or of the batch, or 1)."""
    out = []
    batch = torch.tensor(rewards)
    for g in range(len(rewards) // G):
        group = torch.tensor(rewards[g * G:(g + 1) * G])
        for r in group.tolist():
            centred = r - group.mean().item()
            if scale == "group":
                centred /= group.std().item() + STD_EPS
            elif scale == "batch":
                centred /= batch.std().item() + STD_EPS
            out.append(centred)
    return out


def reference_loss(logp, old, ref, adv, loss_type: str, level: str, eps_low: float, eps_high: float, beta: float):
    """-J for the step, completion by completion, token by token:
    GRPO: J = mean_i (1/|o_i|) sum_t [min(r A, clip(r) A) - beta KL];  DAPO: J = (1/sum_i |o_i|) sum_i sum_t [...];
    Dr. GRPO: J = (1/(N * L_max)) sum_i sum_t [...]; GSPO (level sequence): r_it = exp(mean_t log(pi/pi_old))."""
    total, tokens, n = 0.0, sum(LENGTHS), len(LENGTHS)
    for i, length in enumerate(LENGTHS):
        seq_ratio = torch.exp((logp[i, :length] - old[i, :length]).mean())
        terms = []
        for t in range(length):
            r = seq_ratio if level == "sequence" else torch.exp(logp[i, t] - old[i, t])
            term = torch.minimum(r * adv[i], torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv[i])
            if beta:
                kl = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
                term = term - beta * kl
            terms.append(term)
        s = torch.stack(terms).sum()
        if loss_type == "grpo":
            total = total + s / length / n
        elif loss_type == "dapo":
            total = total + s / tokens
        else:
            total = total + s / (n * MAX_LEN)
    return -total


def policy_logp(theta: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(theta, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def flat(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return torch.cat([x[i, :LENGTHS[i]] for i in rows])


def lmforge_loss(logp, old, ref, adv, loss_type: str, level: str, eps_low, eps_high, beta, micro: list[list[int]]):
    """The step's loss as lmforge computes it: micro-batches of completions, flat tokens."""
    weights = sequence_weights(torch.tensor(LENGTHS), LossType(loss_type), MAX_LEN)
    config = SurrogateConfig(eps_low, eps_high, beta, RatioLevel(level))
    total = 0.0
    for rows in micro:
        seq = torch.cat([torch.full((LENGTHS[i],), k) for k, i in enumerate(rows)])
        parts = surrogate_loss(flat(logp, rows), flat(old, rows), flat(ref, rows) if beta else None, seq,
                               adv[rows], weights[rows], config)
        total = total + parts.loss
    return total


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (len(LENGTHS), T), generator=g)
    theta0 = torch.randn(len(LENGTHS), T, V, generator=g)
    ref = policy_logp(torch.randn(len(LENGTHS), T, V, generator=g), tokens)
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25]
    return tokens, theta0, ref, rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_follow_the_formula(scale):
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0]  # the second group all equal: advantages 0
    got = advantages(torch.tensor(rewards), G, ScaleRewards(scale))
    assert torch.allclose(got, torch.tensor(reference_advantages(rewards, scale)), atol=1e-6)
    assert got[4:].abs().max() == 0


def test_batch_scaling_split_over_processes_equals_the_whole_batch():
    """Under DDP each process holds some groups; with the whole batch's std (`batch_std`, which
    the trainer gathers), their advantages are the one-process batch's."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 0.0, 1.0])
    whole = advantages(rewards, G, ScaleRewards.BATCH)
    parts = [advantages(part, G, ScaleRewards.BATCH, batch_std=rewards.std().item()) for part in rewards.split(G)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-7)
    assert not torch.allclose(advantages(rewards[:G], G, ScaleRewards.BATCH), whole[:G])  # its own std differs


@pytest.mark.parametrize("loss_type, level, beta, updates", [
    *itertools.product(["dapo", "grpo", "dr_grpo"], ["token"], [0.0, 0.04], [1, 3]),
    *itertools.product(["dapo", "grpo"], ["sequence"], [0.0, 0.04], [3]),
])
def test_loss_and_gradients_equal_the_reference(problem, loss_type, level, beta, updates):
    """`updates` > 1 is mu > 1: several updates on one generation batch, the sampling policy's
    log-probs stored; the parameters after each update must agree, micro-batched or not."""
    tokens, theta0, ref, rewards = problem
    adv = advantages(torch.tensor(rewards), G, ScaleRewards.GROUP)
    old = policy_logp(theta0, tokens).detach()
    eps_low, eps_high = 0.2, 0.28  # DAPO's clip-higher
    thetas = {"reference": theta0.clone().requires_grad_(), "lmforge": theta0.clone().requires_grad_()}
    for _ in range(updates):
        losses = {}
        for name, theta in thetas.items():
            logp = policy_logp(theta, tokens)
            if name == "reference":
                losses[name] = reference_loss(logp, old, ref, adv, loss_type, level, eps_low, eps_high, beta)
            else:
                losses[name] = lmforge_loss(logp, old, ref, adv, loss_type, level, eps_low, eps_high, beta,
                                            micro=[[0, 1, 2], [3, 4, 5, 6, 7]])
            theta.grad = None
            losses[name].backward()
        assert abs(losses["reference"].item() - losses["lmforge"].item()) <= 1e-6
        assert torch.allclose(thetas["reference"].grad, thetas["lmforge"].grad, atol=1e-6, rtol=0)
        assert thetas["lmforge"].grad.abs().sum() > 0
        with torch.no_grad():
            for theta in thetas.values():
                theta -= 5.0 * theta.grad  # large steps: ratios leave the clip range by the third update
    ratio = torch.exp(policy_logp(thetas["lmforge"], tokens) - old)
    if updates > 1:
        assert (ratio > 1 + eps_high).any() or (ratio < 1 - eps_low).any()


def test_clip_counts_and_kl_are_reported():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.9, 0.1]))
    old = torch.log(torch.tensor([0.3, 0.5, 0.5, 0.5]))
    seq, adv = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, -1.0])
    parts = surrogate_loss(logp, old, logp, seq, adv, torch.tensor([0.25, 0.25]), SurrogateConfig(0.2, 0.2, 0.1))
    # ratios 1.67 (A > 0: clipped high), 1.0, 1.8 (A < 0: not clipped), 0.2 (A < 0: clipped low)
    assert (parts.clipped_high.item(), parts.clipped_low.item(), parts.tokens) == (1, 1, 4)
    assert parts.kl.item() == 0.0  # the reference is the policy


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_processes_weights_add_up_to_the_steps(loss_type):
    """Two processes, each with half of a step's completions and the step's counts: their weights
    are the weights of the whole step."""
    lengths = torch.tensor(LENGTHS)
    whole = sequence_weights(lengths, LossType(loss_type), MAX_LEN)
    halves = [sequence_weights(part, LossType(loss_type), MAX_LEN, step_tokens=float(lengths.sum()),
                               step_completions=len(LENGTHS)) for part in (lengths[:3], lengths[3:])]
    assert torch.equal(torch.cat(halves), whole)
