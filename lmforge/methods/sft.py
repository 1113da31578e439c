"""`lmforge sft`: full-parameter supervised fine-tuning on chat data through the HF Trainer.

    lmforge sft --model_name_or_path MODEL --data_path data.json --output_dir out --bf16 True
    lmforge sft run.yaml --learning_rate 1e-5        # a YAML run file, flags override it

Data → cache (exact masks) → padded batches → Trainer (auto-resume) → safetensors + tokenizer
with its chat template + a generation config that stops at the end of a turn.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import transformers

from lmforge.config import DataArguments, ModelArguments, TrainingArguments, parse
from lmforge.data.collate import PaddedCollator
from lmforge.methods.prepare import prepare_sft_data, print_stats
from lmforge.model import load_config, load_model
from lmforge.train import resolve_resume, save_final, write_run_info


def main(argv: Sequence[str]) -> str:
    model_args, data_args, args = parse((ModelArguments, DataArguments, TrainingArguments), argv)
    checkpoint = resolve_resume(args.output_dir, args.resume, args.overwrite_output_dir)
    load_config(model_args)  # a wrong model path fails now, not after tokenizing

    # Rank 0 tokenizes into the cache; the other ranks then find it there.
    with args.main_process_first(desc="tokenizing the data"):
        data = prepare_sft_data(model_args, data_args)
    if args.process_index == 0:
        print_stats(data)
        if checkpoint:
            print(f"lmforge: resuming from {checkpoint}")

    transformers.set_seed(args.seed)  # a model built from a config starts from the same weights
    model = load_model(model_args, data.tokenizer, flash_attn=args.flash_attn)
    collator = PaddedCollator(data.tokenizer.pad_token_id, pad_to_multiple_of=8 if args.bf16 or args.fp16 else 1)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data.train.dataset(),
        eval_dataset=data.eval.dataset() if data.eval else None,
        data_collator=collator,
        processing_class=data.tokenizer,
    )
    if args.process_index == 0:
        write_run_info(args.output_dir, {
            "train_data": asdict(data.train.stats),
            "eval_data": asdict(data.eval.stats) if data.eval else None,
            "cache": data.train.path,
        })
    trainer.train(resume_from_checkpoint=checkpoint)
    save_final(trainer, data.tokenizer, data.end_of_turn_id, args.output_dir)
    if args.process_index == 0:
        print(f"lmforge: saved the model to {args.output_dir}")
    return args.output_dir
