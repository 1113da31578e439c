"""`lmforge pretrain`: causal-LM pretraining on text through the HF Trainer, from a config
(random init, "from scratch") or from weights (continued pretraining); LoRA / QLoRA too.

    lmforge pretrain --config_name CONFIG --tokenizer_name TOK --train_files corpus.jsonl \\
        --block_size 2048 --output_dir out --bf16 True

Text → documents (+ EOS) → one token stream cut into block_size blocks (cache) → Trainer
(auto-resume) → safetensors + tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import transformers

from lmforge.config import (
    LoraArguments,
    ModelArguments,
    PretrainDataArguments,
    TrainingArguments,
    parse,
)
from lmforge.data.collate import PackedCollator, PaddedCollator
from lmforge.data.packing import DocumentBlocks
from lmforge.data.pretrain import PretrainCache, PretrainOptions, prepare_pretrain
from lmforge.data.render import template_end_of_turn
from lmforge.data.split import describe_split, record_lengths, split_dataset
from lmforge.distributed import local_main_first
from lmforge.model import (
    apply_lora,
    gpu_memory_gib,
    load_config,
    load_model,
    load_tokenizer,
)
from lmforge.preflight import Preflight
from lmforge.report import key_flags
from lmforge.train import resolve_resume, train_and_save


@dataclass
class PretrainData:
    tokenizer: object
    train: PretrainCache
    eval: Optional[PretrainCache]


def prepare_pretrain_data(model_args: ModelArguments, data_args: PretrainDataArguments) -> PretrainData:
    tokenizer = load_tokenizer(model_args)
    options = PretrainOptions(
        block_size=data_args.block_size,
        text_field=data_args.text_field,
        text_split=data_args.text_split,
        remainder=data_args.remainder,
        on_bad_record=data_args.on_bad_record,
    )
    kwargs = dict(cache_dir=data_args.data_cache_dir, num_workers=data_args.preprocessing_num_workers or 1)
    train = prepare_pretrain(data_args.train_files, tokenizer, options, **kwargs)
    eval_ = prepare_pretrain(data_args.validation_files, tokenizer, options, **kwargs) \
        if data_args.validation_files else None
    return PretrainData(tokenizer, train, eval_)


def main(argv: Sequence[str], lora_default: bool = False) -> str:
    started = time.time()
    model_args, data_args, lora_args, args = parse(
        (ModelArguments, PretrainDataArguments, LoraArguments, TrainingArguments), argv)
    lora_args.lora = lora_args.lora or lora_default
    checkpoint = resolve_resume(args.output_dir, args.resume, args.overwrite_output_dir, args.should_save)
    load_config(model_args)  # a wrong model path fails now, not after tokenizing

    with local_main_first(args, args.prepare_timeout, "tokenizing the text"):
        data = prepare_pretrain_data(model_args, data_args)
    if args.process_index == 0:
        print(f"lmforge: training text ({data.train.path})\n{data.train.stats.summary()}")
        if data.eval is not None:
            print(f"lmforge: validation text ({data.eval.path})\n{data.eval.stats.summary()}")
        if checkpoint:
            print(f"lmforge: resuming from {checkpoint}")

    transformers.set_seed(args.seed)
    model = load_model(model_args, data.tokenizer, args.flash_attn,
                       data_args.model_max_length or data_args.block_size, lora_args)
    if args.process_index == 0 and model_args.config_name:
        n = sum(p.numel() for p in model.parameters())
        print(f"lmforge: pretraining a new model from {model_args.config_name}: {n / 1e6:.2f}M parameters")
    if lora_args.lora:
        model = apply_lora(model, lora_args, args.gradient_checkpointing)
    if args.process_index == 0 and next(model.parameters()).is_cuda:
        print(f"lmforge: GPU memory after loading the model: {gpu_memory_gib():.2f} GiB")
    pad = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else data.tokenizer.eos_token_id
    train_dataset = data.train.dataset()
    eval_dataset = data.eval.dataset() if data.eval else None
    split = None
    if data_args.val_split:
        train_dataset, eval_dataset = split_dataset(train_dataset, data_args.val_split, args.seed)
        split = describe_split(eval_dataset, data_args.val_split, args.seed)
        if args.process_index == 0:
            print(f"lmforge: --val_split {data_args.val_split}: {split.records} of {data.train.stats.blocks} blocks "
                  f"held out for evaluation (drawn by --seed {args.seed})")
    blocks = train_dataset
    if data_args.pretrain_document_mask:
        eos = data.tokenizer.eos_token_id
        train_dataset = DocumentBlocks(train_dataset, eos)
        eval_dataset = DocumentBlocks(eval_dataset, eos) if eval_dataset is not None else None
        collator = PackedCollator(pad)
        args.remove_unused_columns = False  # keep document_ids for the attention mask
    else:
        collator = PaddedCollator(pad)
    tokens = int(record_lengths(blocks).sum())  # blocks train on every token (a padded last one: the collator masks)
    run_info = {
        "command": "pretrain", "flags": list(argv), "started": started,
        "config": key_flags(model_args, data_args, lora_args, args),
        "train_data": asdict(data.train.stats),
        "eval_data": asdict(data.eval.stats) if data.eval else None,
        "cache": data.train.path,
        "rows": len(blocks),
    }
    if split is not None:
        run_info["val_split"] = asdict(split)
        run_info["training"] = {"records": len(blocks), "tokens": tokens, "trained_tokens": tokens}
    # A block trains on every token and may be long: its first few hundred show the text is right.
    shown = blocks[0]["input_ids"][:256]
    whole = len(shown) == len(blocks[0]["input_ids"])
    title = "the first block" if whole else f"the first {len(shown)} tokens of the first block"
    preflight = Preflight(data.tokenizer, {"input_ids": shown}, tokens, tokens, data_args.block_size, title=title)
    return train_and_save(model, args, data.tokenizer, train_dataset, eval_dataset, collator, checkpoint,
                          template_end_of_turn(data.tokenizer), run_info, preflight=preflight)
