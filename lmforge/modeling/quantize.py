"""4-bit storage of the frozen token embedding and output head under QLoRA.

transformers' bitsandbytes path quantises the linear layers of the blocks and leaves the
embedding and the head in bf16. With today's vocabularies that is a large share of the model
(Llama-3.2-1B: 128,256 x 2,048 = 263M of 1.24B parameters; Qwen2.5-0.5B: 136M of 494M), so a
"4-bit" base still held close to half its bf16 size on the GPU (docs/gpu_runs.md). Under QLoRA both are frozen, so
lmforge stores them in NF4 as well: one `Params4bit` shared by the head (a bitsandbytes
`Linear4bit`) and the embedding (which dequantises only the rows it looks up) when the model
ties them, as small models do. bitsandbytes' own `Embedding4bit` cannot share a weight with the
head and raises on `state_dict()`, which PEFT calls to save an adapter; hence this module.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TiedEmbedding4bit(nn.Module):
    """A frozen embedding read from a 4-bit NF4 weight of shape (vocab, dim).

    Blockwise NF4 quantises consecutive runs of `blocksize` values with one absmax each; when
    `dim` is a multiple of the block size every row owns whole blocks, so a lookup gathers the
    packed bytes and absmax of the wanted rows and dequantises only those."""

    def __init__(self, weight, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = weight  # the same Parameter object as the head's when tied
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        state = self.weight.quant_state
        packed = self.weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
        rows = nn.functional.embedding(input_ids, packed).reshape(-1, 1)
        blocks = self.embedding_dim // state.blocksize
        absmax = nn.functional.embedding(input_ids, state.absmax.view(self.num_embeddings, blocks)).reshape(-1)
        row_state = copy.copy(state)
        row_state.absmax = absmax
        row_state.shape = torch.Size((*input_ids.shape, self.embedding_dim))
        return F.dequantize_4bit(rows, row_state).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Saved as a Linear4bit saves its weight: packed bytes plus the quantisation state.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, nf4"


def _quantized(weight: torch.Tensor, quant_storage: torch.dtype):
    import bitsandbytes as bnb

    # No double quantisation: the row lookup needs plain float absmax values (4.5 bits per
    # value instead of 4.13 — still a quarter of bf16).
    param = bnb.nn.Params4bit(weight.detach().to(torch.bfloat16), requires_grad=False, compress_statistics=False,
                              quant_type="nf4", quant_storage=quant_storage)
    return param.to(weight.device)  # quantises on the move


def embeddings_quantizable(model, blocksize: int = 64) -> str | None:
    """Why the embedding cannot be stored in 4-bit, or None when it can."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return f"the input embedding is a {type(emb).__name__}, not an nn.Embedding"
    if emb.embedding_dim % blocksize:
        return f"the embedding width {emb.embedding_dim} is not a multiple of the 4-bit block size {blocksize}"
    if emb.weight.device.type != "cuda":
        return "the model is not on a CUDA GPU"
    return None


def quantize_embeddings(model, quant_storage: torch.dtype = torch.uint8) -> list[str]:
    """Replace the frozen input embedding and output head by NF4 storage (shared when tied);
    returns the names of the modules replaced."""
    import bitsandbytes as bnb

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    emb_weight = _quantized(emb.weight, quant_storage)
    done = []
    if head is not None and isinstance(head, nn.Linear) and head.bias is None:
        head_weight = emb_weight if tied else _quantized(head.weight, quant_storage)
        new_head = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=False, compute_dtype=torch.bfloat16,
                                     quant_type="nf4", quant_storage=quant_storage, device="meta")
        new_head.weight = head_weight
        new_head.quant_state = head_weight.quant_state
        model.set_output_embeddings(new_head)
        done.append("output head")
    model.set_input_embeddings(TiedEmbedding4bit(emb_weight, emb.num_embeddings, emb.embedding_dim,
                                                 emb.weight.dtype))
    done.append("input embedding" + (" (tied with the head: one 4-bit copy)" if tied and len(done) else ""))
    # The config keeps tie_word_embeddings: re-tying assigns the one shared parameter again, and
    # the saved base config must describe the unquantised model that `lmforge merge` rebuilds.
    return done
