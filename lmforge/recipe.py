"""The steps every training method takes, in order. A method (`sft.py`, `lora.py`, `dpo.py`,
`pretrain.py`) is a `Method`: its flags, its kind of record, and the few steps where it
differs; `run` is the rest, read top to bottom:

    flags → resume point → data (the data chain, `data/batches.py`) → model (+ LoRA)
          → batches → pre-flight check → Trainer (auto-resume) → final save + report
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import transformers

from lmforge.config import DataArguments, LoraArguments, ModelArguments, TrainingArguments, parse, setup_process
from lmforge.data.batches import Batches, PreparedData, build_batches, prepare_data
from lmforge.data.encode import Kind
from lmforge.data.options import ChatOptions
from lmforge.data.pack import PackedDataset
from lmforge.data.sources import read_tools
from lmforge.data.templates import resolve_template
from lmforge.distributed import local_main_first
from lmforge.model import apply_lora, gpu_memory_gib, load_config, load_model, load_tokenizer
from lmforge.report import key_flags
from lmforge.train import resolve_resume, train_and_save


@dataclass
class Flags:
    """A method's parsed flags: model, data, LoRA, the method's own (DPO's), training."""

    model: ModelArguments
    data: Any
    lora: LoraArguments
    method: Any
    args: TrainingArguments

    def all(self) -> tuple:
        return tuple(o for o in (self.model, self.data, self.lora, self.method, self.args) if o is not None)


@dataclass
class Model:
    """What the model step hands to training: the model and how the Trainer runs it."""

    model: Any
    trainer_class: Optional[type] = None
    trainer_kwargs: Optional[dict] = None


class Method:
    """One training method: what `run` asks of it. The defaults are SFT's."""

    command: str
    kind: Kind
    data_arguments: type
    method_arguments: Optional[type] = None
    training_arguments: type = TrainingArguments
    lora_default = False
    tokenizing = "tokenizing the data"
    unit = "records"  # what a cached row is, in the log

    def check(self, flags: Flags) -> None:
        """Refuse, before anything is read, what this method cannot run."""

    def prepare(self, flags: Flags) -> PreparedData:
        """Stages 1-5 of the data chain for the train and eval files."""
        data = flags.data
        tokenizer = load_tokenizer(flags.model)
        template = resolve_template(tokenizer, data.template)
        return prepare_data(self.kind, tokenizer, template, chat_options(data), data.data_path, data.eval_data_path,
                            data.data_cache_dir, data.preprocessing_num_workers)

    def packing(self, flags: Flags) -> bool:
        return flags.data.packing

    def build_model(self, flags: Flags, data: PreparedData, batches: Batches, model) -> Model:
        """The loaded model made into what trains (LoRA adapters, a reference for DPO)."""
        if flags.lora.lora:
            model = apply_lora(model, flags.lora, flags.args.gradient_checkpointing)
        return Model(model)

    def describe(self, flags: Flags, data: PreparedData, batches: Batches) -> dict:
        """This method's part of the run's record (lmforge_run.json, the report)."""
        return {}

    def preflight(self, flags: Flags, data: PreparedData, batches: Batches) -> Optional[transformers.TrainerCallback]:
        return None

    def callbacks(self, flags: Flags, data: PreparedData, batches: Batches) -> list:
        return []


def parse_flags(method: Method, argv: Sequence[str]) -> Flags:
    classes = (ModelArguments, method.data_arguments, LoraArguments) + \
        ((method.method_arguments,) if method.method_arguments else ()) + (method.training_arguments,)
    parsed = list(parse(classes, argv))
    extra = parsed.pop(3) if method.method_arguments else None
    flags = Flags(parsed[0], parsed[1], parsed[2], extra, parsed[3])
    flags.lora.lora = flags.lora.lora or flags.lora.q_lora or method.lora_default
    return flags


def run(method: Method, argv: Sequence[str], callbacks: Sequence[transformers.TrainerCallback] = ()) -> str:
    """Train with `method` as the command line `argv` says; returns the output directory."""
    started = time.time()
    flags = parse_flags(method, argv)
    method.check(flags)
    args = flags.args
    setup_process(args)  # the environment, the accelerator, the launcher: after parsing, once
    main_process = args.process_index == 0
    log = print if main_process else lambda *_: None
    checkpoint = resolve_resume(args.output_dir, args.resume, args.overwrite_output_dir, args.should_save)
    load_config(flags.model)  # a wrong model path fails now, not after tokenizing

    # The first process of each machine tokenizes into the cache; the others then find it there.
    with local_main_first(args, args.prepare_timeout, method.tokenizing):
        data = method.prepare(flags)
    log(data.stats_lines())
    if checkpoint:
        log(f"lmforge: resuming from {checkpoint}")

    batches = build_batches(data, flags.data.model_max_length, packing=method.packing(flags),
                            val_split=flags.data.val_split, seed=args.seed,
                            pad_to_multiple_of=8 if args.bf16 or args.fp16 else 1, fixed_length=args.compile_blocks)
    describe_batches(batches, flags.data.val_split, args.seed, method.unit, log)

    transformers.set_seed(args.seed)  # a model built from a config starts from the same weights
    model = load_model(flags.model, data.tokenizer, args.flash_attn, flags.data.model_max_length, flags.lora)
    trained = method.build_model(flags, data, batches, model)
    if main_process and next(trained.model.parameters()).is_cuda:
        print(f"lmforge: GPU memory after loading the model: {gpu_memory_gib():.2f} GiB")

    run_info = {
        "command": method.command, "flags": list(argv), "started": started,
        "config": key_flags(*flags.all()),
        "train_data": asdict(data.train.stats),
        "eval_data": asdict(data.eval.stats) if data.eval else None,
        "cache": data.train.path,
        "rows": len(batches.train),
        **method.describe(flags, data, batches),
    }
    return train_and_save(trained.model, args, data.tokenizer, batches.train, batches.eval, batches.collator,
                          checkpoint, data.end_of_turn_id, run_info, preflight=method.preflight(flags, data, batches),
                          callbacks=[*method.callbacks(flags, data, batches), *callbacks],
                          trainer_class=trained.trainer_class, trainer_kwargs=trained.trainer_kwargs)


def chat_options(data: DataArguments) -> ChatOptions:
    """The options that decide the cached tokens of chat records and pairs, from the flags."""
    return ChatOptions(
        data_format=data.data_format,
        masking=data.masking,
        model_max_length=data.model_max_length,
        long_records=data.long_records,
        on_bad_record=data.on_bad_record,
        unrendered=data.unrendered,
        reasoning_turns=data.reasoning_turns,
        tools=read_tools(data.tools) if data.tools else None,
    )


def describe_batches(batches: Batches, val_split: float, seed: int, unit: str, log) -> None:
    """The log lines of the batching: the packing, and what --val_split held out."""
    rows, records = batches.train, batches.records
    if isinstance(rows, PackedDataset):
        log(f"lmforge: packing: {len(records)} records into {len(rows)} rows of up to {rows.model_max_length} tokens")
    if batches.held_out is not None:
        held = len(batches.held_out)
        log(f"lmforge: --val_split {val_split}: {held} of {held + len(records)} {unit} held out for evaluation "
            f"(drawn by --seed {seed})")
