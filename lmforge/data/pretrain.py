"""Documents → tokens → fixed blocks for pretraining, into the token cache.

Each document is tokenized (with the tokenizer's own BOS convention) and followed by EOS; the
token stream of all files, in order, is cut into `block_size` blocks whose labels are their
inputs (the model shifts). Unlike the usual `group_texts` over batches of 1,000 rows, which
drops a remainder at every batch, the whole corpus is one stream: only its final remainder,
fewer than `block_size` tokens, is dropped (counted) or kept as a shorter, padded last block.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from lmforge.data.cache import (
    Cached,
    PrepareProgress,
    RowWriter,
    build_or_load,
    cache_key,
    chunked,
    ordered_map,
)
from lmforge.data.formats import (
    TEXT_SUFFIXES,
    OnBadRecord,
    SkipCounter,
    TextSplit,
    iter_documents,
    skip_summary,
)
from lmforge.errors import LmforgeError

CHUNK = 64


class Remainder(str, enum.Enum):
    """The last tokens of the corpus that do not fill a block."""

    DROP = "drop"
    """Leave them out (counted in the stats), so every block is exactly block_size tokens."""
    PAD = "pad"
    """Keep them as a shorter last block; the collator pads it and masks the padding."""


@dataclass(frozen=True)
class PretrainOptions:
    block_size: int = 2048
    text_field: str = "text"
    text_split: TextSplit = TextSplit.FILE
    remainder: Remainder = Remainder.DROP
    on_bad_record: OnBadRecord = OnBadRecord.ERROR


@dataclass
class PretrainStats:
    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    trained_tokens: int = 0
    dropped_tail_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"documents: {self.documents}  tokens (with EOS): {self.tokens}",
            f"blocks: {self.blocks}  trained tokens: {self.trained_tokens}  "
            f"dropped tail tokens: {self.dropped_tail_tokens}",
        ]
        return "\n".join(lines + skip_summary(self.skipped, self.skip_examples))


PretrainCache = Cached[PretrainStats]


_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _tokenize_chunk(texts: list[str]) -> list[list[int]]:
    """Each document's ids followed by EOS."""
    assert _TOKENIZER is not None
    eos = _TOKENIZER.eos_token_id
    return [ids + [eos] for ids in _TOKENIZER(texts, verbose=False)["input_ids"]]


def document_ids(paths: Sequence[str], tokenizer, options: PretrainOptions, skips: SkipCounter,
                 num_workers: int = 1) -> Iterator[list[int]]:
    """Token ids of every document of `paths`, in order, each ending with EOS."""
    texts = (text for path in paths
             for _, text in iter_documents(path, options.text_field, options.text_split, options.on_bad_record, skips))
    for results in ordered_map(_tokenize_chunk, chunked(texts, CHUNK), num_workers, _init_worker, (tokenizer,)):
        yield from results


def _write_blocks(tmp: str, docs: Iterator[list[int]], options: PretrainOptions) -> PretrainStats:
    stats = PretrainStats()
    size = options.block_size
    buffer: list[int] = []
    progress = PrepareProgress("tokenizing")
    with RowWriter(tmp, ("input_ids",)) as writer:
        for ids in docs:
            progress.update(1, len(ids))
            stats.documents += 1
            stats.tokens += len(ids)
            buffer.extend(ids)
            while len(buffer) >= size:
                writer.add(buffer[:size])
                del buffer[:size]
                stats.blocks += 1
        if buffer and options.remainder == Remainder.PAD:
            writer.add(buffer)
            stats.blocks += 1
        else:
            stats.dropped_tail_tokens = len(buffer)
    progress.done()
    stats.trained_tokens = stats.tokens - stats.dropped_tail_tokens
    return stats


def prepare_pretrain(
    paths: Sequence[str],
    tokenizer,
    options: PretrainOptions,
    cache_dir: str | None = None,
    num_workers: int = 1,
) -> PretrainCache:
    """Tokenize and block `paths` into the cache (or find them there)."""
    if not paths:
        raise LmforgeError("no training text given (--train_files)")
    if tokenizer.eos_token_id is None:
        raise LmforgeError("the tokenizer has no EOS token to separate documents with")
    if options.block_size < 2:
        raise LmforgeError(f"--block_size must be at least 2, got {options.block_size}")
    key = cache_key("pretrain", paths, tokenizer, asdict(options), suffixes=TEXT_SUFFIXES)

    def build(tmp: str) -> dict:
        skips = SkipCounter(Counter(), {})
        stats = _write_blocks(tmp, document_ids(paths, tokenizer, options, skips, num_workers), options)
        stats.skipped, stats.skip_examples = dict(skips.counts), dict(skips.examples)
        if stats.blocks == 0:
            raise LmforgeError(
                f"{', '.join(paths)}: {stats.tokens} tokens in all, fewer than one block of "
                f"--block_size {options.block_size}; lower --block_size or pass --remainder pad"
            )
        return asdict(stats)

    entry = build_or_load(cache_dir, "pretrain", key, build)
    return PretrainCache(entry, PretrainStats(**entry.stats))
