"""Batches: records padded on the right to the longest in the batch (not to model_max_length,
which is what makes the seed scripts slow), labels padded with -100, an attention mask.
Rows without labels (pretraining blocks) are trained on every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.data.render import IGNORE_INDEX


def padded_length(longest: int, multiple: int) -> int:
    """`longest` rounded up to a multiple of `multiple`."""
    return (longest + multiple - 1) // multiple * multiple


@dataclass
class PaddedCollator:
    pad_token_id: int
    pad_to_multiple_of: int = 1
    """Round the batch length up to a multiple of this (8 helps tensor cores on GPU)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = padded_length(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackedCollator:
    """Packed rows (see `packing.py`) padded to the longest row; padding gets document id -1,
    label -100 and positions of its own. No attention_mask: the trainer builds the
    per-document mask from document_ids for the model's attention implementation."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = padded_length(max(len(r["input_ids"]) for r in rows), self.pad_to_multiple_of)
        batch = len(rows)
        out = {
            "input_ids": torch.full((batch, length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((batch, length), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.arange(length, dtype=torch.long).repeat(batch, 1),
            "document_ids": torch.full((batch, length), -1, dtype=torch.long),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            for key in ("input_ids", "labels", "position_ids", "document_ids"):
                out[key][i, :n] = torch.as_tensor(r[key], dtype=torch.long)
            out["position_ids"][i, n:] = torch.arange(length - n)
        return out


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PairCollator:
    """Preference pairs as one batch of 2B padded rows: the B chosen sides, then the B rejected
    sides, so both are scored in one forward pass. Reference log-probabilities, when the rows
    carry them (`--precompute_ref_log_probs`), come as `ref_logps` in the same row order."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                for side in ("chosen", "rejected") for p in pairs]
        batch = PaddedCollator(self.pad_token_id, self.pad_to_multiple_of)(rows)
        if all(c in pairs[0] for c in REFERENCE_COLUMNS):
            batch["ref_logps"] = torch.tensor([p[c] for c in REFERENCE_COLUMNS for p in pairs], dtype=torch.float64)
        return batch
