"""Packing: the packer keeps records whole and within bins; packed training computes the
unpacked loss and gradients; no token sees another record; accumulation 8x1 equals 2x4."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from lmforge.data.collate import PackedCollator, PaddedCollator
from lmforge.data.pack import best_fit_decreasing, pack_records
from lmforge.data.render import IGNORE_INDEX as X
from lmforge.modeling.attention import document_attention_mask

VOCAB = 97


def test_best_fit_decreasing_keeps_records_whole_and_bins_bounded():
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(1, 60), rng.randint(200, 512)]) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 512, seed=3)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))  # every record exactly once, none split
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # Close to the lower bound: the total over the capacity, and one bin per record longer
    # than half of it (no two of those can share).
    lower = max(sum(lengths) / 512, sum(n > 256 for n in lengths))
    assert len(bins) <= 1.05 * lower + 1
    assert best_fit_decreasing(lengths, 512, seed=3) == bins
    assert best_fit_decreasing(lengths, 512, seed=4) != bins
    with pytest.raises(ValueError, match="record 1 has 600 tokens"):
        best_fit_decreasing([10, 600], 512)


def test_pack_records_restarts_positions_and_masks_first_labels():
    row = pack_records([{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8, 9]}])
    assert row == {"input_ids": [5, 6, 7, 8, 9], "labels": [X, 6, 7, X, 9], "position_ids": [0, 1, 2, 0, 1],
                   "document_ids": [0, 0, 0, 1, 1]}


def tiny_model(attn: str):
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 30)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        start = rng.randint(1, length - 1)  # a prompt without loss, then an answer with loss
        out.append({"input_ids": ids, "labels": [X] * start + ids[start:]})
    return out


def packed_batch(recs: list[dict], capacity: int, attn: str) -> dict:
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], capacity, seed=0)
    batch = PackedCollator(pad_token_id=0)([pack_records([recs[i] for i in b]) for b in bins])
    mask = document_attention_mask(batch.pop("document_ids"), attn, torch.float32)
    if mask is not None:
        batch["attention_mask"] = mask
    return batch


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(attn):
    model = tiny_model(attn)
    recs = records(12)
    unpacked, grads_u = loss_and_grads(model, PaddedCollator(pad_token_id=0)(recs))
    packed, grads_p = loss_and_grads(model, packed_batch(recs, capacity=64, attn=attn))
    assert abs(packed - unpacked) <= 1e-5 * abs(unpacked)
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_records(attn):
    model = tiny_model(attn).eval()
    recs = records(3, seed=5)
    batch = packed_batch(recs, capacity=128, attn=attn)
    changed = [dict(r) for r in recs]
    changed[0] = {"input_ids": [(t + 1) % VOCAB for t in recs[0]["input_ids"]], "labels": recs[0]["labels"]}
    batch2 = packed_batch(changed, capacity=128, attn=attn)
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in batch2.items() if k != "labels"}).logits
    row = best_fit_decreasing([len(r["input_ids"]) for r in recs], 128, seed=0)[0]
    assert len(row) == 3  # all three in one row
    starts, pos = {}, 0
    for i in row:
        starts[i] = (pos, pos + len(recs[i]["input_ids"]))
        pos += len(recs[i]["input_ids"])
    lo, hi = starts[0]
    assert not torch.allclose(a[0, lo:hi], b[0, lo:hi])  # the perturbed record changed
    for i in (1, 2):
        lo, hi = starts[i]
        assert torch.allclose(a[0, lo:hi], b[0, lo:hi], atol=1e-6)  # the others did not
        alone = model(input_ids=torch.tensor([recs[i]["input_ids"]])).logits
        assert torch.allclose(a[0, lo:hi], alone[0], atol=1e-5)  # and equal the record run alone


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def one_step(tmp_path, batch_size: int, accumulation: int, fused_loss: bool = True) -> dict[str, torch.Tensor]:
    from lmforge.config import TrainingArguments
    from lmforge.training.step import Trainer

    model = tiny_model("sdpa")
    recs = records(40, seed=7)
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], 48, seed=0)[:8]
    rows = ListDataset([pack_records([recs[i] for i in b]) for b in bins])
    args = TrainingArguments(output_dir=str(tmp_path / f"{batch_size}x{accumulation}"), max_steps=1,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                             optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0,
                             report_to="none", disable_tqdm=True, save_strategy="no", remove_unused_columns=False,
                             train_sampling_strategy="sequential", dataloader_pin_memory=False,
                             fused_loss=fused_loss)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator(0)).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused_loss", [True, False])
def test_accumulation_8x1_equals_2x4(tmp_path, fused_loss):
    a = one_step(tmp_path, 8, 1, fused_loss)
    b = one_step(tmp_path, 2, 4, fused_loss)
    initial = {n: p for n, p in tiny_model("sdpa").named_parameters()}
    assert any(not torch.equal(a[n], initial[n]) for n in a)  # the step moved the weights
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6), n


def test_pretrain_blocks_split_at_eos():
    from lmforge.data.pack import split_block

    eos = 2
    row = split_block([7, 8, eos, 9, 10, eos, 11], eos)
    assert row == {"input_ids": [7, 8, eos, 9, 10, eos, 11], "labels": [7, 8, eos, X, 10, eos, X],
                   "position_ids": [0, 1, 2, 0, 1, 2, 0], "document_ids": [0, 0, 0, 1, 1, 1, 2]}
    # A document inside the block computes what it computes alone.
    model = tiny_model("sdpa").eval()
    batch = PackedCollator(0)([row])
    mask = document_attention_mask(batch.pop("document_ids"), "sdpa", torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        alone = model(input_ids=torch.tensor([[9, 10, eos]])).logits
    assert torch.allclose(logits[0, 3:6], alone[0], atol=1e-5)
