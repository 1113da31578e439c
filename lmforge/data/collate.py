"""Stage 7 of the data chain, collate: rows → the batch the model step takes, with everything
that step needs and that is cheap on the CPU but costly on the GPU.

- `PaddedCollator`: one record per row, padded on the right to the longest in the batch (not
  to model_max_length, which is what makes FastChat's and happy-llm's scripts slow), labels padded with -100,
  an attention mask. Rows without labels (pretraining blocks) train on every token.
- `PackedCollator`: packed rows (`pack.py`): positions and document ids, no attention mask
  (the trainer builds the per-document mask, or none for varlen attention).
- `PairCollator`: DPO pairs as 2B padded rows, the chosen sides then the rejected sides.

Every collator can add, for the step: the labelled positions (`label_positions`, for the fused
loss) and the documents' offsets (`varlen_offsets`, for varlen attention). Both have
data-dependent sizes: computed from a batch already on the GPU they would make the host wait
for the GPU to catch up (nonzero), leaving it idle while it should queue the next kernels.
Computed here they are made in the data loader's workers and travel to the GPU with the batch.
The Trainer turns them on for the model it trains (`for_the_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lmforge.data.pack import pack_records
from lmforge.data.render import IGNORE_INDEX

LABEL_POSITIONS = "lmforge_label_positions"  # a batch key the Trainer adds and removes itself
CU_SEQLENS = "lmforge_cu_seqlens"  # the model-input key carrying the documents' start offsets


def padded_length(longest: int, multiple: int) -> int:
    """`longest` rounded up to a multiple of `multiple`."""
    return (longest + multiple - 1) // multiple * multiple


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into batch x length) of the positions whose next-token label is not
    -100. Computed on the CPU, before the batch moves to the GPU, so that selecting them there
    is an index_select: a boolean mask on the GPU would stall the host until the GPU caught
    up (its result size is data-dependent), twice per micro-batch."""
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return (shifted.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def cu_seqlens(document_ids: torch.Tensor) -> torch.Tensor:
    """int32 [N + 1]: where each of the N sequences of the flattened [B * T] batch starts, then
    B * T. A sequence is a run of one document id within a row (a row start always starts one),
    so a run of padding is a sequence of its own. Computed on the CPU before the batch moves."""
    ids = document_ids
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    return torch.cat([offsets, offsets.new_tensor([ids.numel()])]).to(torch.int32)


def add_batch_extras(batch: dict, positions: bool, offsets: bool) -> dict:
    """`batch` with the labelled positions and / or the documents' offsets added. Batches that
    already carry them, or live on the GPU, pass unchanged."""
    labels, documents = batch.get("labels"), batch.get("document_ids")
    extra = {}
    if positions and LABEL_POSITIONS not in batch and torch.is_tensor(labels) and labels.device.type == "cpu":
        extra[LABEL_POSITIONS] = label_positions(labels)
    if offsets and CU_SEQLENS not in batch and torch.is_tensor(documents) and documents.device.type == "cpu":
        extra[CU_SEQLENS] = cu_seqlens(documents)
    return {**batch, **extra} if extra else batch


@dataclass
class Collator:
    """What every collator is told: the padding token and the batch length, and which of the
    model step's extras to add."""

    pad_token_id: int
    pad_to_multiple_of: int = 1
    """Round the batch length up to a multiple of this (8 helps tensor cores on GPU)."""
    model_max_length: int | None = None
    """Pad every batch to exactly this length (compiled blocks then see one shape only);
    None: to the longest row, rounded up to `pad_to_multiple_of`."""
    label_positions: bool = False
    """Add the labelled positions (`LABEL_POSITIONS`) for the fused loss."""
    varlen_offsets: bool = False
    """Add the documents' offsets (`CU_SEQLENS`) for varlen attention."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return add_batch_extras(self.rows(features), self.label_positions, self.varlen_offsets)

    def length(self, rows: list[dict]) -> int:
        if self.model_max_length is not None:
            return self.model_max_length
        return padded_length(max(len(r["input_ids"]) for r in rows), self.pad_to_multiple_of)

    def rows(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def for_the_step(collator, label_positions: bool, varlen_offsets: bool):
    """`collator` set to add the extras the model step needs (an lmforge collator), or as it
    is (another; the Trainer then adds them to each batch itself)."""
    if isinstance(collator, Collator):
        return replace(collator, label_positions=label_positions, varlen_offsets=varlen_offsets)
    return collator


@dataclass
class PaddedCollator(Collator):
    """One record per row, padded on the right, with an attention mask."""

    def rows(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = self.length(features)
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
class PackedCollator(Collator):
    """Packed rows (see `pack.py`) padded to the longest row; padding gets document id -1,
    label -100 and positions of its own. No attention_mask: the trainer builds the
    per-document mask from document_ids for the model's attention implementation."""

    def rows(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = self.length(features)
        batch = len(features)
        out = {
            "input_ids": torch.full((batch, length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((batch, length), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.arange(length, dtype=torch.long).repeat(batch, 1),
            "document_ids": torch.full((batch, length), -1, dtype=torch.long),
        }
        for i, r in enumerate(features):
            n = len(r["input_ids"])
            for key in ("input_ids", "labels", "position_ids", "document_ids"):
                out[key][i, :n] = torch.as_tensor(r[key], dtype=torch.long)
            out["position_ids"][i, n:] = torch.arange(length - n)
        return out


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
SEQUENCE_STARTS = "sequence_starts"  # packed pairs: where each side starts in the flattened batch


@dataclass
class PairCollator(Collator):
    """Preference pairs as one batch of 2B padded rows: the B chosen sides, then the B rejected
    sides, so both are scored in one forward pass. Reference log-probabilities, when the rows
    carry them (`--precompute_ref_log_probs`), come as `ref_logps` in the same row order."""

    def rows(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        batch = PaddedCollator(self.pad_token_id, self.pad_to_multiple_of, self.model_max_length).rows(sides(pairs))
        return with_reference(batch, pairs)

    def padded(self) -> PairCollator:
        """These pairs as padded rows (what the reference precomputation reads): itself."""
        return self


def sides(pairs: list[dict]) -> list[dict]:
    """The B chosen sides, then the B rejected sides, as records (input_ids, labels)."""
    return [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
            for side in ("chosen", "rejected") for p in pairs]


def with_reference(batch: dict, pairs: list[dict]) -> dict:
    """`ref_logps` (chosen sides, then rejected) when the pairs carry precomputed references."""
    if all(c in pairs[0] for c in REFERENCE_COLUMNS):
        batch["ref_logps"] = torch.tensor([p[c] for c in REFERENCE_COLUMNS for p in pairs], dtype=torch.float64)
    return batch


@dataclass
class PackedPairCollator(Collator):
    """Preference pairs as one packed row: the B chosen sides, then the B rejected sides, one
    after another (padding-free), each a document of its own (document id = its place among the
    2B sides: its own attention and positions). `SEQUENCE_STARTS` holds each side's first index,
    so the scores of the labelled positions are summed per side without a device sync. Only the
    row's end is padded, to a multiple of `pad_to_multiple_of`."""

    def rows(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        records = sides(pairs)
        batch = PackedCollator(self.pad_token_id, self.pad_to_multiple_of).rows([pack_records(records)])
        lengths = torch.tensor([len(r["input_ids"]) for r in records])
        batch[SEQUENCE_STARTS] = lengths.cumsum(0) - lengths
        return with_reference(batch, pairs)

    def padded(self) -> PairCollator:
        """The same pairs as padded rows (what the reference precomputation reads)."""
        return PairCollator(self.pad_token_id, self.pad_to_multiple_of)
