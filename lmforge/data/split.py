"""Held-out records (`--val_split`) and per-record counts of a cached dataset.

The split is a function of (number of records, fraction, seed) only: the same command line
holds out the same records on every rank, on resume and on another machine. Counts are read
from the Arrow list offsets of the memory-mapped cache, chunk by chunk, so a large corpus is
never copied into memory to be described.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmforge.data.render import IGNORE_INDEX
from lmforge.errors import LmforgeError


def held_out_count(records: int, fraction: float) -> int:
    """How many of `records` a split of `fraction` holds out: rounded, at least one (a split
    asked for is never silently empty), and always leaving one record to train on."""
    if fraction <= 0:
        return 0
    if records < 2:
        raise LmforgeError(f"--val_split {fraction}: {records} record(s) cannot be split into training and "
                           "held-out data")
    return min(max(1, round(records * fraction)), records - 1)


def held_out_indices(records: int, fraction: float, seed: int) -> list[int]:
    """Indices (sorted) of the records `--val_split fraction` holds out, drawn by `seed`."""
    n = held_out_count(records, fraction)
    return sorted(random.Random(seed).sample(range(records), n))


def split_dataset(dataset, fraction: float, seed: int):
    """(training rows, held-out rows) of a cached `datasets.Dataset`; both are views of the
    same memory-mapped file (`select`), in source order."""
    held = held_out_indices(len(dataset), fraction, seed)
    held_set = set(held)
    train = [i for i in range(len(dataset)) if i not in held_set]
    return dataset.select(train), dataset.select(held)


def _rows(dataset) -> pa.Array | None:
    """The selected rows' indices into the underlying table, or None when every row is used
    in order. (`datasets` keeps a select()ed view as an indices table over the same data.)"""
    indices = getattr(dataset, "_indices", None)
    return None if indices is None else indices.column(0).combine_chunks()


def record_lengths(dataset) -> np.ndarray:
    """Tokens of every row of a cached dataset (of a select()ed view: of its rows, in its
    order), from the list offsets; the tokens are not read."""
    lengths = pc.list_value_length(dataset.data.column("input_ids"))
    rows = _rows(dataset)
    if rows is not None:
        lengths = lengths.take(rows)
    return np.asarray(lengths.to_numpy(zero_copy_only=False), dtype=np.int64)


def trained_counts(dataset) -> np.ndarray:
    """Tokens whose label is not -100, per row (rows without labels train on every token)."""
    table = dataset.data
    if "labels" not in table.column_names:
        return record_lengths(dataset)
    per_chunk = []
    for chunk in table.column("labels").chunks:  # one Arrow batch at a time
        values = chunk.flatten().to_numpy(zero_copy_only=False) != IGNORE_INDEX
        ends = pc.list_value_length(chunk).to_numpy(zero_copy_only=False).cumsum()
        cumulative = np.concatenate([[0], values.cumsum()])
        per_chunk.append(np.diff(cumulative[np.concatenate([[0], ends])]))
    counts = np.concatenate(per_chunk) if per_chunk else np.zeros(0, dtype=np.int64)
    rows = _rows(dataset)
    return counts if rows is None else counts[rows.to_numpy(zero_copy_only=False)]


@dataclass
class Histogram:
    """Counts of records per length bin: bin i holds lengths in (edges[i], edges[i + 1]]."""

    edges: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def length_histogram(lengths: np.ndarray, bins: int = 10) -> Histogram:
    """Records per length, in at most `bins` bins of equal width (whole tokens) from the
    shortest record to the longest."""
    if len(lengths) == 0:
        return Histogram()
    low, high = int(lengths.min()) - 1, int(lengths.max())
    width = max(1, math.ceil((high - low) / bins))
    edges = [low + k * width for k in range(math.ceil((high - low) / width) + 1)]
    counts, _ = np.histogram(lengths, bins=np.asarray(edges) + 0.5)  # (a, b] on integers
    return Histogram(edges, [int(c) for c in counts])


@dataclass
class SplitStats:
    """What `--val_split` held out, for the log and the run report."""

    fraction: float
    seed: int
    records: int
    tokens: int
    trained_tokens: int


def describe_split(held, fraction: float, seed: int) -> SplitStats:
    return SplitStats(fraction, seed, len(held), int(record_lengths(held).sum()), int(trained_counts(held).sum()))
