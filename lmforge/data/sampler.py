"""The order of training rows: a function of (seed, epoch) and nothing else, so a resumed run
reads the rows of its epoch in the order the uninterrupted run did.

Why lmforge sets it: the HF Trainer's RandomSampler draws each epoch's permutation from the
process-wide torch RNG when the epoch starts. accelerate replaces it by its
SeedableRandomSampler (seeded by `data_seed`, else by `torch.initial_seed()` when the
dataloader is built) only while `use_seedable_sampler` is on. With it off, a resume in the
middle of epoch 1 or later reads that epoch's permutation before the checkpoint's RNG state is
restored, and so gets another order. `EpochShuffle` gives the permutation accelerate's sampler
gives for the same seed, whatever that flag says.

Dataloader workers: lmforge's datasets and collators draw no random numbers (packing is decided
once, in the main process, from the seed), so the workers' seeds cannot change a batch.
"""

from __future__ import annotations

from typing import Iterator

import torch


class EpochShuffle(torch.utils.data.Sampler[int]):
    """Indices 0..length-1 in a permutation seeded by `seed + epoch`. The Trainer (and
    accelerate's dataloader) call `set_epoch` before every pass, the resumed one included."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.length, generator=generator).tolist()
