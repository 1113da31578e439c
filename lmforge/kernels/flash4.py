"""flash-attn-4's variable-length attention, as a PyTorch custom op lmforge's varlen attention calls.

flash-attn-4 (the `flash_attn.cute` package of the `flash-attn-4` wheel, written in NVIDIA's CuTe
DSL) has a Hopper (SM90) and a Blackwell (SM100) path that torch's own varlen flash kernel lacks:
on one H100 its causal varlen forward + backward ran 1.13x (0.5B shape, 14 / 2 heads) to 1.88x
(1B and 7B shapes) torch's (docs/bench_results.md). It takes grouped-query heads natively.

Why a custom op and not the package's own autograd function: lmforge compiles each decoder block
into one graph, and the compiler would trace into the DSL's Python (its JIT cache, DLPack
conversions, host-side scheduling) and break the graph. As a `torch.library.custom_op` the compiler
sees an opaque call with a known output shape (the fake implementations below): one graph, no
recompiles per batch. The backward is a second op, so compiled graphs and activation recomputation
treat it the same way.

Nothing here imports flash-attn-4 until an op runs; `unavailable()` says why it cannot run here.
The ops take any device (lmforge routes only CUDA tensors of SM90 / SM100 GPUs to them), so that a
CPU test can run this module's plumbing with a stand-in for the package (tests/test_varlen.py).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

PACKAGE = "flash-attn-4"
# The GPU generations flash-attn-4 has a training (forward and backward) path for: Hopper
# (H100 / H200, SM90) and datacenter Blackwell (B200, SM100). Ampere and consumer parts keep
# torch's kernel, which is tuned for them.
ARCHITECTURES = (9, 10)


def installed() -> bool:
    """Whether flash-attn-4 is importable (its module is `flash_attn.cute`; flash-attn 2 is
    `flash_attn` without it)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # no flash_attn package at all
        return False


def unavailable(capability: tuple[int, int] | None, is_installed: bool, head_dim: int | None = None) -> str | None:
    """Why flash-attn-4 cannot serve this machine and model (None: it can). `capability`: the
    GPU's compute capability, None without a CUDA GPU; `head_dim`: the model's (None: unknown)."""
    if capability is None:
        return "no CUDA GPU"
    if not is_installed:
        return f"{PACKAGE} is not installed (pip install 'lmforge[hopper]')"
    if capability[0] not in ARCHITECTURES:
        return (f"this GPU is SM{capability[0]}{capability[1]}; {PACKAGE} trains on SM90 (Hopper) and SM100 "
                f"(Blackwell) only")
    if head_dim is not None and not head_dim_supported(head_dim, capability[0]):
        return f"its SM{capability[0]}0 kernels take no head size {head_dim}"
    return None


def head_dim_supported(head_dim: int, major: int) -> bool:
    """flash-attn-4's head sizes (16-bit inputs: multiples of 8): 8 to 256 on Hopper; 8 to 128, or
    256, on Blackwell."""
    if head_dim % 8:
        return False
    return 8 <= head_dim <= 256 if major == 9 else (8 <= head_dim <= 128 or head_dim == 256)


def _interface():
    from flash_attn.cute import interface

    return interface


def _window(left: int) -> tuple[int | None, int | None]:
    """flash-attn-4's (left, right) for a causal window of `left` earlier keys (-1: all of them);
    it reads None as unlimited, and -1 as a window of -1."""
    return (None, None) if left < 0 else (left, 0)


@torch.library.custom_op("lmforge::flash4_varlen_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float,
             window_left: int) -> tuple[Tensor, Tensor]:
    """(output [T, Hq, D], log-sum-exp [Hq, T] fp32) of causal attention within each sequence `cu` delimits."""
    left, right = _window(window_left)
    out, lse, *_ = _interface()._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
        softmax_scale=scale, causal=True, window_size_left=left, window_size_right=right, return_lse=True)
    return out, lse


@_forward.register_fake
def _(q, k, v, cu, max_len, scale, window_left):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lmforge::flash4_varlen_backward", mutates_args=())
def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor, max_len: int,
              scale: float, window_left: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv). Deterministic (no atomic accumulation order) when torch is asked to be."""
    left, right = _window(window_left)
    dq, dk, dv = _interface()._flash_attn_bwd(
        q, k, v, out, grad.contiguous(), lse, scale, True, window_size_left=left, window_size_right=right,
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
        deterministic=torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv


@_backward.register_fake
def _(grad, q, k, v, out, lse, cu, max_len, scale, window_left):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, cu, max_len, scale, window_left = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.max_len, ctx.scale, ctx.window_left = max_len, scale, window_left


def _grad(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, q, k, v, out, lse, cu, ctx.max_len, ctx.scale, ctx.window_left)
    return dq, dk, dv, None, None, None, None


_forward.register_autograd(_grad, setup_context=_setup)


def varlen_attn(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                window_size: tuple[int, int] = (-1, 0), scale: float | None = None) -> Tensor:
    """Causal attention within each packed sequence, in the call form of torch's
    `torch.nn.attention.varlen.varlen_attn` as lmforge's varlen attention uses it: q [T, Hq, D],
    k / v [T, Hkv, D] (Hkv dividing Hq: grouped-query heads are native), the sequences' starts
    `cu_q` (int32; self-attention, so `cu_k` is the same tensor and not read), the longest sequence bounded by `max_q` (= `max_k`)."""
    if window_size[1] != 0:
        raise ValueError(f"flash-attn-4 varlen: causal attention only (right window 0), got {window_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _forward(q, k, v, cu_q.to(torch.int32), int(max(max_q, max_k)), scale, int(window_size[0]))
    return out
