"""`lmforge prepare`: tokenize conversations into the cache, print the counts, optionally dump
records as JSONL or show them with their loss mask. Takes the command line of `lmforge sft`
(which runs exactly this before training); the training flags matter to --show only.

    lmforge prepare --data_path data.json --tokenizer_name TOK --output_dir out --dump first.jsonl
    lmforge prepare --data_path data.json --tokenizer_name TOK --show 3     # the pre-flight check
    lmforge prepare --data_path data.json --tokenizer_name TOK --verify     # check the cached tokens
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Sequence

from lmforge.config import TrainingArguments
from lmforge.data.batches import PreparedData, build_batches
from lmforge.data.split import record_lengths, trained_counts
from lmforge.data.store import DamagedEntry, dump_records, verify_entry
from lmforge.errors import LmforgeError
from lmforge.flags import LoraArguments, ModelArguments, PrepareArguments, PrepareTrainingFlags
from lmforge.recipe import Flags, parse_flags
from lmforge.sft import Sft


@dataclass
class PrepareTrainingArguments(PrepareTrainingFlags, TrainingArguments):
    """`lmforge prepare`'s training arguments: `lmforge sft`'s, writing nothing to --output_dir."""


def show(data: PreparedData, flags: Flags, n: int) -> None:
    """`--show N`: what `lmforge sft` with these flags would print before its first step."""
    from lmforge.training.preflight import make_plan, optimizer_steps, plan_lines, show_example, use_color

    args = flags.args
    batches = build_batches(data, flags.data.model_max_length, packing=flags.data.packing,
                            val_split=flags.data.val_split, seed=args.seed)
    records = batches.records
    color = use_color()
    for i in range(min(n, len(records))):
        print("lmforge: " + show_example(data.tokenizer, records[i], f"training record {i + 1} of {len(records)}",
                                         color))
    steps, per_epoch = optimizer_steps(len(batches.train), args.per_device_train_batch_size,
                                       args.gradient_accumulation_steps, args.world_size, args.num_train_epochs,
                                       args.max_steps, args.dataloader_drop_last)
    tokens = int(record_lengths(records).sum())
    memory, why = meta_memory_estimate(flags.model, flags.lora, data.tokenizer)
    plan = make_plan(args, steps, per_epoch, tokens, int(trained_counts(records).sum()),
                     flags.data.model_max_length, memory)
    lines = plan_lines(plan, args) + ([f"estimated memory: {why}"] if why else [])
    print("lmforge: trained with these flags:\n" + "\n".join("  " + line for line in lines))


def meta_memory_estimate(model_args: ModelArguments, lora_args: LoraArguments, tokenizer):
    """(MemoryEstimate, None), or (None, why not): the model built on the meta device (no
    memory, no weights read) from its config, with its LoRA adapters when asked."""
    import torch
    import transformers

    from lmforge.errors import LmforgeError
    from lmforge.modeling.load import DTYPES, apply_lora, load_config
    from lmforge.training.preflight import estimate_memory

    if lora_args.q_lora:
        return None, "printed at training start (QLoRA's 4-bit weights are counted once loaded)"
    try:
        config = load_config(model_args)
    except LmforgeError as e:
        return None, f"no model config to estimate it from ({e})"
    dtype = DTYPES[model_args.torch_dtype]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        if lora_args.lora:
            model = apply_lora(model, lora_args)
    return estimate_memory(model), None


class Prepare(Sft):
    """`lmforge sft`'s flags, with the training flags' output directory optional, and --dump / --show."""

    command, method_arguments, training_arguments = "prepare", PrepareArguments, PrepareTrainingArguments


def verify(method: Prepare, flags: Flags, data: PreparedData) -> PreparedData:
    """`--verify`: every byte of each entry checked against its checksums, whatever its
    `verified.json` says. A damaged entry is removed and built again, then checked again."""
    for attempt in (1, 2):
        damaged = []
        for cached in (data.train, data.eval):
            if cached is None:
                continue
            try:
                size, rows = verify_entry(cached.path)
            except DamagedEntry as e:
                if attempt == 2:
                    raise LmforgeError(f"the cache entry {cached.path}, just rebuilt, is damaged again ({e}); "
                                       "check the disk it is on") from None
                print(f"lmforge: the cache entry {cached.path} is damaged ({e}); rebuilding it")
                shutil.rmtree(cached.path, ignore_errors=True)
                damaged.append(cached.path)
            else:
                print(f"lmforge: verified {cached.path}: {size:,} bytes, {rows:,} rows")
        if not damaged:
            break
        data = method.prepare(flags)
    return data


def main(argv: Sequence[str]) -> PreparedData:
    method = Prepare()
    flags = parse_flags(method, argv)
    data = method.prepare(flags)
    if flags.method.verify:
        data = verify(method, flags, data)
    print(data.stats_lines())
    if flags.method.dump:
        n = dump_records(data.train, flags.method.dump, flags.method.dump_n)
        print(f"lmforge: wrote {n} records to {flags.method.dump}")
    if flags.method.show:
        show(data, flags, flags.method.show)
    return data
