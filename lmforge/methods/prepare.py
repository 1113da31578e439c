"""`lmforge prepare`: tokenize conversations into the cache, print the counts, optionally dump
records as JSONL. Takes the same data, tokenizer and template flags as `lmforge sft`, which
runs exactly this before training.

    lmforge prepare --data_path data.json --tokenizer_name TOK --output_dir out --dump first.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from lmforge.config import DataArguments, ModelArguments, parse
from lmforge.data.render import Renderer, end_of_turn_token_id
from lmforge.data.sft import PrepareOptions, SftCache, dump_records, prepare
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


@dataclass
class PrepareArguments:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Accepted so sft command lines work as is."})
    dump: Optional[str] = field(default=None, metadata={"help": "Write the first --dump_n records here as JSONL."})
    dump_n: int = field(default=10, metadata={"help": "How many records --dump writes."})


def main(argv: Sequence[str]) -> SftData:
    model_args, data_args, args = parse((ModelArguments, DataArguments, PrepareArguments), argv)
    data = prepare_sft_data(model_args, data_args)
    print_stats(data)
    if args.dump:
        n = dump_records(data.train, args.dump, args.dump_n)
        print(f"lmforge: wrote {n} records to {args.dump}")
    return data
