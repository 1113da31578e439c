"""The steps every training method takes, in order. A method (`sft.py`, `lora.py`, `dpo.py`,
`pretrain.py`) is a `Method`: its flags, its kind of record, and the few steps where it
differs; `run` is the rest, read top to bottom:

    flags → resume point → data (the data chain, `data/batches.py`) → model (+ LoRA)
          → batches → pre-flight check → Trainer (auto-resume) → final save + report
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
import transformers

from lmforge.config import TrainingArguments, expand_argv, parse, setup_process
from lmforge.data.batches import Batches, PreparedData, build_batches, prepare_data
from lmforge.data.encode import Kind
from lmforge.data.options import ChatOptions
from lmforge.data.pack import PackedDataset
from lmforge.data.sources import read_tools
from lmforge.data.store import Cached, SourceFile, source_files
from lmforge.data.templates import resolve_template
from lmforge.errors import LmforgeError
from lmforge.flags import DataArguments, LoraArguments, ModelArguments
from lmforge.logs import say
from lmforge.modeling.load import apply_lora, check_weights, gpu_memory_gib, load_config, load_model, load_tokenizer
from lmforge.modeling.optim import adapter_dtype
from lmforge.training.distributed import local_main_first
from lmforge.training.fast_path import Rows, choose_fast_path
from lmforge.training.fast_path import describe as describe_choices
from lmforge.training.graphs import graphs_unsupported
from lmforge.training.resume import read_trainer_state, resolve_resume, resume_policy
from lmforge.training.run import train_and_save
from lmforge.training.run_lock import RunLock
from lmforge.training.run_lock import describe as describe_holder
from lmforge.training.run_record import key_flags, read_run_info


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

    def data_files(self, flags: Flags) -> tuple[list[str], list[str]]:
        """The train and eval files of the command line."""
        return list(flags.data.data_path or []), list(flags.data.eval_data_path or [])

    def packing(self, flags: Flags) -> bool:
        return flags.data.packing

    def rows(self, flags: Flags) -> Rows:
        """What the batches hold, for the speed settings chosen on this machine."""
        return Rows.PACKED if self.packing(flags) else Rows.PADDED

    def batches(self, flags: Flags, data: PreparedData) -> Batches:
        """Stages 6-7 of the data chain: what the Trainer samples and how it batches it."""
        args = flags.args
        return build_batches(data, flags.data.model_max_length, packing=self.packing(flags),
                             val_split=flags.data.val_split, seed=args.seed,
                             pad_to_multiple_of=batch_length_multiple(args), fixed_length=args.compile_blocks)

    def context_length(self, flags: Flags, data: PreparedData) -> int:
        """The longest row the model is given: past its native context, RoPE is scaled to it."""
        return flags.data.model_max_length

    def build_model(self, flags: Flags, data: PreparedData, batches: Batches, model) -> Model:
        """The loaded model made into what trains (LoRA adapters, a reference for DPO)."""
        if flags.lora.lora:
            model = apply_lora(model, flags.lora, flags.args.gradient_checkpointing,
                               adapter_dtype(model.dtype, flags.args))
        return Model(model)

    def describe(self, flags: Flags, data: PreparedData, batches: Batches) -> dict:
        """This method's part of the run's record (lmforge_run.json, the report)."""
        return {}

    def preflight(self, flags: Flags, data: PreparedData, batches: Batches) -> Optional[transformers.TrainerCallback]:
        return None

    def callbacks(self, flags: Flags, data: PreparedData, batches: Batches) -> list:
        return []


GRAPH_LENGTH_MULTIPLE = 128  # batches of many lengths under --cuda_graphs: a graph per 128 tokens of length


def batch_length_multiple(args) -> int:
    """What a padded batch's length is rounded up to: a multiple of 8 for 16-bit tensor cores, of
    GRAPH_LENGTH_MULTIPLE when each length is a CUDA graph to record (1 in fp32)."""
    if getattr(args, "cuda_graphs", False):
        return GRAPH_LENGTH_MULTIPLE
    return 8 if args.bf16 or args.fp16 else 1


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
    # The fastest measured settings for the flags left unset; said now, before the first
    # recorded flags (key_flags) and the model load depend on them.
    if args.cuda_graphs and (why := graphs_unsupported(args, torch.cuda.is_available())):
        raise LmforgeError(f"--cuda_graphs True: {why}")
    speed = describe_choices(choose_fast_path(flags.model, args, method.rows(flags), quantized=flags.lora.q_lora))
    if speed:
        say("\n".join(speed))
    command_line = expand_argv(argv)  # a YAML run file as the flags it held
    finished = finished_run(args.output_dir, method.command, command_line)
    if finished is not None and args.resume:
        say(f"lmforge: {args.output_dir} already holds the result of this command ({finished}); nothing to do. "
            "Pass --resume False --overwrite_output_dir True to train it again from the start")
        return args.output_dir
    check_output_dir(args.output_dir)
    # One run per output directory, from before resume looks at it to after the final save.
    lock = RunLock(args.output_dir, " ".join(["lmforge", method.command, *command_line])) if main_process else None
    if lock is not None:
        lock.acquire()
        if lock.taken_over is not None:
            say(f"lmforge: took over the lock of {args.output_dir}, left by a run that is gone "
                f"({describe_holder(lock.taken_over)})")
    try:
        return _run_locked(method, flags, argv, command_line, started, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(method: Method, flags: Flags, argv: Sequence[str], command_line: list[str], started: float,
                callbacks: Sequence[transformers.TrainerCallback]) -> str:
    args = flags.args
    checkpoint = resolve_resume(args.output_dir, args.resume, args.overwrite_output_dir, args.should_save,
                                args.resume_from_checkpoint)
    data_changes: list[str] = []
    if checkpoint:
        # Flags and data changed since the run was started (or last resumed): applied, or refused now.
        info = read_run_info(args.output_dir)
        data_changes = check_resumed_data(checkpoint, info.get("data"), method, flags)
        callbacks = [*resume_policy(checkpoint, info.get("config"), key_flags(*flags.all()),
                                    data_compared=bool(info.get("data"))), *callbacks]
    load_config(flags.model)  # a wrong model path fails now, not after tokenizing
    check_weights(flags.model)

    # The first process of each machine tokenizes into the cache; the others then find it there.
    with local_main_first(args, args.prepare_timeout, method.tokenizing):
        data = method.prepare(flags)
    say(data.stats_lines())
    if checkpoint:
        say(f"lmforge: resuming from {checkpoint}")

    batches = method.batches(flags, data)
    describe_batches(batches, flags.data.val_split, args.seed, method.unit)

    transformers.set_seed(args.seed)  # a model built from a config starts from the same weights
    model = load_model(flags.model, data.tokenizer, args.flash_attn, method.context_length(flags, data), flags.lora,
                       progress_bars=not args.disable_tqdm)
    trained = method.build_model(flags, data, batches, model)
    if next(trained.model.parameters()).is_cuda:
        say(f"lmforge: GPU memory after loading the model: {gpu_memory_gib():.2f} GiB")

    run_info = {
        "command": method.command, "flags": list(argv), "command_line": command_line, "started": started,
        "config": key_flags(*flags.all()),
        "train_data": asdict(data.train.stats),
        "eval_data": asdict(data.eval.stats) if data.eval else None,
        "data": {"train": data_record(data.train), "eval": data_record(data.eval) if data.eval else None},
        **({"resumed_on_changed_data": data_changes} if data_changes else {}),
        "cache": data.train.path,
        "rows": len(batches.train),
        **method.describe(flags, data, batches),
    }
    return train_and_save(trained.model, args, data.tokenizer, batches.train, batches.eval, batches.collator,
                          checkpoint, data.end_of_turn_id, run_info, preflight=method.preflight(flags, data, batches),
                          callbacks=[*method.callbacks(flags, data, batches), *callbacks],
                          trainer_class=trained.trainer_class, trainer_kwargs=trained.trainer_kwargs)


def data_record(cached: Cached) -> dict:
    """What the data of a cache entry was, for a resumed run to compare: each file's digest
    (the same content under another path is the same data) and the counts."""
    stats = cached.stats
    return {"files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in cached.sources],
            "records": getattr(stats, "records", getattr(stats, "documents", None)), "tokens": stats.tokens}


def data_difference(saved: dict | None, now: Sequence[SourceFile], what: str) -> str | None:
    """How the files `now` differ from the recorded ones, in one phrase naming the file, or None."""
    files = (saved or {}).get("files") or []
    if [f["sha256"] for f in files] == [f.sha256 for f in now]:
        return None
    if len(files) != len(now):
        return f"the run started with {len(files)} {what} file(s), now {len(now)} are given"
    k = next(i for i, (a, b) in enumerate(zip(files, now)) if a["sha256"] != b.sha256)
    was, new = files[k], now[k]
    moved = f" (it was {was['path']})" if os.path.abspath(was["path"]) != os.path.abspath(new.path) else ""
    return (f"{new.path}{moved} is not the {what} data the run started with: {new.bytes:,} bytes now, "
            f"{was['bytes']:,} then (sha256 {new.sha256[:12]}, was {was['sha256'][:12]})")


def check_resumed_data(checkpoint: str, saved: dict | None, method: Method, flags: Flags) -> list[str]:
    """Refuse to resume on data whose content changed since the run started (the checkpoint's
    position in the epoch counts batches of the data it was trained on), in one line naming the
    file; with --resume_changed_data True go on, the epoch position then recomputed from the new
    data's size. Returns what changed (for the run record and the report). The files are read
    whole to digest them: a resume reads them again before tokenizing, once."""
    if not saved:
        return []
    train, eval_ = method.data_files(flags)
    suffixes = method.kind.suffixes
    changes = [d for d in (data_difference(saved.get("train"), source_files(train, suffixes), "training"),
                           data_difference(saved.get("eval"), source_files(eval_, suffixes) if eval_ else (),
                                           "evaluation") if saved.get("eval") or eval_ else None) if d]
    if not changes:
        return []
    if not flags.args.resume_changed_data:
        raise LmforgeError(f"resuming from {checkpoint}: {changes[0]}; run it with the data it started with, or "
                           "pass --resume_changed_data True to go on with this data (the position in the epoch is "
                           "then recomputed from its size)")
    say(f"lmforge: resuming on changed data (--resume_changed_data True): {'; '.join(changes)}; the position "
        "in the epoch is recomputed from the new data's size")
    return changes


def finished_run(output_dir: str, command: str, command_line: list[str]) -> str | None:
    """What `output_dir` holds when the same command line already ran to its end there (the
    final save is whole: its trainer_state.json is written last), else None. A rerun of a
    finished command then changes nothing instead of training past its last step."""
    info = read_run_info(output_dir)
    same = info.get("command") == command and _elsewhere(info.get("command_line") or []) == _elsewhere(command_line)
    state = read_trainer_state(output_dir) if same else None
    if state is None:
        return None
    return f"trained to step {state.get('global_step')} of {state.get('max_steps')}, saved"


def _elsewhere(command_line: list[str]) -> list[str]:
    """The command line without its --output_dir: a finished run moved or copied to another
    directory is still that run."""
    out: list[str] = []
    skip = False
    for token in command_line:
        if skip:
            skip = False
        elif token == "--output_dir":
            skip = True
        elif not token.startswith("--output_dir="):
            out.append(token)
    return out


def check_output_dir(path: str) -> None:
    """A directory the run can write to, made now: a read-only place fails here, in one line,
    not at the first checkpoint after the data and the model have loaded."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LmforgeError(f"--output_dir {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"--output_dir {path}: cannot create it: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LmforgeError(f"--output_dir {path}: not writable by this user")


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


def describe_batches(batches: Batches, val_split: float, seed: int, unit: str) -> None:
    """The log lines of the batching: the packing, and what --val_split held out."""
    rows, records = batches.train, batches.records
    if isinstance(rows, PackedDataset):
        plural = "row" if len(rows) == 1 else "rows"
        say(f"lmforge: packing: {len(records)} records into {len(rows)} {plural} of up to {rows.model_max_length} "
            "tokens")
    if batches.held_out is not None:
        held = len(batches.held_out)
        say(f"lmforge: --val_split {val_split}: {held} of {held + len(records)} {unit} held out for evaluation "
            f"(drawn by --seed {seed})")
