"""`lmforge COMMAND --help` without importing the command: lmforge's flags first, grouped, from
the dataclasses of `lmforge.flags`; the Trainer's behind --help_all."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import sys
import textwrap
import types
import typing
from typing import Any, NamedTuple, Optional, Sequence

from lmforge.commands import COMMANDS

# `lmforge COMMAND --help` imports `lmforge.flags` alone: every flag lmforge adds is a field of a
# dataclass there, a module that imports neither torch nor transformers (importing a command
# module would, seconds before one line is printed). The Trainer's own flags, transformers'
# TrainingArguments, are listed by --help_all, which imports transformers. tests/test_help.py
# checks the table HELP against what each command parses.

_FLAGS = "lmforge.flags"
_RUN_FILE = ("A leading run.yaml holds flags; flags after it override it: lmforge {command} run.yaml "
             "--learning_rate 1e-5.")


class _Help(NamedTuple):
    usage: str  # what follows `lmforge COMMAND` on the usage line
    groups: tuple[tuple[str, str], ...]  # (heading, "module:Class"), in the order the command parses them
    note: str = ""
    shown_defaults: tuple[tuple[str, Any], ...] = ()  # a command's own default for a flag (lora: --lora True)


def _training(data: str, method: Optional[tuple[str, str]] = None,
              training: str = f"{_FLAGS}:TrainingFlags") -> tuple[tuple[str, str], ...]:
    """A training method's groups, as `recipe.parse_flags` parses them: model, data, LoRA, the
    method's own, and lmforge's part of the training arguments (the Trainer's come after)."""
    groups = [("model", f"{_FLAGS}:ModelArguments"), ("data", data), ("LoRA", f"{_FLAGS}:LoraArguments")]
    return (*groups, *([method] if method else []), ("speed / run", training))


HELP: dict[str, _Help] = {
    "sft": _Help("[flags]", _training(f"{_FLAGS}:DataArguments"), _RUN_FILE),
    "lora": _Help("[flags]", _training(f"{_FLAGS}:DataArguments"),
                  "`lmforge sft` with --lora True. " + _RUN_FILE, (("lora", True),)),
    "dpo": _Help("[flags]", _training(f"{_FLAGS}:PreferenceDataArguments", ("DPO", f"{_FLAGS}:DpoArguments"),
                                      f"{_FLAGS}:DpoTrainingFlags"), _RUN_FILE),
    "grpo": _Help("[flags]", _training(f"{_FLAGS}:DataArguments", ("GRPO", f"{_FLAGS}:GrpoArguments")),
                  "Prompts in any chat format lmforge reads; a record's other columns reach the reward functions. "
                  + _RUN_FILE),
    "pretrain": _Help("[flags]", _training(f"{_FLAGS}:PretrainDataArguments"), _RUN_FILE),
    "prepare": _Help("[flags]", _training(f"{_FLAGS}:DataArguments", ("prepare", f"{_FLAGS}:PrepareArguments"),
                                          f"{_FLAGS}:PrepareTrainingFlags"),
                     "Takes `lmforge sft`'s command line; the training flags matter to --show only. " + _RUN_FILE),
    "tokenizer": _Help("train [flags]", (("tokenizer train", f"{_FLAGS}:TokenizerTrainArguments"),)),
    "merge": _Help("[flags]", (("merge", f"{_FLAGS}:MergeArguments"),)),
    "report": _Help("RUN_DIR [flags]", (("report", f"{_FLAGS}:ReportArguments"),),
                    "RUN_DIR may also be given as --run_dir."),
    "chat": _Help("MODEL [flags]", (("chat", f"{_FLAGS}:ChatArguments"),),
                  "MODEL may also be given as --model. Without --prompt: interactive; an empty line quits."),
    "demo": _Help("[flags]", (("demo", f"{_FLAGS}:DemoArguments"),)),
}

# Named in the pointer to `--help_all`, when the command leaves them to the Trainer.
COMMON_TRAINER_FLAGS = ("output_dir", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "bf16")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag as the help shows it."""

    name: str
    metavar: str
    help: str
    default: Optional[str] = None  # as shown; None: nothing to show
    required: bool = False


@dataclasses.dataclass
class HelpFlags:
    """A command's flags: lmforge's, by group; whether it takes the Trainer's flags too, and
    (--help_all) those flags."""

    groups: list[tuple[str, list[Flag]]]
    trainer: bool = False
    trainer_flags: Optional[list[Flag]] = None  # --help_all only: the Trainer's flags themselves


def help_wanted(argv: Sequence[str]) -> Optional[str]:
    """"all" for --help_all, "short" for -h / --help, else None."""
    if "--help_all" in argv or "--help-all" in argv:
        return "all"
    return "short" if "-h" in argv or "--help" in argv else None


def print_help(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `lmforge sft --help_all | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def help_text(command: str, full: bool = False) -> str:
    """`lmforge COMMAND --help` (fast: nothing imported), or with `full` (--help_all) the
    Trainer's flags too (imports transformers)."""
    flags = help_flags(command, trainer=full)
    spec = HELP[command]
    width = max(60, min(100, _columns()))
    lines = [f"usage: lmforge {command} {spec.usage}", "", COMMANDS[command][1] + "."]
    if spec.note:
        lines += textwrap.wrap(spec.note.format(command=command), width)
    for heading, group in flags.groups:
        lines += ["", f"{heading}:"]
        for flag in group:
            lines += _flag_lines(flag, width)
    if flags.trainer_flags is not None:
        lines += ["", f"the Trainer's flags (transformers' TrainingArguments, {len(flags.trainer_flags)}):"]
        for flag in flags.trainer_flags:
            lines += _flag_lines(flag, width)
    elif flags.trainer:
        own = {f.name for _, group in flags.groups for f in group}
        named = ", ".join(f"--{name}" for name in COMMON_TRAINER_FLAGS if name not in own)
        lines += [""] + textwrap.wrap(f"the Trainer's other flags ({named}, ...): lmforge {command} --help_all",
                                      width)
    return "\n".join(lines)


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _flag_lines(flag: Flag, width: int, column: int = 32) -> list[str]:
    head = f"  --{flag.name} {flag.metavar}"
    text = flag.help + (" (required)" if flag.required else f" (default: {flag.default})"
                        if flag.default is not None else "")
    body = textwrap.wrap(text.strip(), width - column) or [""]
    if len(head) < column - 1:
        return [head.ljust(column) + body[0]] + [" " * column + line for line in body[1:]]
    return [head] + [" " * column + line for line in body]


# Kinds of flag value, from a type (imported) or an annotation (source): ("bool",),
# ("choices", values), ("list", kind), ("scalar", type name), or _NONE (the None of Optional).
_NONE = ("none",)
_METAVARS = {"int": "INT", "float": "FLOAT", "str": "STR", "dict": "JSON"}


def _union(kinds: list[tuple]) -> tuple:
    """The kind of a Union flag (its members' kinds in the order written), by HfArgumentParser's
    rule: without None, the member that is not the second's str (X | str, transformers' enums:
    X; str | list[X]: the list); with None, the first member unless the second is not None
    (Optional[X]: X; str | None | Literal[False]: str); Optional[bool] is bool."""
    if len(kinds) == 1:
        return kinds[0]
    if _NONE not in kinds:
        return kinds[0] if kinds[1] == ("scalar", "str") else kinds[1]
    if ("bool",) in kinds:
        return ("bool",)
    return kinds[0] if kinds[1] == _NONE else kinds[1]


def _metavar(kind: tuple, metadata: dict) -> str:
    if "choices" in metadata:
        text = "{" + ",".join(str(c) for c in metadata["choices"]) + "}"
    elif kind[0] == "bool":
        text = "{True,False}"
    elif kind[0] == "choices":
        text = "{" + ",".join(str(c) for c in kind[1]) + "}"
    elif kind[0] == "list":
        item = _metavar(kind[1], {})
        text = f"{item} [{item} ...]"
    else:
        text = _METAVARS.get(kind[1], kind[1].upper())
    return f"[{text}]" if metadata.get("nargs") == "?" else text


def _default_text(value: Any) -> Optional[str]:
    """A default as the user types it: an enum by its value (`auto`, not `DataFormat.AUTO`),
    a list as its words; nothing for None and empty values."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or (isinstance(value, (str, list, tuple, dict)) and not value):
        return None
    if isinstance(value, (list, tuple)):
        return " ".join(_default_text(v) or "''" for v in value)
    return str(value)


def _make_flag(name: str, kind: tuple, metadata: dict, default: Any, required: bool) -> Flag:
    return Flag(name, _metavar(kind, metadata), " ".join(str(metadata.get("help") or "").split()),
                None if required else _default_text(default), required)


def _shown(command: str, groups: list[tuple[str, list[Flag]]]) -> list[tuple[str, list[Flag]]]:
    own = dict(HELP[command].shown_defaults)
    return [(heading, [dataclasses.replace(f, default=_default_text(own[f.name])) if f.name in own else f
                       for f in flags]) for heading, flags in groups]


# The help from the dataclasses of lmforge.flags (and --help_all: transformers' TrainingArguments).

def _import_class(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _flags_of(cls: type, names: Sequence[str]) -> list[Flag]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flags = []
    for name in names:
        f = fields.get(name)
        if f is None or not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (None if required else f.default if f.default is not dataclasses.MISSING
                   else f.default_factory())
        flags.append(_make_flag(name, _kind_of_type(hints[name]), dict(f.metadata), default, required))
    return flags


def _kind_of_type(tp: Any) -> tuple:
    if tp is type(None):
        return _NONE
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _union([_kind_of_type(a) for a in args])
    if origin is typing.Literal:
        return ("choices", tuple(args))
    if origin is list or tp is list:
        return ("list", _kind_of_type(args[0]) if args else ("scalar", "str"))
    if origin is dict:
        return ("scalar", "dict")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ("choices", tuple(m.value for m in tp))
    if tp is bool:
        return ("bool",)
    return ("scalar", tp.__name__ if isinstance(tp, type) else str(tp))


def help_flags(command: str, trainer: bool = False) -> HelpFlags:
    """The command's flags, by group, from the dataclasses HELP names (imports `lmforge.flags`
    only). With `trainer`, transformers' TrainingArguments flags that lmforge does not redeclare
    too (imports transformers)."""
    from lmforge.flags import TrainingFlags

    groups, takes_trainer, trainer_flags = [], False, None
    for heading, ref in HELP[command].groups:
        cls = _import_class(ref)
        names = [f.name for f in dataclasses.fields(cls)]
        groups.append((heading, _flags_of(cls, names)))
        if issubclass(cls, TrainingFlags):
            takes_trainer = True
            if trainer:
                import transformers

                base = transformers.TrainingArguments
                trainer_flags = _flags_of(base, [f.name for f in dataclasses.fields(base)
                                                 if f.init and f.name not in names])
    return HelpFlags(_shown(command, groups), takes_trainer, trainer_flags)
