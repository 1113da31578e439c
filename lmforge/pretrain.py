"""`lmforge pretrain`: causal-LM pretraining on text through the HF Trainer, from a config
(random init, "from scratch") or from weights (continued pretraining); LoRA / QLoRA too.

    lmforge pretrain --config_name CONFIG --tokenizer_name TOK --train_files corpus.jsonl \\
        --block_size 2048 --output_dir out --bf16 True

Text → documents (+ EOS) → one token stream cut into block_size blocks (cache) → Trainer
(auto-resume) → safetensors + tokenizer. The steps are `recipe.run`'s; this module says what
pretraining puts in them.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m lmforge.pretrain --help: answered before the imports below
    from lmforge.cli import answer_help

    answer_help("pretrain")

from dataclasses import asdict
from typing import Sequence

from lmforge.data.batches import Batches, PreparedData, prepare_data
from lmforge.data.encode import TEXT
from lmforge.data.options import TextOptions
from lmforge.data.split import describe_split, record_lengths
from lmforge.flags import PretrainDataArguments
from lmforge.logs import say
from lmforge.modeling.load import load_tokenizer
from lmforge.recipe import Flags, Method, Model, run
from lmforge.training.preflight import Preflight


class Pretrain(Method):
    command, kind, data_arguments = "pretrain", TEXT, PretrainDataArguments
    tokenizing, unit = "tokenizing the text", "blocks"

    def prepare(self, flags: Flags) -> PreparedData:
        data = flags.data
        options = TextOptions(block_size=data.block_size, text_field=data.text_field, text_split=data.text_split,
                              remainder=data.remainder, on_bad_record=data.on_bad_record)
        return prepare_data(TEXT, load_tokenizer(flags.model), None, options, data.train_files,
                            data.validation_files, data.data_cache_dir, data.preprocessing_num_workers)

    def data_files(self, flags: Flags) -> tuple[list[str], list[str]]:
        return list(flags.data.train_files or []), list(flags.data.validation_files or [])

    def packing(self, flags: Flags) -> bool:
        return flags.data.pretrain_document_mask  # blocks as rows of documents, each attending to itself

    def build_model(self, flags: Flags, data: PreparedData, batches: Batches, model) -> Model:
        if flags.model.config_name:
            n = sum(p.numel() for p in model.parameters())
            say(f"lmforge: pretraining a new model from {flags.model.config_name}: {n / 1e6:.2f}M parameters")
        return super().build_model(flags, data, batches, model)

    def describe(self, flags: Flags, data: PreparedData, batches: Batches) -> dict:
        if batches.held_out is None:
            return {}
        # Blocks train on every token (a padded last one: the collator masks its padding).
        tokens = int(record_lengths(batches.records).sum())
        return {"val_split": asdict(describe_split(batches.held_out, flags.data.val_split, flags.args.seed)),
                "training": {"records": len(batches.records), "tokens": tokens, "trained_tokens": tokens}}

    def preflight(self, flags: Flags, data: PreparedData, batches: Batches) -> Preflight:
        # A block trains on every token and may be long: its first few hundred show the text is right.
        blocks = batches.records
        tokens = int(record_lengths(blocks).sum())
        shown = blocks[0]["input_ids"][:256]
        whole = len(shown) == len(blocks[0]["input_ids"])
        title = "the first block" if whole else f"the first {len(shown)} tokens of the first block"
        return Preflight(data.tokenizer, {"input_ids": shown}, tokens, tokens, flags.data.block_size, title=title)


def main(argv: Sequence[str], callbacks: Sequence = ()) -> str:
    return run(Pretrain(), argv, callbacks)


if __name__ == "__main__":  # python -m lmforge.pretrain / torchrun -m lmforge.pretrain
    from lmforge.cli import run_entry

    run_entry("pretrain", main)
