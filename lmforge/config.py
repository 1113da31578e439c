"""Typed configuration: model, data and training arguments, parsed from flags and YAML.

Flag names follow FastChat's and happy-llm's scripts (`--model_name_or_path`, `--data_path`,
`--model_max_length`, `--lazy_preprocess`, every `TrainingArguments` flag), so their command
lines run with `lmforge sft` in place of the script.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import transformers

from lmforge.data.cache import LongRecords
from lmforge.data.formats import DataFormat, OnBadRecord
from lmforge.data.render import MaskingStrategy
from lmforge.errors import LmforgeError


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Directory of a model to start from (weights are loaded)."}
    )
    config_name: Optional[str] = field(
        default=None,
        metadata={"help": "A model config (directory or JSON file): the model is built from it with random "
                          "weights, i.e. trained from scratch."},
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer directory; defaults to --model_name_or_path."}
    )
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are held in while training: float32 (with --bf16 the Trainer runs "
                          "bf16 autocast over fp32 master weights), bfloat16, float16 or auto (as stored).",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel, passed to transformers: sdpa, eager, flash_attention_2, flex_attention."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model/tokenizer code from the model directory to run. Off by default."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Accepted for FastChat compatibility: the transformers cache directory."}
    )


@dataclass
class DataArguments:
    data_path: list[str] = field(
        default_factory=list, metadata={"help": "Training data: one or more .json / .jsonl / .parquet files."}
    )
    eval_data_path: list[str] = field(
        default_factory=list, metadata={"help": "Held-out data evaluated at --eval_steps (same formats)."}
    )
    data_format: DataFormat = field(
        default=DataFormat.AUTO,
        metadata={"help": "sharegpt (conversations/from/value), openai (messages/role/content), alpaca "
                          "(instruction/input/output), or auto: detected from the first record."},
    )
    template: str = field(
        default="auto",
        metadata={"help": "Chat template: auto (the tokenizer's own jinja template) or a built-in: "
                          "vicuna_v1.1, chatml (happy-llm), chatml_user."},
    )
    masking: MaskingStrategy = field(
        default=MaskingStrategy.ASSISTANT,
        metadata={"help": "Tokens that carry loss: assistant (every assistant turn), last_assistant, all."},
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest sequence in tokens; longer records follow --long_records."}
    )
    long_records: LongRecords = field(
        default=LongRecords.TRUNCATE,
        metadata={"help": "Records longer than --model_max_length: truncate (keep the start) or drop. "
                          "Both are counted and reported."},
    )
    on_bad_record: OnBadRecord = field(
        default=OnBadRecord.ERROR,
        metadata={"help": "error: stop at the first bad record, naming it; skip: leave bad records out, "
                          "counted by reason in the report."},
    )
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Token cache root (default: $LMFORGE_CACHE or ~/.cache/lmforge)."}
    )
    preprocessing_num_workers: int = field(
        default=1, metadata={"help": "Processes that tokenize the data into the cache."}
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "Accepted for FastChat compatibility. lmforge always tokenizes once into a "
                          "memory-mapped cache, which is both lazy in memory and fast."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments, plus the flags lmforge's runs add."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir that holds no checkpoint (its files may be "
                          "overwritten). With checkpoints present, training resumes instead."},
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Continue from the newest complete checkpoint-* in --output_dir when one exists."},
    )
    flash_attn: bool = field(
        default=False,
        metadata={"help": "FastChat's flag: the same as --attn_implementation flash_attention_2."},
    )


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML run file into flags, so flags after it on the command line override it."""
    import yaml

    if not os.path.isfile(path):
        raise LmforgeError(f"{path}: run file does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: a run file must map flag names to values")
    argv: list[str] = []
    for key, value in values.items():
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def expand_argv(argv: Sequence[str]) -> list[str]:
    """A leading `run.yaml` becomes flags; the rest of the command line follows it."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        return yaml_to_argv(argv[0]) + argv[1:]
    return argv


def parse(dataclasses_: tuple[type, ...], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse flags (and a leading YAML file) into the given dataclasses; unknown flags are an
    error that names them."""
    parser = transformers.HfArgumentParser(dataclasses_)
    parsed = parser.parse_args_into_dataclasses(args=expand_argv(argv), return_remaining_strings=True)
    *objs, remaining = parsed
    if remaining:
        raise LmforgeError(f"unknown arguments: {' '.join(remaining)}")
    return tuple(objs)
