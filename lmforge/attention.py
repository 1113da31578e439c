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
Padding positions (document id -1) attend to themselves only, so no softmax row is empty.
"""

from __future__ import annotations

import torch

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


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


def document_attention_mask(document_ids: torch.Tensor, implementation: str, dtype: torch.dtype):
    """The attention_mask to pass to a model of this attention implementation (None: the
    implementation separates records from position_ids itself). sdpa takes a boolean mask
    (True = attend), which also holds under bf16 autocast; eager adds a float mask."""
    if implementation in VARLEN_IMPLEMENTATIONS or "flash" in implementation:
        return None
    if implementation == "flex_attention":
        return block_mask(document_ids)
    if implementation == "sdpa":
        return allowed(document_ids)[:, None]
    return additive_mask(document_ids, dtype)
