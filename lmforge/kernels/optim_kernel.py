"""One Triton kernel for AdamW over fp32 masters of 16-bit weights (CUDA only).

`MasterWeightAdamW` without it makes four passes over every trained parameter a step: the
16-bit gradients copied into fp32 ones, their norm and the clipping's scaling, torch's fused
AdamW over the masters, and the masters copied back into the 16-bit weights: a share of a small
model's step worth cutting (measured: docs/bench_results.md, 2026-12-03 (afternoon), the update
kernel). This kernel reads each 16-bit gradient once, scales it by the clipping's factor, updates
master and moments in fp32 (torch's fused AdamW arithmetic) and writes master, moments and the
rounded 16-bit weight, in one launch per parameter group: about 30 bytes a parameter in all,
where the four passes moved about 50. torch has no fused update for
parameters and gradients of another dtype than its fp32 state; this is the one hand-written
piece that buys it.

The tensors stay where they are (the model's parameters and gradients, the masters and the
moments that torch's AdamW would hold): a table gives every tensor's start as an offset in
elements from the group's first tensor of the same kind, and a second table splits the tensors
into blocks of BLOCK elements, one program each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from lmforge.kernels.triton_launch import available, on

# Elements a program updates, and its warps: the fastest of the sizes tried (measured:
# docs/bench_results.md, 2026-12-03 (afternoon), the update kernel).
BLOCK = 1024
NUM_WARPS = 4
# Every tensor starts a multiple of this many elements from its kind's first (PyTorch's allocator
# places tensors 512 bytes apart at least; a view elsewhere sends the group to torch's path).
ALIGN = 16


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_blocks(block_tensor, block_start, numels, offsets, grad_base, weight_base, master_base, avg_base,
                     sq_base, steps, coef_ptr, found_ptr, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
                     weight_decay, count, HAS_COEF: tl.constexpr, HAS_FOUND: tl.constexpr, MASKED: tl.constexpr,
                     ALIGN: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        idx = tl.multiple_of(tl.load(block_start + pid), BLOCK) + tl.arange(0, BLOCK)
        # The same value in every lane (a step the loss scaler or the guard found non-finite
        # changes nothing): loads under it stay vectorised. Only a tensor's last block, when
        # partial, is masked element by element (MASKED, a launch of its own).
        found = tl.load(found_ptr) if HAS_FOUND else 0.0
        keep = (tl.full([BLOCK], 0.0, tl.float32) + found) == 0.0
        if MASKED:
            keep = keep & (idx < tl.load(numels + t))
        # offsets: [5, count] elements from each kind's base: gradient, weight, master, moments;
        # multiples of ALIGN (`offsets` makes sure), which lets the loads be vectorised.
        g_at = grad_base + tl.multiple_of(tl.load(offsets + t), ALIGN) + idx
        w_at = weight_base + tl.multiple_of(tl.load(offsets + count + t), ALIGN) + idx
        p_at = master_base + tl.multiple_of(tl.load(offsets + 2 * count + t), ALIGN) + idx
        m_at = avg_base + tl.multiple_of(tl.load(offsets + 3 * count + t), ALIGN) + idx
        v_at = sq_base + tl.multiple_of(tl.load(offsets + 4 * count + t), ALIGN) + idx
        g = tl.load(g_at, mask=keep, other=0.0).to(tl.float32)
        if HAS_COEF:
            g = g * tl.load(coef_ptr)
        p = tl.load(p_at, mask=keep, other=0.0)
        m = tl.load(m_at, mask=keep, other=0.0)
        v = tl.load(v_at, mask=keep, other=0.0)
        step = tl.load(steps + t)
        # torch's fused AdamW, in its order: decay, moments, bias-corrected step.
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        bias1 = 1.0 - tl.exp2(step * log2_beta1)
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(p_at, p, mask=keep)
        tl.store(m_at, m, mask=keep)
        tl.store(v_at, v, mask=keep)
        tl.store(w_at, p.to(w_at.dtype.element_ty), mask=keep)

    return adamw_blocks


@dataclass(frozen=True)
class _Blocks:
    """The launch grid for tensors of some sizes: each block's (tensor index, first element), the
    whole blocks apart from the partial last ones, and the sizes themselves; on the device, made
    once per set of sizes (they do not change between steps)."""

    whole: tuple[torch.Tensor, torch.Tensor]
    partial: tuple[torch.Tensor, torch.Tensor]
    sizes: torch.Tensor


@functools.cache
def _blocks(numels: tuple[int, ...], block: int, device: torch.device) -> _Blocks:
    whole: tuple[list[int], list[int]] = ([], [])
    partial: tuple[list[int], list[int]] = ([], [])
    for i, n in enumerate(numels):
        starts = range(0, n - n % block, block)
        whole[0].extend([i] * len(starts))
        whole[1].extend(starts)
        if n % block:
            partial[0].append(i)
            partial[1].append(n - n % block)

    def on_device(tensor: list[int], first: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(tensor, dtype=torch.int32, device=device),
                torch.tensor(first, dtype=torch.int64, device=device))

    return _Blocks(on_device(*whole), on_device(*partial), torch.tensor(numels, dtype=torch.int64, device=device))


@functools.lru_cache(maxsize=16)
def _table(offsets: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The offset table on the device, made once for a layout the tensors keep from step to step
    (a new tensor and a copy from pageable host memory every step otherwise). A few layouts are
    kept: gradients may be allocated elsewhere after a step without some of them."""
    return torch.tensor(offsets, dtype=torch.int64, device=device)


def offsets(tensors: list[torch.Tensor]) -> list[int] | None:
    """Each tensor's start in elements from the first's (None: one of them is not contiguous, of
    another dtype or not a multiple of ALIGN elements away)."""
    size = tensors[0].element_size()
    base = tensors[0].data_ptr()
    out = []
    for t in tensors:
        gap = t.data_ptr() - base
        if gap % (size * ALIGN) or not t.is_contiguous() or t.dtype != tensors[0].dtype:
            return None
        out.append(gap // size)
    return out


@dataclass
class Plan:
    """One group's tensors for `adamw_step`, and where each starts."""

    kinds: tuple[list[torch.Tensor], ...]  # gradients, weights, masters, first and second moments
    offsets: list[list[int]]


def plan(grads: list[torch.Tensor], weights: list[torch.Tensor], masters: list[torch.Tensor],
         avgs: list[torch.Tensor], squares: list[torch.Tensor]) -> Plan | None:
    """The step's tensors (lists of the same length and sizes; gradients of 16 or 32 bits, fp32
    masters and moments, 16-bit weights) as the kernel takes them; None where one cannot be
    reached (see `offsets`): the caller then takes torch's path."""
    kinds = ([g if g.is_contiguous() else g.contiguous() for g in grads], weights, masters, avgs, squares)
    table = [offsets(k) for k in kinds]
    return None if any(t is None for t in table) else Plan(kinds, table)


def adamw_step(plan: Plan, steps: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step over a plan's tensors: gradients scaled by `coef` when given, masters and
    moments updated in place, the weights written from the masters. `steps` (fp32, one a tensor,
    on the device) holds each tensor's step count, already advanced. Nothing changes where
    `found_inf` is non-zero."""
    grads, weights, masters, avgs, squares = plan.kinds
    device = masters[0].device
    table = _table(tuple(map(tuple, plan.offsets)), device)
    blocks = _blocks(tuple(m.numel() for m in masters), BLOCK, device)
    beta1, beta2 = betas
    with on(device):
        for masked, (block_tensor, block_start) in ((False, blocks.whole), (True, blocks.partial)):
            if block_tensor.numel():
                _kernel()[(block_tensor.numel(),)](
                    block_tensor, block_start, blocks.sizes, table, grads[0], weights[0], masters[0], avgs[0],
                    squares[0], steps, coef if coef is not None else steps,
                    found_inf if found_inf is not None else steps, float(lr), beta1, beta2, math.log2(beta1),
                    math.log2(beta2), eps, weight_decay, len(masters),
                    HAS_COEF=coef is not None, HAS_FOUND=found_inf is not None, MASKED=masked, ALIGN=ALIGN,
                    BLOCK=BLOCK, num_warps=NUM_WARPS)


def usable(masters: list[torch.Tensor], weights: list[torch.Tensor]) -> bool:
    """Whether `adamw_step` can take these masters and weights: plain CUDA tensors on one device,
    fp32 masters, 16-bit weights of one dtype, Triton there."""
    from torch.distributed.tensor import DTensor

    if not masters or not available():
        return False
    device = masters[0].device
    return (device.type == "cuda" and all(not isinstance(m, DTensor) and m.device == device
                                          and m.dtype == torch.float32 for m in masters)
            and all(w.device == device and w.dtype == weights[0].dtype and w.dtype in (torch.bfloat16, torch.float16)
                    for w in weights))
