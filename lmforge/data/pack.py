"""Stage 6 of the data chain, pack: cached rows → training rows. Whole records are placed into
bins of `model_max_length` tokens by best-fit decreasing, so a batch holds almost no padding,
while every record keeps its own positions and attention.

A packed row carries, besides input_ids and labels:
  - position_ids restarting at 0 for every record, so RoPE sees each one as if alone;
  - document_ids (0, 1, 2, ... per record in the row), from which the trainer builds the
    attention mask that confines every token to its own record (see `modeling/attention.py`);
  - the label of each record's first token set to -100: unpacked, the model never predicts a
    record's first token (there is nothing before it); packed, the token before it belongs to
    the previous record, and that prediction would cross the boundary.
With these, packed training computes exactly the unpacked loss (tested to 1e-5 in fp32).

Pretraining blocks become rows of the same form under `--pretrain_document_mask`
(`DocumentBlocks`): a block is a row of several documents, each ending at EOS.
"""

from __future__ import annotations

import bisect
import random
from typing import Sequence

import torch

from lmforge.data.render import IGNORE_INDEX
from lmforge.data.split import record_lengths


def best_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose total length is at most `capacity`.

    Records are placed longest first, each into the fullest bin it still fits in (a new bin
    when none has room). Ties in length are ordered by a seeded shuffle and the bins are
    shuffled with the same seed, so the result is deterministic for a seed and a run resumes
    with the same bins. No record is split; one longer than `capacity` is an error (the cache
    has already truncated or dropped those).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle decides among equal lengths
    bins: list[list[int]] = []
    # Bins with room, as sorted (remaining space, bin index) pairs: the first pair whose space
    # is >= the record's length is the fullest bin that fits.
    open_bins: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"record {i} has {n} tokens, more than the bin capacity {capacity}")
        k = bisect.bisect_left(open_bins, (n, -1))
        if k == len(open_bins):
            bins.append([i])
            space, b = capacity - n, len(bins) - 1
        else:
            space, b = open_bins.pop(k)
            bins[b].append(i)
            space -= n
        if space > 0:
            bisect.insort(open_bins, (space, b))
    rng.shuffle(bins)
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """Rows made of whole records of `dataset`, one row per bin."""

    def __init__(self, dataset, model_max_length: int, seed: int = 0):
        self.dataset = dataset
        self.model_max_length = model_max_length
        # Token counts from the Arrow list offsets (the tokens themselves are not read).
        self.bins = best_fit_decreasing(record_lengths(dataset).tolist(), model_max_length, seed)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return pack_records([self.dataset[j] for j in self.bins[i]])


def pack_records(records: list[dict]) -> dict[str, list[int]]:
    """One packed row from records with input_ids (and labels; without, every token trains)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    document_ids: list[int] = []
    for doc, record in enumerate(records):
        ids = list(record["input_ids"])
        doc_labels = list(record.get("labels", ids))
        doc_labels[0] = IGNORE_INDEX
        input_ids += ids
        labels += doc_labels
        position_ids += range(len(ids))
        document_ids += [doc] * len(ids)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}


def split_block(input_ids: Sequence[int], eos_token_id: int) -> dict[str, list[int]]:
    """A pretraining block as a packed row: documents end at EOS, so each token after an EOS
    starts a new document with its own positions and attention (`--pretrain_document_mask`).
    A block starts mid-document more often than not; its first part is a document of its own."""
    ids = list(input_ids)
    labels, position_ids, document_ids = [], [], []
    doc, position = 0, 0
    for t, token in enumerate(ids):
        starts = t > 0 and ids[t - 1] == eos_token_id
        if starts:
            doc, position = doc + 1, 0
        labels.append(IGNORE_INDEX if starts else token)
        position_ids.append(position)
        document_ids.append(doc)
        position += 1
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}


class DocumentBlocks(torch.utils.data.Dataset):
    """Pretraining blocks whose attention stops at document boundaries (EOS)."""

    def __init__(self, dataset, eos_token_id: int):
        self.dataset = dataset
        self.eos_token_id = eos_token_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return split_block(self.dataset[i]["input_ids"], self.eos_token_id)
