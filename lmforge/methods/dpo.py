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
(`--precompute_ref_log_probs`, stored in the cache).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import transformers

from lmforge.config import (
    DpoArguments,
    LoraArguments,
    ModelArguments,
    PreferenceDataArguments,
    TrainingArguments,
    parse,
)
from lmforge.data.collate import PairCollator
from lmforge.data.preference import prepare_pairs
from lmforge.data.render import Renderer, end_of_turn_token_id
from lmforge.data.templates import resolve_template
from lmforge.distributed import local_main_first
from lmforge.errors import LmforgeError
from lmforge.methods.prepare import SftData, prepare_options, print_stats
from lmforge.model import apply_lora, gpu_memory_gib, load_config, load_model, load_tokenizer
from lmforge.preference import (
    DpoTrainer,
    disable_dropout,
    frozen_copy,
    reference_entry,
    with_reference_columns,
)
from lmforge.train import resolve_resume, train_and_save


def prepare_preference_data(model_args: ModelArguments, data_args: PreferenceDataArguments) -> SftData:
    """Tokenizer, template and the train / eval pair caches (built here or found)."""
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(tokenizer, data_args.template)
    options = prepare_options(data_args)
    kwargs = dict(fmt=data_args.data_format, cache_dir=data_args.data_cache_dir,
                  num_workers=data_args.preprocessing_num_workers)
    train = prepare_pairs(data_args.data_path, tokenizer, template, options, **kwargs)
    eval_ = prepare_pairs(data_args.eval_data_path, tokenizer, template, options, **kwargs) \
        if data_args.eval_data_path else None
    eot = end_of_turn_token_id(Renderer(tokenizer, template))
    return SftData(tokenizer, template, eot, train, eval_)


def check_reference_fits(lora_args: LoraArguments, dpo_args: DpoArguments, args: TrainingArguments) -> None:
    """A frozen copy is a whole model on every process: refused where the model is sharded."""
    sharded = args.fsdp or (getattr(args, "hf_deepspeed_config", None) is not None
                            and args.hf_deepspeed_config.is_zero3())
    if sharded and not lora_args.lora and not dpo_args.precompute_ref_log_probs:
        raise LmforgeError("full-parameter DPO under FSDP or ZeRO-3 would keep an unsharded frozen reference on "
                           "every GPU; pass --precompute_ref_log_probs True (reference computed once, before "
                           "training) or --lora True (the reference is the model with its adapter disabled)")


def main(argv: Sequence[str], callbacks: Sequence = ()) -> str:
    model_args, data_args, lora_args, dpo_args, args = parse(
        (ModelArguments, PreferenceDataArguments, LoraArguments, DpoArguments, TrainingArguments), argv)
    check_reference_fits(lora_args, dpo_args, args)
    checkpoint = resolve_resume(args.output_dir, args.resume, args.overwrite_output_dir, args.should_save)
    load_config(model_args)  # a wrong model path fails now, not after tokenizing
    main_process = args.process_index == 0
    log = print if main_process else lambda *_: None

    with local_main_first(args, args.prepare_timeout, "tokenizing the data"):
        data = prepare_preference_data(model_args, data_args)
    if main_process:
        print_stats(data)
        if checkpoint:
            print(f"lmforge: resuming from {checkpoint}")

    transformers.set_seed(args.seed)  # a model built from a config starts from the same weights
    model = load_model(model_args, data.tokenizer, args.flash_attn, data_args.model_max_length, lora_args)
    if dpo_args.disable_dropout:
        disable_dropout(model)
    multiple = 8 if args.bf16 or args.fp16 else 1
    collator = PairCollator(data.tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    train_dataset = data.train.dataset()
    eval_dataset = data.eval.dataset() if data.eval else None
    reference = None
    if dpo_args.precompute_ref_log_probs:
        # The model as loaded is the reference; its log-probs are cached beside the tokens.
        with local_main_first(args, args.prepare_timeout, "computing the reference log-probabilities"):
            fused = args.fused_loss
            train_dataset = with_reference_columns(train_dataset, reference_entry(
                model, data.train.entry, collator, args, fused, data_args.data_cache_dir, log))
            if eval_dataset is not None:
                eval_dataset = with_reference_columns(eval_dataset, reference_entry(
                    model, data.eval.entry, collator, args, fused, data_args.data_cache_dir, log))
    if lora_args.lora:
        model = apply_lora(model, lora_args, args.gradient_checkpointing)
    elif not dpo_args.precompute_ref_log_probs:
        reference = frozen_copy(model)
    if main_process and next(model.parameters()).is_cuda:
        print(f"lmforge: GPU memory after loading the model: {gpu_memory_gib():.2f} GiB")
    args.remove_unused_columns = False  # the pair columns are not model inputs
    args.prediction_loss_only = True
    log(f"lmforge: DPO ({dpo_args.loss_type.value}, beta {dpo_args.beta}); reference: "
        + ("precomputed" if dpo_args.precompute_ref_log_probs else "the model with its adapter disabled"
           if lora_args.lora else "a frozen copy of the starting model"))
    run_info = {
        "train_data": asdict(data.train.stats),
        "eval_data": asdict(data.eval.stats) if data.eval else None,
        "cache": data.train.path,
        "pairs": len(train_dataset),
        "dpo": {k: getattr(v, "value", v) for k, v in asdict(dpo_args).items()},
    }
    return train_and_save(model, args, data.tokenizer, train_dataset, eval_dataset, collator, checkpoint,
                          data.end_of_turn_id, run_info, trainer_class=DpoTrainer,
                          trainer_kwargs={"dpo": dpo_args, "reference": reference}, callbacks=callbacks)
