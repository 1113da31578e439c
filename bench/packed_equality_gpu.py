"""Packed vs unpacked loss and gradients on the GPU in bf16, for each attention path:
    python bench/packed_equality_gpu.py
A small Llama shape on CUDA; the same records trained unpacked (padded, one per row) and packed
(best-fit rows, per-document attention); prints the relative loss difference and the cosine
similarity of the two gradients for sdpa (boolean document mask) and flex_attention (BlockMask)."""

import os
import random
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.data.collate import PackedCollator, PaddedCollator  # noqa: E402
from lmforge.data.pack import best_fit_decreasing, pack_records  # noqa: E402
from lmforge.modeling.attention import document_attention_mask  # noqa: E402


def records(n, vocab, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(20, 400)
        ids = [rng.randrange(vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


def loss_and_grad(model, batch):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def main():
    config = transformers.AutoConfig.for_model("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                               num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                               max_position_embeddings=2048)
    recs = records(24, config.vocab_size)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda()
    unpacked = {k: v.cuda() for k, v in PaddedCollator(0)(recs).items()}
    lu, gu = loss_and_grad(reference, unpacked)
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], 1024, seed=0)
    for attn in ("sdpa", "flex_attention"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).cuda()
        model.load_state_dict(reference.state_dict())
        packed = PackedCollator(0)([pack_records([recs[i] for i in b]) for b in bins])
        packed = {k: v.cuda() for k, v in packed.items()}
        mask = document_attention_mask(packed.pop("document_ids"), attn, torch.float32)
        if mask is not None:
            packed["attention_mask"] = mask
        lp, gp = loss_and_grad(model, packed)
        cos = torch.nn.functional.cosine_similarity(gu, gp, dim=0).item()
        print(f"packed vs unpacked, bf16, {attn:<15} loss {lu:.5f} vs {lp:.5f}: rel diff {abs(lp - lu) / abs(lu):.2e}, "
              f"gradient cosine {cos:.6f}")


if __name__ == "__main__":
    main()
