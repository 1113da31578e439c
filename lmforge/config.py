"""Parsing: flags and YAML run files into the dataclasses of `flags.py`, and transformers'
TrainingArguments joined with lmforge's training flags.

Parsing only parses: values are read, checked and completed here, and nothing outside the
returned objects changes. What a run does to its process (environment variables, the
accelerator's settings, the notes a user should see about the machine) is `setup_process`,
one explicit step the methods take after parsing. FastChat's and happy-llm's command lines
(every `TrainingArguments` flag among them) parse as they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import transformers

from lmforge.errors import LmforgeError
from lmforge.flags import DataArguments, DpoTrainingFlags, LoraArguments, PretrainDataArguments, TrainingFlags
from lmforge.logs import say

REPORT_PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard", "mlflow": "mlflow",
                   "trackio": "trackio", "comet_ml": "comet_ml", "clearml": "clearml"}
SHIPPED_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def shipped_deepspeed_config(name: str) -> str:
    """`--deepspeed zero2` (or zero2_offload, zero3, zero3_offload) names a config shipped in
    lmforge/configs; anything else is a path."""
    path = os.path.join(SHIPPED_CONFIGS, f"ds_{name}.json")
    return path if os.path.isfile(path) else name


def shipped_fsdp_config(name: str) -> str:
    """`--fsdp_config fsdp_full_shard` (or fsdp_full_shard_offload) names a config shipped in
    lmforge/configs; anything else is a path."""
    path = os.path.join(SHIPPED_CONFIGS, f"{name}.json")
    return path if os.path.isfile(path) and os.path.basename(name) == name else name


DEFAULT_FSDP_CONFIG = "fsdp_full_shard"

# The words of FastChat's `--fsdp "full_shard auto_wrap offload"`, as FSDP2 settings. transformers
# still translates them itself, but calls that deprecated; lmforge keeps FastChat's spelling.
FSDP_WORDS: dict[str, tuple[str, bool] | None] = {
    "full_shard": ("reshard_after_forward", True),  # parameters sharded again after each layer's forward
    "shard_grad_op": ("reshard_after_forward", False),  # kept whole from forward to backward
    "offload": ("cpu_offload", True),
    "auto_wrap": None,  # every decoder layer its own FSDP unit: the shipped configs' policy already
}


def fsdp_enabled(value) -> bool:
    """--fsdp is a string (FastChat's words) or True (bare flag); "false" / "" mean off."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "no", "0", "none")
    return bool(value)


def fsdp_config_from_flags(fsdp, config, layer_classes: str | None) -> dict:
    """The FSDP2 config a run uses: `--fsdp_config` (a path, a shipped name, a dict; default the
    shipped fsdp_full_shard.json), with the words of `--fsdp` and
    `--fsdp_transformer_layer_cls_to_wrap` applied over it (the command line is the more specific)."""
    if config is None:
        config = shipped_fsdp_config(DEFAULT_FSDP_CONFIG)
    if isinstance(config, str):
        config = read_json_object(shipped_fsdp_config(config), "--fsdp_config")
    # Accelerate-style keys ("fsdp_cpu_offload") mean the same as the plain ones.
    config = {k[len("fsdp_"):] if k.startswith("fsdp_") else k: v for k, v in dict(config).items()}
    words = fsdp.split() if isinstance(fsdp, str) else []
    if int(config.get("version", 2)) == 2:
        for word in words:
            if word not in FSDP_WORDS:
                raise LmforgeError(f"--fsdp {fsdp!r}: {word!r} is not an FSDP2 option; lmforge runs FSDP2, which "
                                   f"takes {', '.join(FSDP_WORDS)}")
            if FSDP_WORDS[word] is not None:
                key, value = FSDP_WORDS[word]
                config[key] = value
    if layer_classes:
        config["transformer_layer_cls_to_wrap"] = [c for c in layer_classes.split(",") if c]
    return config


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def default_reporters() -> str:
    """`--report_to auto`: TensorBoard when it is installed (its event files go under
    OUTPUT_DIR/runs), else no logging backend; wandb, swanlab and mlflow only when asked for."""
    return "tensorboard" if _installed("tensorboard") else "none"


def _check_reporters(report_to) -> None:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = REPORT_PACKAGES.get(name)
        if package and not _installed(package):
            raise LmforgeError(f"--report_to {name} needs the {package} package: pip install {package}")


@dataclass
class TrainingArguments(TrainingFlags, transformers.TrainingArguments):
    """transformers' TrainingArguments with lmforge's training flags (`flags.TrainingFlags`),
    decided for this machine after parsing: the process' notes, the CPU fallback, FSDP's
    settings and backends, the DeepSpeed config file, the logging backends."""

    def __post_init__(self):
        self.notes: list[str] = []  # said to the user by `setup_process`, once, by the main process
        self.check()
        if self.output_dir is None or not str(self.output_dir).strip():
            # transformers would default to ./trainer_output, a directory the user never named.
            raise LmforgeError("--output_dir is required: the directory checkpoints and the trained model go to")
        check_training_values(self)
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio:
            self.warmup_steps = self.warmup_ratio
        if not fsdp_enabled(self.fsdp):
            self.fsdp = None
        if self.fsdp and self.deepspeed:
            raise LmforgeError("--fsdp and --deepspeed are two ways to shard a model; pass one of them")
        self.fsdp_requested = self.fsdp  # the flag as given, for the checks of what it combines with
        self._decide_for_machine()
        if self.deepspeed:
            # DeepSpeed's distributed set-up, run from here, prints a build notice of its own on
            # stdout ("... deepspeed_shm_comm_op built successfully"): not an event of this run.
            with contextlib.redirect_stdout(io.StringIO()):
                super().__post_init__()
        else:
            super().__post_init__()

    def _decide_for_machine(self) -> None:
        """What the flags mean on this machine and launch: FSDP in one process or with CPU
        tensors, the DeepSpeed config file and package, the logging backends installed, the CPU
        fallback. Decided here, before transformers' own __post_init__, because that one acts on
        them at once (it refuses --bf16 without a GPU unless use_cpu is already set, and starts
        DeepSpeed's and the process group's set-up)."""
        if self.fsdp and launched_processes() <= 1:
            # FastChat's command line carries --fsdp; one process has nothing to shard across
            # (accelerate refuses FSDP outside distributed training, after everything has loaded).
            # Its words are still checked, so the command line is right for the launcher.
            fsdp_config_from_flags(self.fsdp, self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)
            self.notes.append(f"--fsdp {self.fsdp!r} in one process: nothing to shard across, so this trains "
                              "without FSDP; launch with torchrun --nproc_per_node N to shard over N GPUs")
            self.fsdp = None
        if self.fsdp:
            self._configure_fsdp()
        elif self.fsdp_transformer_layer_cls_to_wrap:
            self.fsdp_config = fsdp_config_from_flags(None, self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)
        if self.deepspeed and isinstance(self.deepspeed, str):
            self.deepspeed = shipped_deepspeed_config(self.deepspeed)
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise LmforgeError(f"--deepspeed {self.deepspeed} needs the deepspeed package: pip install deepspeed")
            if not os.path.isfile(self.deepspeed):
                raise LmforgeError(f"--deepspeed {self.deepspeed}: no such file (shipped: zero2, zero2_offload, "
                                   "zero3, zero3_offload)")
            read_json_object(self.deepspeed, "--deepspeed")
        if self.report_to == "auto":
            self.report_to = default_reporters()
        elif isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        _check_reporters(self.report_to)
        self._cpu_fallback()

    def _cpu_fallback(self) -> None:
        """A GPU command line (--bf16 True) on a machine without a GPU trains on the CPU, with
        bf16 autocast there, instead of stopping: FastChat's and happy-llm's commands run anywhere as written."""
        import torch

        if torch.cuda.is_available():
            return
        if self.bf16 and not self.use_cpu:
            self.use_cpu = True
            self.notes.append("no GPU: training on the CPU (bf16 autocast)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not self.deepspeed:
            # Under a launcher without a GPU, accelerate makes a process group (gloo) only for
            # use_cpu; otherwise every process would train alone, on the whole data, into the
            # same output directory. (DeepSpeed makes its own, through its CPU accelerator.)
            self.use_cpu = True
        if self.tf32:
            self.tf32 = None  # TF32 is a mode of NVIDIA matrix units; nothing to set on a CPU

    def _configure_fsdp(self) -> None:
        """The FSDP2 settings from the flags (`fsdp_config_from_flags`), and a process group that
        can also reduce CPU tensors where FSDP needs that."""
        import torch

        config = fsdp_config_from_flags(self.fsdp, self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)
        self.fsdp_config = config
        if int(config.get("version", 2)) == 2:
            self.fsdp = True  # the words are in the config now; transformers' own translation is deprecated
        if not torch.cuda.is_available() or self.use_cpu:
            self.notes.append("--fsdp on a machine without a GPU: accelerate enables FSDP for GPU backends only, so "
                              "this trains as DDP (every process holds the whole model)")
            return
        if self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # With CPU offload the sharded parameters, gradients and optimizer state live on the CPU: the
            # gradient-norm all-reduce and the gathers of a full state dict then run on CPU tensors, which
            # NCCL cannot reduce. `accelerate launch` sets up this pair of backends for FSDP; torchrun
            # and a bare TrainingArguments do not.
            self.ddp_backend = "cuda:nccl,cpu:gloo"


def check_training_values(args: TrainingArguments) -> None:
    """Values that would fail late (a ZeroDivisionError, a torch traceback after the model has
    loaded) or train nothing while exiting 0, refused at parsing in one line naming the flag."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise LmforgeError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.learning_rate > 0:
        raise LmforgeError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.max_steps == 0:
        raise LmforgeError("--max_steps 0 trains nothing: pass a positive number of optimizer steps, or leave it "
                           "out to train --num_train_epochs epochs")
    if args.max_steps < 0 and not args.num_train_epochs > 0:
        raise LmforgeError(f"--num_train_epochs {args.num_train_epochs} trains nothing: pass a positive number of "
                           "epochs (or --max_steps)")
    if args.save_steps is not None and args.save_steps <= 0:
        raise LmforgeError(f"--save_steps must be positive, got {args.save_steps}")


@dataclass
class DpoTrainingArguments(DpoTrainingFlags, TrainingArguments):
    """`lmforge dpo`'s training arguments: transformers' with `flags.DpoTrainingFlags`."""


def launched_processes() -> int:
    """How many processes train together: the process group's size once one exists, else what
    the launcher (torchrun, deepspeed, accelerate) put in WORLD_SIZE; 1 without a launcher."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_process(args: TrainingArguments) -> None:
    """What parsed flags do to this process, in one place, after parsing: the environment the
    libraries read, the accelerator's copy settings, and the notes about the machine (printed
    by the main process)."""
    if args.logging_dir:
        # transformers 5 reads the TensorBoard directory from the environment.
        os.environ["TENSORBOARD_LOGGING_DIR"] = args.logging_dir
    if args.dataloader_pin_memory and not torch_cuda_available():
        # Pinned memory is for copies to a GPU; without one torch warns at every data loader.
        args.dataloader_pin_memory = False
    if args.dataloader_pin_memory:
        # Each batch goes to the GPU without the host waiting for the copy (the data loader
        # leaves it in pinned memory): a blocking copy would stall the host at every step,
        # and a small model's step is bound by how fast the host queues its kernels.
        args.accelerator_config.non_blocking = True
    for note in args.notes:
        say(f"lmforge: {note}")


def read_json_object(path: str, flag: str) -> dict:
    """A JSON config file named by `flag`, which must hold an object; a file that does not
    parse is named with the line and column, instead of a JSONDecodeError deep in the loader."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{flag} {path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{flag} {path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not isinstance(value, dict):
        raise LmforgeError(f"{flag} {path}: expected a JSON object, got {type(value).__name__}")
    return value


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML run file into flags, so flags after it on the command line override it. A
    value is a scalar, a list of scalars (a flag that takes several), or a mapping for the flags
    that take a JSON object (`fsdp_config`, `deepspeed`, `lr_scheduler_kwargs`, ...); every
    error names the file (and the key)."""
    import yaml

    if os.path.isdir(path):
        raise LmforgeError(f"{path}: is a directory, not a run file")
    if not os.path.isfile(path):
        raise LmforgeError(f"{path}: run file does not exist")
    try:
        with open(path, "rb") as f:  # PyYAML tells UTF-8 from UTF-16 by the bytes
            values = yaml.safe_load(f)
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read the run file: {e.strerror}") from None
    except yaml.reader.ReaderError as e:  # not UTF-8, or a character YAML does not allow
        if e.encoding and e.encoding != "unicode":  # PyYAML's "unicode": a character it refuses
            raise LmforgeError(f"{path}: not valid {e.encoding.upper()} (byte {e.position}: {e.reason})") from None
        raise LmforgeError(f"{path}, character {e.position}: not valid YAML: {e.reason}") from None
    except yaml.YAMLError as e:
        # PyYAML's own text spans several lines and repeats the file name; keep its position
        # and its one-line reason.
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LmforgeError(f"{path}{where}: not valid YAML: {reason}") from None
    if values is None:  # an empty file (or only comments): no flags
        values = {}
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: a run file must map flag names to values")
    takes_mapping = set(getattr(transformers.TrainingArguments, "_VALID_DICT_FIELDS", ())) | {
        "accelerator_config", "fsdp_config", "deepspeed", "gradient_checkpointing_kwargs", "lr_scheduler_kwargs"}
    kinds = {type(None): "null", dict: "mapping", list: "list"}
    argv: list[str] = []
    for key, value in values.items():
        if not isinstance(key, str) or not key.strip():
            raise LmforgeError(f"{path}: the key {key!r} is not a flag name")
        if value is None:
            raise LmforgeError(f"{path}: {key!r} is null (no value); give it a value, or leave the key out for "
                               "its default")
        argv.append(f"--{key}")
        if isinstance(value, list):
            if not value:
                raise LmforgeError(f"{path}: {key!r} is an empty list; give it one or more values, or leave the "
                                   "key out for its default")
            inner = next((kinds[type(v)] for v in value if type(v) in kinds), None)
            if inner:
                raise LmforgeError(f"{path}: {key!r} is a list holding a {inner}; a flag takes one value or a "
                                   "list of plain values")
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            if key not in takes_mapping:
                raise LmforgeError(f"{path}: {key!r} is a mapping; a flag takes one value or a list of values (only "
                                   f"{', '.join(sorted(takes_mapping))} take a mapping)")
            argv.append(json.dumps(value, default=str))
        else:
            argv.append(str(value))
    return argv


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)


def expand_argv(argv: Sequence[str]) -> list[str]:
    """A leading `run.yaml` becomes flags; the rest of the command line follows it. A negative
    number after a flag (`--learning_rate -1e-3`) is joined to it (`--learning_rate=-1e-3`):
    argparse takes "-1e-3" for a flag of its own and says only "expected one argument"."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_to_argv(argv[0]) + argv[1:]
    joined: list[str] = []
    for token in argv:
        if (joined and NEGATIVE_NUMBER.fullmatch(token) and joined[-1].startswith("--") and "=" not in joined[-1]):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


class _ArgumentParser(transformers.HfArgumentParser):
    """argparse prints the whole usage (hundreds of TrainingArguments flags) above a bad value;
    raised as an LmforgeError the one line that matters is printed on its own."""

    def error(self, message: str):
        raise LmforgeError(message)


def check_combinations(objs: Sequence[Any]) -> None:
    """Flags that are each valid but cannot work together, refused before any data is read."""
    by_type = {type(o): o for o in objs}
    lora = next((o for t, o in by_type.items() if issubclass(t, LoraArguments)), None)
    args = next((o for t, o in by_type.items() if issubclass(t, TrainingArguments)), None)
    data = next((o for t, o in by_type.items() if issubclass(t, (DataArguments, PretrainDataArguments))), None)
    if args is None:
        return
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if lora is not None and lora.q_lora and getattr(args, "fsdp_requested", args.fsdp):
        # Not verified here: FSDP2 with bitsandbytes' 4-bit weights needs a floating quant storage and
        # flat 4-bit parameters that survive sharding; lmforge's QLoRA loads the 4-bit base onto each
        # process' GPU (a device_map) instead, which is what DDP and ZeRO-2 expect.
        raise LmforgeError(
            "--q_lora cannot run under --fsdp: lmforge's QLoRA keeps the 4-bit base model whole on every GPU. "
            "Supported: QLoRA on one GPU, on several GPUs with DDP (torchrun, no --fsdp / --deepspeed), or with "
            "--deepspeed zero2 / zero2_offload; for a model too large for one GPU use --lora True (bf16 base) "
            "with --fsdp or --deepspeed zero3")
    if lora is not None and lora.q_lora and ds_config is not None and ds_config.is_zero3():
        # lmforge's QLoRA loads the whole 4-bit base onto each process' GPU (a device_map), which
        # ZeRO-3 refuses: it partitions (and with offload moves to CPU) the parameters itself.
        offload = " with CPU offload" if ds_config.is_offload() else ""
        raise LmforgeError(
            f"--q_lora cannot run under --deepspeed {args.deepspeed} (ZeRO stage 3{offload}): QLoRA keeps the "
            "4-bit base model whole on every GPU, ZeRO-3 partitions parameters; use --deepspeed zero2 or "
            "zero2_offload")
    if data is not None and args.eval_strategy != transformers.IntervalStrategy.NO:
        held_out, flag = ((data.eval_data_path, "--eval_data_path") if isinstance(data, DataArguments)
                          else (data.validation_files, "--validation_files"))
        if not held_out and not data.val_split:
            # The Trainer would refuse this only after the data is tokenized, with a traceback.
            raise LmforgeError(f"--eval_strategy {args.eval_strategy.value} needs held-out data: pass {flag} "
                               "or --val_split (or --eval_strategy no)")


def parse(dataclasses_: tuple[type, ...], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse flags (and a leading YAML file) into the given dataclasses; an unknown flag, a bad
    value or an impossible combination is an LmforgeError that names it."""
    parser = _ArgumentParser(dataclasses_)
    try:
        parsed = parser.parse_args_into_dataclasses(args=expand_argv(argv), return_remaining_strings=True)
    except ValueError as e:
        # transformers' TrainingArguments checks its values in __post_init__ with ValueError
        # (e.g. --bf16 with --fp16); those are about the flags given here.
        raise LmforgeError(str(e).strip()) from None
    *objs, remaining = parsed
    if remaining:
        raise LmforgeError(f"unknown arguments: {' '.join(remaining)}")
    check_combinations(objs)
    return tuple(objs)
