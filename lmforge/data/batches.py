"""The data chain's one entry for every method: files → the datasets and the collator the
Trainer takes.

    sources.py   files → raw records (or text documents), each with its location
    records.py   raw record → Conversation (SFT) or Pair (DPO), checked   (schema.py: messages)
    render.py    Conversation → (input_ids, labels), the mask on the rendered text  (templates.py)
    store.py     rows → a content-keyed, memory-mapped token-cache entry
    encode.py    the prepare driver: records → rendered → length policy → rows into the store
    pack.py      cached rows → packed rows (SFT) or document-masked blocks (pretraining)
    collate.py   rows → the batch the model step takes (padding, positions, offsets)

`prepare_data` runs stages 1-5 for the train and eval files of one `Kind` (`encode.CHAT`,
`PAIRS`, `TEXT`); `build_batches` runs 6-7 on its result. `--model_max_length` keeps its name
all the way: the length policy of the cache, the bins of the packing, the collator's fixed
length when the blocks are compiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from lmforge.data.collate import Collator, PackedCollator, PackedPairCollator, PairCollator, PaddedCollator
from lmforge.data.encode import CHAT, PAIRS, TEXT, Kind, PairKind, prepare
from lmforge.data.pack import DocumentBlocks, PackedDataset
from lmforge.data.render import Renderer, end_of_turn_token_id, template_end_of_turn
from lmforge.data.split import split_dataset
from lmforge.data.store import Cached


@dataclass
class PreparedData:
    """Stages 1-5 done: the tokenizer, the chat template the records were rendered with (None
    for text), the token that ends an assistant turn, and the train / eval cache entries."""

    kind: Kind
    tokenizer: Any
    chat_template: Optional[str]
    end_of_turn_id: Optional[int]
    train: Cached
    eval: Optional[Cached]

    def stats_lines(self) -> str:
        what = "training text" if self.kind is TEXT else "training data"
        lines = f"lmforge: {what} ({self.train.path})\n{self.train.stats.summary()}"
        if self.eval is not None:
            what = "validation text" if self.kind is TEXT else "eval data"
            lines += f"\nlmforge: {what} ({self.eval.path})\n{self.eval.stats.summary()}"
        return lines


def prepare_data(kind: Kind, tokenizer, template: Optional[str], options, train_paths: Sequence[str],
                 eval_paths: Sequence[str], cache_dir: Optional[str], num_workers: Optional[int]) -> PreparedData:
    """The train and eval files of `kind` in the token cache (built there, or found)."""
    if kind is PAIRS:
        options = PairKind.fixed(options)

    def entry(paths: Sequence[str]) -> Cached:
        return prepare(kind, paths, tokenizer, options, template, cache_dir, num_workers)

    train = entry(train_paths)
    eval_ = entry(eval_paths) if eval_paths else None
    if kind is TEXT:
        end_of_turn = template_end_of_turn(tokenizer)
    else:
        end_of_turn = end_of_turn_token_id(Renderer(tokenizer, template, options.masking))
    return PreparedData(kind, tokenizer, template, end_of_turn, train, eval_)


@dataclass
class Batches:
    """Stages 6-7 done: what the Trainer samples and how it batches it."""

    train: Any
    """The training rows (packed rows, blocks, or the cached records)."""
    eval: Any
    """The evaluation rows, or None."""
    collator: Collator
    records: Any
    """The cached records (or blocks) under `train`: counted for the report and the pre-flight."""
    held_out: Any
    """The records `--val_split` held out (None without it)."""


def build_batches(data: PreparedData, model_max_length: int, packing: bool = False, val_split: float = 0.0,
                  seed: int = 0, pad_to_multiple_of: int = 1, fixed_length: bool = False) -> Batches:
    """Training and evaluation rows and their collator for `data`:
      - `val_split`: that fraction of the training records held out (drawn by `seed`);
      - chat records `packing` into rows of `model_max_length` (each record alone in its
        attention), else one padded record per row; text blocks as
        padded rows, or (`packing`, `--pretrain_document_mask`) with attention per document;
      - pairs as 2B padded rows, or (`packing`) as one padding-free row of 2B documents;
      - `fixed_length`: every packed batch padded to `model_max_length` (compiled blocks see one
        shape); else to the longest row, rounded up to `pad_to_multiple_of`."""
    train = data.train.dataset()
    eval_ = data.eval.dataset() if data.eval is not None else None
    held_out = None
    if val_split:
        train, eval_ = split_dataset(train, val_split, seed)
        held_out = eval_
    records = train
    tokenizer = data.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data.kind is PAIRS:
        pairs = PackedPairCollator if packing else PairCollator
        return Batches(train, eval_, pairs(pad, pad_to_multiple_of), records, held_out)
    if not packing:
        return Batches(train, eval_, PaddedCollator(pad, pad_to_multiple_of), records, held_out)
    if data.kind is TEXT:
        eos = tokenizer.eos_token_id
        train = DocumentBlocks(train, eos)
        eval_ = DocumentBlocks(eval_, eos) if eval_ is not None else None
    else:
        train = PackedDataset(train, model_max_length, seed=seed)
        eval_ = PackedDataset(eval_, model_max_length, seed=seed) if eval_ is not None else None
    fixed = model_max_length if fixed_length and data.kind is CHAT else None
    return Batches(train, eval_, PackedCollator(pad, pad_to_multiple_of, fixed), records, held_out)
