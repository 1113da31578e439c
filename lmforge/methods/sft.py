"""`lmforge sft`: supervised fine-tuning on chat data through the HF Trainer, full-parameter or
LoRA / QLoRA (`lmforge lora` is `lmforge sft --lora True`).

    lmforge sft --model_name_or_path MODEL --data_path data.json --output_dir out --bf16 True
    lmforge sft run.yaml --learning_rate 1e-5        # a YAML run file, flags override it
    torchrun --nproc_per_node 4 -m lmforge.sft ...   # the same entry under a launcher

Data → cache (exact masks) → padded batches → Trainer (auto-resume) → safetensors (or the
adapter) + tokenizer with its chat template + a generation config that stops at the end of a turn.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

import transformers

from lmforge.config import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    parse,
)
from lmforge.data.collate import PackedCollator, PaddedCollator
from lmforge.data.packing import PackedDataset
from lmforge.data.split import split_dataset
from lmforge.distributed import local_main_first
from lmforge.methods.prepare import SftData, prepare_sft_data, print_stats, training_records_info
from lmforge.model import apply_lora, gpu_memory_gib, load_config, load_model
from lmforge.preflight import Preflight
from lmforge.report import key_flags
from lmforge.samples import SampleGenerations, held_out_prompts
from lmforge.train import resolve_resume, train_and_save


def batches(data: SftData, data_args: DataArguments, args: TrainingArguments):
    """Train / eval datasets and the collator: packed rows (default) or one record per row."""
    multiple = 8 if args.bf16 or args.fp16 else 1
    if args.compile_blocks and data_args.packing:
        # Every packed row the same length: the compiled blocks then see one shape only.
        multiple = data_args.model_max_length
    train = data.train.dataset()
    eval_ = data.eval.dataset() if data.eval else None
    if data_args.val_split:
        train, eval_ = split_dataset(train, data_args.val_split, args.seed)
    if not data_args.packing:
        return train, eval_, PaddedCollator(data.tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    train = PackedDataset(train, data_args.model_max_length, seed=args.seed)
    eval_ = PackedDataset(eval_, data_args.model_max_length, seed=args.seed) if eval_ is not None else None
    args.remove_unused_columns = False  # keep document_ids for the attention mask
    if args.process_index == 0:
        print(f"lmforge: packing: {len(train.dataset)} records into {len(train)} rows of up to "
              f"{data_args.model_max_length} tokens")
    return train, eval_, PackedCollator(data.tokenizer.pad_token_id, pad_to_multiple_of=multiple)


def main(argv: Sequence[str], lora_default: bool = False) -> str:
    started = time.time()
    model_args, data_args, lora_args, args = parse(
        (ModelArguments, DataArguments, LoraArguments, TrainingArguments), argv)
    lora_args.lora = lora_args.lora or lora_default
    checkpoint = resolve_resume(args.output_dir, args.resume, args.overwrite_output_dir, args.should_save)
    load_config(model_args)  # a wrong model path fails now, not after tokenizing

    # The first process of each machine tokenizes into the cache; the others then find it there.
    with local_main_first(args, args.prepare_timeout, "tokenizing the data"):
        data = prepare_sft_data(model_args, data_args)
    if args.process_index == 0:
        print_stats(data)
        if checkpoint:
            print(f"lmforge: resuming from {checkpoint}")

    transformers.set_seed(args.seed)  # a model built from a config starts from the same weights
    model = load_model(model_args, data.tokenizer, args.flash_attn, data_args.model_max_length, lora_args)
    if lora_args.lora:
        model = apply_lora(model, lora_args, args.gradient_checkpointing)
    if args.process_index == 0 and next(model.parameters()).is_cuda:
        print(f"lmforge: GPU memory after loading the model: {gpu_memory_gib():.2f} GiB")
    train_dataset, eval_dataset, collator = batches(data, data_args, args)
    records = getattr(train_dataset, "dataset", train_dataset)  # the cached records under the packing
    held_out = getattr(eval_dataset, "dataset", eval_dataset) if data_args.val_split else None
    if held_out is not None and args.process_index == 0:
        print(f"lmforge: --val_split {data_args.val_split}: {len(held_out)} of {len(held_out) + len(records)} "
              f"records held out for evaluation (drawn by --seed {args.seed})")
    run_info = {
        "command": "lora" if lora_default else "sft", "flags": list(argv), "started": started,
        "config": key_flags(model_args, data_args, lora_args, args),
        "train_data": asdict(data.train.stats),
        "eval_data": asdict(data.eval.stats) if data.eval else None,
        "cache": data.train.path,
        "rows": len(train_dataset),
        "packing": data_args.packing,
        **training_records_info(records, held_out, data_args.val_split, args.seed),
    }
    trained = run_info.get("training") or asdict(data.train.stats)
    preflight = Preflight(data.tokenizer, records[0], trained["tokens"], trained["trained_tokens"],
                          data_args.model_max_length)
    samples = []
    if args.eval_samples and eval_dataset is not None:
        prompts = held_out_prompts(getattr(eval_dataset, "dataset", eval_dataset), args.eval_samples)
        samples = [SampleGenerations(data.tokenizer, prompts, data.end_of_turn_id, args.eval_sample_tokens)]
    elif args.eval_samples and args.process_index == 0:
        print("lmforge: --eval_samples: no held-out data (--eval_data_path or --val_split), so no samples")
    return train_and_save(model, args, data.tokenizer, train_dataset, eval_dataset, collator, checkpoint,
                          data.end_of_turn_id, run_info, preflight=preflight, callbacks=samples)
