"""One Triton kernel for the softmax rows of the chunked loss (CUDA only).

The chunked cross-entropy (`lmforge.modeling.loss`) needs, for each chunk of logits, every row's
log-sum-exp, the target's logit and, for the gradient, softmax - one-hot. Written with torch ops
(even compiled) that is five passes over a chunk: the bf16 logits cast to a materialised fp32
copy, a max reduction, an exp-sum reduction, the gradient, and its cast back. On the 0.5B shape
those passes took a large share of the step, for work the memory system can do in far less time
(measured: docs/bench_results.md, 2026-12-02 (evening), the loss kernel): one kernel that reads
each row once for an online log-sum-exp and once more (mostly from L2) to write the gradient in
place over the logits, with no fp32 copy and no new allocation. Liger's cross-entropy kernel does
the same job but is an optional dependency; this one is 40 lines and takes the per-row gradient
scale that DPO's log-probabilities need.
"""

from __future__ import annotations

import functools

import torch

from lmforge.kernels.triton_launch import available, on

# Vocabulary entries a program reads per iteration, and its warps: the fastest of the sizes tried
# (measured: docs/bench_results.md, 2026-12-02 (evening), the loss kernel).
BLOCK = 8192
NUM_WARPS = 8


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_rows(x_ptr, stride, target_ptr, scale_ptr, lse_ptr, picked_ptr, vocab,
                     HAS_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        target = tl.load(target_ptr + row)
        # Read before the first pass: its reductions synchronise the program's warps, so every
        # warp has read the target's logit before any of them overwrites the row in the second.
        picked = tl.load(base + target).to(tl.float32)
        cols = tl.arange(0, BLOCK)
        # Online log-sum-exp: a running maximum and the sum of exp(x - maximum), rescaled when
        # the maximum grows. The first block holds at least one real entry, so m is finite after it.
        m = float("-inf")
        s = 0.0
        for start in range(0, vocab, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        tl.store(picked_ptr + row, picked)
        if WRITE_GRAD:
            if HAS_SCALE:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            else:
                scale = 1.0
            for start in range(0, vocab, BLOCK):
                mask = start + cols < vocab
                x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = (tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)) * scale
                tl.store(base + start + cols, g.to(x_ptr.dtype.element_ty), mask=mask)

    return softmax_rows


def softmax_rows(logits: torch.Tensor, target: torch.Tensor, grad_scale: torch.Tensor | None = None,
                 write_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [N, V] (16- or 32-bit, rows contiguous) and target [N]: (log-sum-exp of each
    row, the target's logit), both fp32. With `write_grad`, each row of `logits` is overwritten
    with (softmax - one_hot(target)) * grad_scale[row] (1 without a scale), in its own dtype."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("softmax_rows: the logits' rows must be contiguous")
    target = target.contiguous()
    grad_scale = grad_scale.contiguous() if grad_scale is not None else None
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    picked = torch.empty_like(lse)
    if n:
        with on(logits.device):
            _kernel()[(n,)](logits, logits.stride(0), target, grad_scale if grad_scale is not None else lse, lse,
                            picked, vocab, HAS_SCALE=grad_scale is not None, WRITE_GRAD=write_grad, BLOCK=BLOCK,
                            num_warps=NUM_WARPS)
    return lse, picked


def usable(logits: torch.Tensor) -> bool:
    """Whether `softmax_rows` takes these logits: on a CUDA device with Triton, 16 or 32 bits
    (fp64, used by CPU tests, stays with torch ops)."""
    return (logits.device.type == "cuda" and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and available())
