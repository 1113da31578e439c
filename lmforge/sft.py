"""`lmforge sft`: supervised fine-tuning on chat data through the HF Trainer, full-parameter or
LoRA / QLoRA (`lmforge lora` is `lmforge sft --lora True`).

    lmforge sft --model_name_or_path MODEL --data_path data.json --output_dir out --bf16 True
    lmforge sft run.yaml --learning_rate 1e-5        # a YAML run file, flags override it
    torchrun --nproc_per_node 4 -m lmforge.sft ...   # the same entry under a launcher

Data → cache (exact masks) → packed rows → Trainer (auto-resume) → safetensors (or the
adapter) + tokenizer with its chat template + a generation config that stops at the end of a turn.
The steps are `recipe.run`'s; this module says what SFT puts in them.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m lmforge.sft --help: answered before the imports below
    from lmforge.cli import answer_help

    answer_help("sft")

from dataclasses import asdict
from typing import Sequence

from lmforge.data.batches import Batches, PreparedData
from lmforge.data.encode import CHAT
from lmforge.data.split import describe_split, length_histogram, record_lengths, trained_counts
from lmforge.flags import DataArguments
from lmforge.logs import say
from lmforge.recipe import Flags, Method, run
from lmforge.training.preflight import Preflight
from lmforge.training.samples import SampleGenerations, held_out_prompts


def training_records_info(records, held_out, fraction: float, seed: int) -> dict:
    """For the run report: the length histogram of the records trained on and, with
    --val_split, what was held out and what is left to train on."""
    lengths = record_lengths(records)
    info: dict = {"length_histogram": asdict(length_histogram(lengths))}
    if held_out is not None:
        info["training"] = {"records": len(records), "tokens": int(lengths.sum()),
                            "trained_tokens": int(trained_counts(records).sum())}
        info["val_split"] = asdict(describe_split(held_out, fraction, seed))
    return info


class Sft(Method):
    command, kind, data_arguments = "sft", CHAT, DataArguments

    def describe(self, flags: Flags, data: PreparedData, batches: Batches) -> dict:
        return {"packing": flags.data.packing,
                **training_records_info(batches.records, batches.held_out, flags.data.val_split, flags.args.seed)}

    def preflight(self, flags: Flags, data: PreparedData, batches: Batches) -> Preflight:
        records = batches.records
        if batches.held_out is not None:
            tokens, trained = int(record_lengths(records).sum()), int(trained_counts(records).sum())
        else:
            tokens, trained = data.train.stats.tokens, data.train.stats.trained_tokens
        return Preflight(data.tokenizer, records[0], tokens, trained, flags.data.model_max_length)

    def callbacks(self, flags: Flags, data: PreparedData, batches: Batches) -> list:
        args = flags.args
        if args.eval_samples and batches.eval is not None:
            prompts = held_out_prompts(getattr(batches.eval, "dataset", batches.eval), args.eval_samples)
            return [SampleGenerations(data.tokenizer, prompts, data.end_of_turn_id, args.eval_sample_tokens)]
        if args.eval_samples:
            say("lmforge: --eval_samples: no held-out data (--eval_data_path or --val_split), so no samples")
        return []


def main(argv: Sequence[str], callbacks: Sequence = ()) -> str:
    return run(Sft(), argv, callbacks)


if __name__ == "__main__":  # python -m lmforge.sft / torchrun -m lmforge.sft / deepspeed --module lmforge.sft
    from lmforge.cli import run_entry

    run_entry("sft", main)
