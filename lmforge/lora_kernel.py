"""LoRA's input dropout folded into its down-projection: one Triton kernel forward, one backward
(CUDA only; everywhere else the layer runs PEFT's dropout and matmul, draw for draw).

PEFT computes `lora_B(lora_A(dropout(x)))`. The dropout writes a new copy of the layer's input
for every adapted layer (q, k and v each draw their own), and the backward needs that copy or
its mask, kept or recomputed. On the Llama-3.2-1B shape (LoRA r16 on every linear layer,
8 x 2048 tokens a step, one H200, 2026-12-03, bench/cli_throughput.py --profile) a dropout of
0.05 cost 19 ms a step of fused elementwise kernels (8.6 % of the speed) and 5 GiB.

Here the mask is never stored. Each call draws one seed; an element's keep/drop decision is
Philox (Triton's `tl.rand`) of that seed and the element's index, made while x is loaded for
x @ A^T, and made again in the backward, where the gradients of x and of A come from the same
tile of x. Each element is kept with probability 1 - p and scaled by 1 / (1 - p), as by torch's
dropout; the draws are not torch's.
"""

from __future__ import annotations

import functools

import torch

from lmforge.triton_launch import available, on

# Rows a program takes in the forward; columns of x a program takes in the backward, and rows
# it walks (its share of A's gradient is summed over them, then the shares by torch).
FORWARD_ROWS = 64
BLOCK_COLS = 128
BLOCK_ROWS = 64
BACKWARD_ROWS = 512
# Ranks above this go to PEFT's path: the kernel holds a tile of rows x rank in registers.
MAX_RANK = 64


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_a_forward(x_ptr, a_ptr, out_ptr, seed_ptr, n, d, r, p, scale,
                       RANK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ranks = tl.arange(0, RANK)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((ROWS, RANK), dtype=tl.float32)
        for start in range(0, d, COLS):
            cols = start + tl.arange(0, COLS)
            index = rows[:, None] * d + cols[None, :]
            x = tl.load(x_ptr + index, mask=(rows[:, None] < n) & (cols[None, :] < d), other=0.0)
            x = tl.where(tl.rand(seed, index) >= p, x, tl.zeros_like(x))
            a = tl.load(a_ptr + ranks[None, :] * d + cols[:, None], mask=(ranks[None, :] < r) & (cols[:, None] < d),
                        other=0.0)
            acc = tl.dot(x, a, acc)
        tl.store(out_ptr + rows[:, None] * r + ranks[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n) & (ranks[None, :] < r))

    @triton.jit
    def lora_a_backward(x_ptr, a_ptr, g_ptr, seed_ptr, gx_ptr, ga_ptr, n, d, r, p, scale,
                        RANK: tl.constexpr, SHARE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        share = tl.program_id(0)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        ranks = tl.arange(0, RANK)
        seed = tl.load(seed_ptr)
        a = tl.load(a_ptr + ranks[:, None] * d + cols[None, :], mask=(ranks[:, None] < r) & (cols[None, :] < d),
                    other=0.0)
        ga = tl.zeros((RANK, COLS), dtype=tl.float32)
        for start in range(share * SHARE, share * SHARE + SHARE, ROWS):
            rows = start + tl.arange(0, ROWS)
            index = rows[:, None] * d + cols[None, :]
            inside = (rows[:, None] < n) & (cols[None, :] < d)
            # The keep/drop decision as a factor (1 / (1 - p) or 0), not a boolean tile: its two uses
            # take it in two register layouts, and Triton cannot stage booleans through shared
            # memory between them.
            factor = tl.where(tl.rand(seed, index) >= p, scale, 0.0)
            g = tl.load(g_ptr + rows[:, None] * r + ranks[None, :], mask=(rows[:, None] < n) & (ranks[None, :] < r),
                        other=0.0)
            gx = tl.dot(g, a) * factor
            tl.store(gx_ptr + index, gx.to(gx_ptr.dtype.element_ty), mask=inside)
            x = tl.load(x_ptr + index, mask=inside, other=0.0)
            x = (x * factor).to(x_ptr.dtype.element_ty)
            ga = tl.dot(tl.trans(g), x, ga)
        tl.store(ga_ptr + share * r * d + ranks[:, None] * d + cols[None, :], ga,
                 mask=(ranks[:, None] < r) & (cols[None, :] < d))

    return lora_a_forward, lora_a_backward


def _rank_block(r: int) -> int:
    """The rank padded for tl.dot: a power of two, 16 at least."""
    return max(16, 1 << (r - 1).bit_length())


@torch.library.custom_op("lmforge::dropout_lora_a", mutates_args=())
def dropout_lora_a(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ weight.T with the mask drawn from `seed` (an int64 tensor of one element)."""
    d, r = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, d).contiguous()
    out = torch.empty(rows.shape[0], r, dtype=x.dtype, device=x.device)
    with on(x.device):
        _kernels()[0][(_cdiv(rows.shape[0], FORWARD_ROWS),)](
            rows, weight.contiguous(), out, seed, rows.shape[0], d, r, p, 1.0 / (1.0 - p),
            RANK=_rank_block(r), ROWS=FORWARD_ROWS, COLS=BLOCK_COLS)
    return out.view(*x.shape[:-1], r)


@dropout_lora_a.register_fake
def _(x, weight, seed, p):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lmforge::dropout_lora_a_backward", mutates_args=())
def dropout_lora_a_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `dropout_lora_a` for x and the weight, the mask drawn again from `seed`."""
    d, r = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, d).contiguous()
    n = rows.shape[0]
    grad_x = torch.empty_like(rows)
    shares = torch.empty(_cdiv(n, BACKWARD_ROWS), r, d, dtype=torch.float32, device=x.device)
    with on(x.device):
        _kernels()[1][(shares.shape[0], _cdiv(d, BLOCK_COLS))](
            rows, weight.contiguous(), grad.reshape(-1, r).contiguous(), seed, grad_x, shares, n, d, r, p,
            1.0 / (1.0 - p), RANK=_rank_block(r), SHARE=BACKWARD_ROWS, ROWS=BLOCK_ROWS, COLS=BLOCK_COLS)
    # The shares are summed by torch, not by atomic adds in the kernel: the same sum every run.
    return grad_x.view(x.shape), shares.sum(0).to(weight.dtype)


@dropout_lora_a_backward.register_fake
def _(grad, x, weight, seed, p):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _save(ctx, inputs, output) -> None:
    x, weight, seed, p = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.p = p


def _backward(ctx, grad):
    x, weight, seed = ctx.saved_tensors
    grad_x, grad_weight = dropout_lora_a_backward(grad, x, weight, seed, ctx.p)
    return grad_x, grad_weight, None, None


dropout_lora_a.register_autograd(_backward, setup_context=_save)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels can compute lora_A(dropout(x)): CUDA and Triton, a 16-bit weight (x of
    its dtype, or cast to it by autocast), a rank of at most MAX_RANK, element indices that fit
    in 32 bits, and a plain weight (not a shard of FSDP2's)."""
    from torch.distributed.tensor import DTensor

    dtype = weight.dtype
    return (available() and x.is_cuda and dtype in (torch.bfloat16, torch.float16) and weight.shape[0] <= MAX_RANK
            and x.numel() < 2**31 and not isinstance(weight, DTensor)
            and (x.dtype == dtype or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == dtype)))


def fold_lora_dropout(model) -> int:
    """Swap each plain LoRA layer's `lora_dropout` + `lora_A` pair (PEFT's nn.Dropout and
    nn.Linear) for an identity and a DropoutLoraA; returns how many were swapped. DoRA and other
    PEFT variants, biased or non-linear lora_A keep PEFT's modules."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            a = module.lora_A[name] if name in module.lora_A else None
            if (type(dropout) is torch.nn.Dropout and dropout.p > 0 and type(a) is torch.nn.Linear and a.bias is None
                    and name not in getattr(module, "lora_variant", {}) and not module.use_dora.get(name, False)):
                module.lora_A[name] = DropoutLoraA(a, dropout.p)
                module.lora_dropout[name] = torch.nn.Identity()
                count += 1
    return count


class DropoutLoraA(torch.nn.Linear):
    """PEFT's `lora_A` of one adapter with that adapter's input dropout inside it (PEFT's own
    dropout module becomes an identity). Its weight is the same parameter, under the same name,
    so adapters save, load and merge as PEFT's. On a CUDA GPU, in training, with 16-bit x and
    weight, the kernels above run; anywhere else `F.linear(F.dropout(x))`, as PEFT does."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return torch.nn.functional.linear(x, self.weight)
        if not kernel_takes(x, self.weight):
            return torch.nn.functional.linear(torch.nn.functional.dropout(x, self.p, True), self.weight)
        if x.dtype != self.weight.dtype:  # under autocast: the cast autocast makes for the matmul
            x = x.to(self.weight.dtype)
        seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
        return dropout_lora_a(x, self.weight, seed, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"
