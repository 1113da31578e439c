"""`lmforge prepare`: tokenize conversations into the cache, print the counts, optionally dump
records as JSONL or show them with their loss mask. Takes the command line of `lmforge sft`
(which runs exactly this before training); the training flags matter to --show only.

    lmforge prepare --data_path data.json --tokenizer_name TOK --output_dir out --dump first.jsonl
    lmforge prepare --data_path data.json --tokenizer_name TOK --show 3     # the pre-flight check
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from lmforge.config import DataArguments, LoraArguments, ModelArguments, TrainingArguments, parse
from lmforge.data.render import Renderer, end_of_turn_token_id
from lmforge.data.sft import PrepareOptions, SftCache, dump_records, prepare, read_tools
from lmforge.data.split import describe_split, length_histogram, record_lengths, trained_counts
from lmforge.data.templates import resolve_template
from lmforge.model import load_tokenizer


@dataclass
class SftData:
    tokenizer: object
    chat_template: str
    end_of_turn_id: Optional[int]
    train: SftCache
    eval: Optional[SftCache]


def prepare_options(data_args: DataArguments) -> PrepareOptions:
    return PrepareOptions(
        data_format=data_args.data_format,
        masking=data_args.masking,
        model_max_length=data_args.model_max_length,
        long_records=data_args.long_records,
        on_bad_record=data_args.on_bad_record,
        unrendered=data_args.unrendered,
        reasoning_turns=data_args.reasoning_turns,
        tools=read_tools(data_args.tools) if data_args.tools else None,
    )


def prepare_sft_data(model_args: ModelArguments, data_args: DataArguments) -> SftData:
    """Tokenizer, template and the train / eval token caches (built here or found)."""
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(tokenizer, data_args.template)
    options = prepare_options(data_args)
    kwargs = dict(cache_dir=data_args.data_cache_dir, num_workers=data_args.preprocessing_num_workers)
    train = prepare(data_args.data_path, tokenizer, template, options, **kwargs)
    eval_ = prepare(data_args.eval_data_path, tokenizer, template, options, **kwargs) if data_args.eval_data_path else None
    eot = end_of_turn_token_id(Renderer(tokenizer, template, options.masking))
    return SftData(tokenizer, template, eot, train, eval_)


def print_stats(data: SftData) -> None:
    print(f"lmforge: training data ({data.train.path})\n{data.train.stats.summary()}")
    if data.eval is not None:
        print(f"lmforge: eval data ({data.eval.path})\n{data.eval.stats.summary()}")


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


@dataclass
class PrepareArguments:
    dump: Optional[str] = field(default=None, metadata={"help": "Write the first --dump_n records here as JSONL."})
    dump_n: int = field(default=10, metadata={"help": "How many records --dump writes."})
    show: int = field(
        default=0,
        metadata={"help": "Print the first N training records with the tokens that carry loss marked, the "
                          "optimizer steps, tokens per step and estimated memory the same command line would "
                          "train with (the pre-flight check of lmforge sft), without training."},
    )


@dataclass
class PrepareTrainingArguments(TrainingArguments):
    output_dir: Optional[str] = field(
        default=".", metadata={"help": "Accepted so sft command lines work as is; prepare writes nothing there."})


def show(data: SftData, model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
         args: TrainingArguments, n: int) -> None:
    """`--show N`: what `lmforge sft` with these flags would print before its first step."""
    from lmforge.methods.sft import batches
    from lmforge.preflight import make_plan, optimizer_steps, plan_lines, show_example, use_color

    train, _, _ = batches(data, data_args, args)
    records = getattr(train, "dataset", train)
    color = use_color()
    for i in range(min(n, len(records))):
        print("lmforge: " + show_example(data.tokenizer, records[i], f"training record {i + 1} of {len(records)}",
                                         color))
    steps, per_epoch = optimizer_steps(len(train), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                       args.world_size, args.num_train_epochs, args.max_steps,
                                       args.dataloader_drop_last)
    tokens = int(record_lengths(records).sum())
    memory, why = meta_memory_estimate(model_args, lora_args, data.tokenizer)
    plan = make_plan(args, steps, per_epoch, tokens, int(trained_counts(records).sum()),
                     data_args.model_max_length, memory)
    lines = plan_lines(plan, args) + ([f"estimated memory: {why}"] if why else [])
    print("lmforge: trained with these flags:\n" + "\n".join("  " + line for line in lines))


def meta_memory_estimate(model_args: ModelArguments, lora_args: LoraArguments, tokenizer):
    """(MemoryEstimate, None), or (None, why not): the model built on the meta device (no
    memory, no weights read) from its config, with its LoRA adapters when asked."""
    import torch
    import transformers

    from lmforge.errors import LmforgeError
    from lmforge.model import DTYPES, apply_lora, load_config
    from lmforge.preflight import estimate_memory

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


def main(argv: Sequence[str]) -> SftData:
    model_args, data_args, lora_args, train_args, args = parse(
        (ModelArguments, DataArguments, LoraArguments, PrepareTrainingArguments, PrepareArguments), argv)
    lora_args.lora = lora_args.lora or lora_args.q_lora
    data = prepare_sft_data(model_args, data_args)
    print_stats(data)
    if args.dump:
        n = dump_records(data.train, args.dump, args.dump_n)
        print(f"lmforge: wrote {n} records to {args.dump}")
    if args.show:
        show(data, model_args, data_args, lora_args, train_args, args.show)
    return data
