"""Attention confined to each packed record.

transformers does not keep packed records apart from restarting position_ids alone (with
sdpa, eager and flex_attention a second record's logits differ from the same record run
alone), so a packed batch brings its own mask, built here from the collator's document_ids:

- flash_attention_2 / kernels-based flash: nothing to build; transformers turns restarting
  position_ids into variable-length sequences.
- flex_attention: a FlexAttention BlockMask (block-sparse: blocks outside the diagonal
  documents are skipped, not computed and masked).
- sdpa / eager: an additive 4-D mask (0 where allowed, the dtype's minimum elsewhere),
  which transformers passes to the kernel as given.
- varlen (lmforge's own, `--attn_implementation varlen`): PyTorch's built-in flash kernel for
  variable-length sequences (`torch.nn.attention.varlen`), given the start of every document
  in the flattened batch. flash-attn has no wheel for these machines; PyTorch ships the same
  kind of kernel, and transformers has no attention function that calls it, so lmforge
  registers one (`varlen_attention`). CUDA only; no mask is built at all: the model gets
  `NO_MASK`, a zero-size 4-D placeholder that transformers passes through as prepared.
  On Hopper and Blackwell GPUs the kernel underneath is flash-attn-4's where it is installed
  (`lmforge.kernels.flash4`, faster there), chosen by `choose_kernel`.
  Without it, transformers looks for packing in the restarting position_ids at every forward,
  which reads a GPU flag on the host (the host stops queueing work until the GPU catches up)
  and builds a [B, 1, T, T] mask that varlen never reads.
Padding positions (document id -1) attend to themselves only, so no softmax row is empty
(under varlen a run of padding is a sequence of its own).
"""

from __future__ import annotations

import torch

import inspect
from typing import Callable

from lmforge.data.collate import CU_SEQLENS

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")
VARLEN = "lmforge_varlen"  # the name registered with transformers; users say `varlen`


def allowed(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: query q may attend to key k (causal, same document; pads to self)."""
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    real = (document_ids >= 0)[:, :, None]
    diagonal = torch.eye(t, dtype=torch.bool, device=document_ids.device)
    return (causal & same & real) | diagonal


def additive_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask for sdpa / eager."""
    ok = allowed(document_ids)
    mask = torch.zeros(ok.shape, dtype=dtype, device=document_ids.device)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[:, None]


def block_mask(document_ids: torch.Tensor):
    """FlexAttention BlockMask for the same rule, built on the ids' device."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids

    def mask_mod(b, h, q, k):
        return (q >= k) & (docs[b, q] == docs[b, k]) & (docs[b, q] >= 0) | (q == k)

    batch, length = docs.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=docs.device)


def no_mask(device: torch.device) -> torch.Tensor:
    """What a varlen model gets as its attention_mask: zero-size and 4-D, which transformers'
    mask functions return as already prepared, doing no work (see the module's docstring)."""
    return torch.empty((0, 0, 0, 0), dtype=torch.bool, device=device)


def is_no_mask(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.numel() == 0


def document_attention_mask(document_ids: torch.Tensor, implementation: str, dtype: torch.dtype):
    """The attention_mask to pass to a model of this attention implementation (None: the
    implementation separates records from position_ids itself; for lmforge's varlen, the
    `no_mask` placeholder: the offsets come as CU_SEQLENS). sdpa takes a boolean mask
    (True = attend), which also holds under bf16 autocast; eager adds a float mask."""
    if implementation == VARLEN:
        return no_mask(document_ids.device)
    if implementation in VARLEN_IMPLEMENTATIONS or "flash" in implementation:
        return None
    if implementation == "flex_attention":
        return block_mask(document_ids)
    if implementation == "sdpa":
        return allowed(document_ids)[:, None]
    return additive_mask(document_ids, dtype)


class _Kernel:
    """PyTorch's varlen flash function and what this version of it takes, looked up once at
    registration (not in the attention call, which torch.compile traces)."""
    fn: Callable | None = None
    windowed = False  # takes window_size=(-1, 0) for causal (newer) rather than is_causal=True
    gqa = False  # takes enable_gqa (fewer key / value heads than query heads)
    native_gqa = False  # takes fewer key / value heads without being told
    native_gqa_torch = False  # whether torch's does (found once by `probe_native_gqa`)
    probed = False
    scale = False  # takes a softmax scale
    dtypes = (torch.float16, torch.bfloat16)  # the inputs it takes


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """A transformers attention function: q [B, Hq, T, D], k / v [B, Hkv, T, D] → ([B, T, Hq, D], None).

    Packed batches (the Trainer adds CU_SEQLENS) run the varlen kernel over the flattened batch;
    anything else (an unpadded eval batch, generation) goes to SDPA with transformers' own mask."""
    cu = kwargs.get(CU_SEQLENS)
    if cu is None and is_no_mask(attention_mask):
        raise ValueError("varlen attention: the batch has no document offsets (lmforge's Trainer adds them to "
                         "packed batches) and no attention mask")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if dropout:
        raise ValueError("varlen attention: attention dropout is not supported")
    batch, heads, length, dim = query.shape
    dtype = query.dtype
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)  # the flash kernel is not autocast-aware
    if dtype not in _Kernel.dtypes:
        # The flash kernel takes 16-bit inputs only: fp32 training gets SDPA, the documents
        # kept apart by a mask built from the same offsets.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = offsets_mask(cu, batch, length)
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim).to(dtype) for x in (query, key, value))
    extra = {"window_size": (-1, 0)} if _Kernel.windowed else {"is_causal": True}
    if _Kernel.scale:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - dim ** -0.5) > 1e-9:
        raise ValueError("varlen attention: this PyTorch's kernel takes no softmax scale and the model needs one")
    window = kwargs.get("sliding_window")
    if window is not None and window < length:
        if not _Kernel.windowed:
            raise ValueError(f"varlen attention: the model attends over a sliding window of {window} tokens and "
                             f"this PyTorch's kernel takes no window; use --attn_implementation flex_attention")
        extra["window_size"] = (window - 1, 0)  # as transformers' mask: the last `window` keys, itself included
    if k.shape[1] != heads:
        if _Kernel.gqa:
            extra["enable_gqa"] = True
        elif not _Kernel.native_gqa:  # one key / value head per query head
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    # max_q = max_k = the row length: an upper bound is all the kernel needs, and a constant one
    # keeps compiled blocks from recompiling for every batch's longest document.
    out = _Kernel.fn(q, k, v, cu, cu, length, length, **extra)
    return out.reshape(batch, length, heads, dim), None


def offsets_mask(cu: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[B, 1, T, T] bool (True = attend): causal within each sequence `cu` delimits."""
    positions = torch.arange(batch * length, device=cu.device, dtype=cu.dtype)
    sequence = torch.searchsorted(cu[1:], positions, right=True).view(batch, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu.device).tril()
    return (causal & (sequence[:, :, None] == sequence[:, None, :]))[:, None]


KERNELS = ("flash-attn-4", "torch")


def choose_kernel(requested: str, capability: tuple[int, int] | None, fa4_installed: bool,
                  head_dim: int | None = None) -> tuple[str, str]:
    """(the kernel under varlen attention, why). `requested`: --varlen_kernel (auto, flash-attn-4,
    torch); `capability`: the GPU's compute capability (None: no CUDA GPU); `head_dim`: the
    model's attention head size (None: unknown)."""
    from lmforge.errors import LmforgeError
    from lmforge.kernels import flash4

    if requested == "torch":
        return "torch", "--varlen_kernel torch"
    why_not = flash4.unavailable(capability, fa4_installed, head_dim)
    if requested == "flash-attn-4":
        if why_not:
            raise LmforgeError(f"--varlen_kernel flash-attn-4 cannot run here: {why_not}")
        return "flash-attn-4", "--varlen_kernel flash-attn-4"
    if requested != "auto":
        raise LmforgeError(f"--varlen_kernel {requested!r}: choose auto, {' or '.join(KERNELS)}")
    if why_not is None:
        major, minor = capability
        return "flash-attn-4", (f"SM{major}{minor} GPU and flash-attn-4 installed: its Hopper / Blackwell path "
                                f"(--varlen_kernel torch: PyTorch's)")
    return "torch", f"PyTorch's ({why_not})"


def register_varlen(kernel: str = "torch") -> None:
    """Make `attn_implementation=VARLEN` known to transformers, running `kernel` (one of KERNELS)
    on packed batches (its mask function: SDPA's, for the batches that come without CU_SEQLENS)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if kernel == "flash-attn-4":
        from lmforge.kernels import flash4

        # Same call form as torch's; windows, a softmax scale and grouped-query heads are native.
        _Kernel.fn = flash4.varlen_attn
        _Kernel.windowed, _Kernel.gqa, _Kernel.scale, _Kernel.native_gqa = True, False, True, True
    else:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _Kernel.fn = varlen_attn
        _Kernel.windowed, _Kernel.gqa, _Kernel.scale = ("window_size" in params, "enable_gqa" in params,
                                                        "scale" in params)
        if not _Kernel.gqa and not _Kernel.probed and torch.cuda.is_available():
            _Kernel.native_gqa_torch, _Kernel.probed = probe_native_gqa(), True
        _Kernel.native_gqa = _Kernel.native_gqa_torch
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def probe_native_gqa() -> bool:
    """Whether this PyTorch's varlen function, though it has no `enable_gqa`, gives grouped-query
    attention when handed fewer key / value heads (the flash kernel underneath takes them; some
    versions check the head counts first and raise). Tried once, on a few tokens: output and
    gradients must equal those with the heads repeated. Worth it: repeating the heads costs a
    copy of K and V per layer in memory and time (7x for Qwen2.5-0.5B's 14 / 2 heads)."""
    extra = {"window_size": (-1, 0)} if _Kernel.windowed else {"is_causal": True}
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(24, h, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 9, 24], device="cuda", dtype=torch.int32)
    results = []
    for repeat in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        qq, kk, vv = leaves
        if repeat:
            kk, vv = (x.repeat_interleave(2, dim=1) for x in (kk, vv))
        try:
            out = _Kernel.fn(qq, kk, vv, cu, cu, 15, 15, **extra)
            out.float().square().sum().backward()
        except Exception:  # noqa: BLE001 - any refusal means: repeat the heads
            return False
        results.append([out.detach().float()] + [x.grad.float() for x in leaves])
    return all(torch.allclose(a, b, rtol=2e-2, atol=2e-2) for a, b in zip(*results))
