"""`lmforge dpo`: preference training (DPO, IPO, hinge) on pairs of answers to one prompt,
full-parameter or LoRA / QLoRA, with `lmforge sft`'s model loading, distributed launchers,
auto-resume and final save.

    lmforge dpo --model_name_or_path SFT_MODEL --data_path pairs.jsonl --output_dir out \\
        --lora True --beta 0.1 --bf16 True --learning_rate 5e-6
    torchrun --nproc_per_node 4 -m lmforge.dpo ...   # the same entry under a launcher

Pairs → cache (exact masks, prompt tokens checked identical) → 2B padded rows per batch →
DpoTrainer (policy and reference log-probs at the answer tokens, without the full logits) →
the model (or adapter) + tokenizer with its chat template, as `lmforge sft` writes them.
The reference is the model the run starts from: under LoRA the same weights with the adapter
disabled, for full fine-tuning a frozen copy, or its log-probs computed once before training
(`--precompute_ref_log_probs`, stored in the cache). The steps are `recipe.run`'s.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m lmforge.dpo --help: answered before the imports below
    from lmforge.cli import answer_help

    answer_help("dpo")

from dataclasses import asdict
from typing import Sequence

from lmforge.config import DpoTrainingArguments
from lmforge.data.batches import Batches, PreparedData
from lmforge.data.encode import PAIRS
from lmforge.data.split import split_dataset
from lmforge.errors import LmforgeError
from lmforge.flags import DpoArguments, PreferenceDataArguments
from lmforge.logs import say
from lmforge.modeling.load import apply_lora
from lmforge.modeling.optim import adapter_dtype
from lmforge.recipe import Flags, Method, Model, run
from lmforge.training.distributed import local_main_first, shards_weights
from lmforge.training.dpo_trainer import (
    DpoTrainer,
    disable_dropout,
    frozen_copy,
    reference_entry,
    with_reference_columns,
)
from lmforge.training.fast_path import Rows


class Dpo(Method):
    command, kind, data_arguments, method_arguments = "dpo", PAIRS, PreferenceDataArguments, DpoArguments
    training_arguments = DpoTrainingArguments
    unit = "pairs"

    def check(self, flags: Flags) -> None:
        """A frozen copy is a whole model on every process: refused where the model is sharded."""
        args, dpo = flags.args, flags.method
        if shards_weights(args) and not flags.lora.lora and not dpo.precompute_ref_log_probs:
            raise LmforgeError("full-parameter DPO under FSDP or ZeRO-3 would keep an unsharded frozen reference on "
                               "every GPU; pass --precompute_ref_log_probs True (reference computed once, before "
                               "training) or --lora True (the reference is the model with its adapter disabled)")

    def packing(self, flags: Flags) -> bool:
        return flags.data.packing  # the sides of a batch's pairs in one row (else 2B padded rows)

    def rows(self, flags: Flags) -> Rows:
        return Rows.PACKED_PAIRS if flags.data.packing else Rows.PAIRS  # either way, of many lengths

    def build_model(self, flags: Flags, data: PreparedData, batches: Batches, model) -> Model:
        args, dpo = flags.args, flags.method
        if dpo.disable_dropout:
            disable_dropout(model)
        if dpo.precompute_ref_log_probs:
            # The model as loaded is the reference; its log-probs are cached beside the tokens.
            with local_main_first(args, args.prepare_timeout, "computing the reference log-probabilities"):
                self._add_reference_columns(flags, data, batches, model)
        reference = None
        if flags.lora.lora:
            model = apply_lora(model, flags.lora, args.gradient_checkpointing, adapter_dtype(model.dtype, args))
        elif not dpo.precompute_ref_log_probs:
            reference = frozen_copy(model)
        say(f"lmforge: DPO ({dpo.loss_type.value}, beta {dpo.beta}); reference: "
            + ("precomputed" if dpo.precompute_ref_log_probs else "the model with its adapter disabled"
               if flags.lora.lora else "a frozen copy of the starting model"))
        return Model(model, DpoTrainer, {"dpo": dpo, "reference": reference})

    @staticmethod
    def _add_reference_columns(flags: Flags, data: PreparedData, batches: Batches, model) -> None:
        """The reference log-probabilities of every pair of each cache entry, as two more columns
        of the rows (computed over the whole entry, then split as --val_split splits it)."""
        args = flags.args

        def with_reference(entry):
            # Padded rows: the references are computed before training, once, and then read as
            # columns of the pairs, so they need no packing.
            ref = reference_entry(model, entry.entry, batches.collator.padded(), args, args.fused_loss,
                                  flags.data.data_cache_dir)
            return with_reference_columns(entry.dataset(), ref)

        train = with_reference(data.train)
        if batches.held_out is not None:
            batches.train, batches.eval = split_dataset(train, flags.data.val_split, args.seed)
        else:
            batches.train = train
            batches.eval = with_reference(data.eval) if data.eval is not None else None

    def describe(self, flags: Flags, data: PreparedData, batches: Batches) -> dict:
        settings = {k: getattr(v, "value", v) for k, v in asdict(flags.method).items()}
        return {"pairs": len(batches.train), "packing": flags.data.packing, "dpo": settings}


def main(argv: Sequence[str], callbacks: Sequence = ()) -> str:
    return run(Dpo(), argv, callbacks)


if __name__ == "__main__":  # python -m lmforge.dpo / torchrun -m lmforge.dpo / deepspeed --module lmforge.dpo
    from lmforge.cli import run_entry

    run_entry("dpo", main)
