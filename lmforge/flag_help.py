"""`lmforge COMMAND --help` without importing the command: lmforge's flags first, grouped, read
from the argument dataclasses' source (see below why), the Trainer's behind --help_all."""

from __future__ import annotations

import ast
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

# --- `lmforge COMMAND --help` ----------------------------------------------------------------
#
# The help is read from the *source* of the dataclasses a command parses, with `ast`, not from
# the imported classes: config.py subclasses transformers.TrainingArguments, so importing it
# (or any command module) imports torch and transformers, seconds before one line is printed,
# while reading the source takes milliseconds. Reading the source, rather than keeping a
# generated copy of the flags, keeps the help right when a flag is added or changed: a field's
# name, type, default and help text are read where they are written. The one thing `ast` cannot
# see, which dataclasses a command parses, is the table HELP; tests/test_help.py checks it
# against the commands (the Method classes, the `parse` calls) and checks the flags read from
# the source against the imported dataclasses (`dataclasses.fields`, what `parse` parses), flag
# by flag, default by default, so that the two cannot drift. `--help_all` imports the classes
# and adds transformers' own TrainingArguments flags.

_CONFIG = "lmforge.config"
_RUN_FILE = ("A leading run.yaml holds flags; flags after it override it: lmforge {command} run.yaml "
             "--learning_rate 1e-5.")


class _Help(NamedTuple):
    usage: str  # what follows `lmforge COMMAND` on the usage line
    groups: tuple[tuple[str, str], ...]  # (heading, "module:Class"), in the order the command parses them
    note: str = ""
    shown_defaults: tuple[tuple[str, Any], ...] = ()  # a command's own default for a flag (lora: --lora True)


def _training(data: str, method: Optional[tuple[str, str]] = None,
              training: str = f"{_CONFIG}:TrainingArguments") -> tuple[tuple[str, str], ...]:
    """A training method's groups, as `recipe.parse_flags` parses them: model, data, LoRA, the
    method's own, and lmforge's part of the training arguments (the Trainer's come after)."""
    groups = [("model", f"{_CONFIG}:ModelArguments"), ("data", data), ("LoRA", f"{_CONFIG}:LoraArguments")]
    return (*groups, *([method] if method else []), ("speed / run", training))


HELP: dict[str, _Help] = {
    "sft": _Help("[flags]", _training(f"{_CONFIG}:DataArguments"), _RUN_FILE),
    "lora": _Help("[flags]", _training(f"{_CONFIG}:DataArguments"),
                  "`lmforge sft` with --lora True. " + _RUN_FILE, (("lora", True),)),
    "dpo": _Help("[flags]", _training(f"{_CONFIG}:PreferenceDataArguments", ("DPO", f"{_CONFIG}:DpoArguments"),
                                      f"{_CONFIG}:DpoTrainingArguments"), _RUN_FILE),
    "grpo": _Help("[flags]", _training(f"{_CONFIG}:DataArguments", ("GRPO", f"{_CONFIG}:GrpoArguments")),
                  "Prompts in any chat format lmforge reads; a record's other columns reach the reward functions. "
                  + _RUN_FILE),
    "pretrain": _Help("[flags]", _training(f"{_CONFIG}:PretrainDataArguments"), _RUN_FILE),
    "prepare": _Help("[flags]", _training(f"{_CONFIG}:DataArguments", ("prepare", "lmforge.prepare:PrepareArguments"),
                                          "lmforge.prepare:PrepareTrainingArguments"),
                     "Takes `lmforge sft`'s command line; the training flags matter to --show only. " + _RUN_FILE),
    "tokenizer": _Help("train [flags]", (("tokenizer train", "lmforge.tokenizer:TokenizerTrainArguments"),)),
    "merge": _Help("[flags]", (("merge", "lmforge.export:MergeArguments"),)),
    "report": _Help("RUN_DIR [flags]", (("report", "lmforge.report:ReportArguments"),),
                    "RUN_DIR may also be given as --run_dir."),
    "chat": _Help("MODEL [flags]", (("chat", "lmforge.chat:ChatArguments"),),
                  "MODEL may also be given as --model. Without --prompt: interactive; an empty line quits."),
    "demo": _Help("[flags]", (("demo", "lmforge.demo:DemoArguments"),)),
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
    """A command's flags: lmforge's, by group, and the names of the Trainer's other flags (None:
    the command takes no Trainer flags, or their number could not be read)."""

    groups: list[tuple[str, list[Flag]]]
    trainer: Optional[list[str]] = None
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
    flags = imported_help_flags(command, trainer=True) if full else source_help_flags(command)
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
    elif flags.trainer is not None:
        named = [f"--{name}" for name in COMMON_TRAINER_FLAGS if name in flags.trainer]
        lines += ["", f"the Trainer's {len(flags.trainer)} other flags ({', '.join(named + ['...'])}): "
                      f"lmforge {command} --help_all"]
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


# The help from the imported dataclasses (--help_all, and the tests' reference for the source).

def _import_class(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _lmforge_field_names(cls: type) -> list[str]:
    """The fields lmforge's classes declare (a base class first, an override in its base's place);
    the fields of transformers' TrainingArguments that lmforge does not redeclare are the Trainer's."""
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] == "lmforge":
            for name in klass.__dict__.get("__annotations__", {}):
                names.setdefault(name)
    return list(names)


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


def imported_help_flags(command: str, trainer: bool = False) -> HelpFlags:
    """The flags from the imported dataclasses: what `parse` parses. With `trainer`, the
    Trainer's flags themselves too."""
    groups, others, trainer_flags = [], None, None
    for heading, ref in HELP[command].groups:
        cls = _import_class(ref)
        names = _lmforge_field_names(cls)
        groups.append((heading, _flags_of(cls, names)))
        base = next((k for k in cls.__mro__ if k.__module__.split(".")[0] == "transformers"
                     and k.__name__ == "TrainingArguments"), None)
        if base is not None:
            others = [f.name for f in dataclasses.fields(base) if f.init and f.name not in names]
            if trainer:
                trainer_flags = _flags_of(base, others)
    return HelpFlags(_shown(command, groups), others, trainer_flags)


# The help from the source (`lmforge COMMAND --help`): nothing is imported.

def _members(node: ast.expr) -> list[ast.expr]:
    """The members of `a | b | c` in the order written (the parser nests them to the left), as
    typing flattens them."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _members(node.left) + _members(node.right)
    return [node]


class _Unknown(Exception):
    """An expression the source reader does not evaluate."""


@dataclasses.dataclass
class _Class:
    module: str
    node: ast.ClassDef


_BUILTINS = {"list": list, "tuple": tuple, "dict": dict, "str": str, "int": int, "float": float, "bool": bool}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _Source:
    """lmforge's modules as `ast` reads them, never imported; a name is followed through
    `from lmforge.x import name` to where it is defined."""

    def __init__(self):
        self._names: dict[str, dict[str, tuple]] = {}

    def names(self, module: str) -> dict[str, tuple]:
        if module not in self._names:
            path = os.path.join(_PACKAGE_DIR, *module.split(".")[1:])
            path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            names: dict[str, tuple] = {}
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    names[node.name] = ("class", node)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            names[target.id] = ("value", node.value)
                        elif (isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                              and len(target.elts) == len(node.value.elts)):
                            for t, v in zip(target.elts, node.value.elts):
                                if isinstance(t, ast.Name):
                                    names[t.id] = ("value", v)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                    names[node.target.id] = ("value", node.value)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    for alias in node.names:
                        names[alias.asname or alias.name] = ("import", node.module, alias.name)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        names[alias.asname or alias.name.split(".")[0]] = ("module", alias.name)
            self._names[module] = names
        return self._names[module]

    def lookup(self, module: str, name: str) -> tuple[str, Optional[tuple]]:
        entry = self.names(module).get(name)
        if entry and entry[0] == "import" and entry[1].split(".")[0] == "lmforge":
            return self.lookup(entry[1], entry[2])
        return module, entry

    def value(self, module: str, node: ast.expr) -> Any:
        """A default's value: constants, containers, module constants, enum members (as their
        value), list(...) and lambdas; anything else is _Unknown."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.value(module, e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.value(module, k): self.value(module, v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.value(module, node.operand)
        if isinstance(node, ast.Name):
            where, entry = self.lookup(module, node.id)
            if entry is None and node.id in _BUILTINS:
                return _BUILTINS[node.id]
            if entry and entry[0] == "value":
                return self.value(where, entry[1])
            if entry and entry[0] == "class":
                return _Class(where, entry[1])
        if isinstance(node, ast.Attribute):
            owner = self.value(module, node.value)
            members = self.enum_members(owner) if isinstance(owner, _Class) else None
            if members and node.attr in members:
                return members[node.attr]
        if isinstance(node, ast.Call) and not node.keywords:
            func = self.value(module, node.func)
            if func in _BUILTINS.values():
                return func(*[self.value(module, a) for a in node.args])
        if isinstance(node, ast.Lambda):
            return lambda: self.value(module, node.body)
        raise _Unknown(ast.unparse(node))

    def enum_members(self, cls: _Class) -> Optional[dict[str, Any]]:
        """An Enum class' members by name, as their values; None for another class."""
        bases = {ast.unparse(b).split(".")[-1] for b in cls.node.bases}
        if not bases & {"Enum", "IntEnum", "StrEnum"}:
            return None
        return {t.id: self.value(cls.module, stmt.value) for stmt in cls.node.body if isinstance(stmt, ast.Assign)
                for t in stmt.targets if isinstance(t, ast.Name) and not t.id.startswith("_")}

    def kind(self, module: str, node: ast.expr) -> tuple:
        """The kind of flag an annotation declares (annotations are source text here)."""
        if isinstance(node, ast.Constant):
            if node.value is None:
                return _NONE
            if isinstance(node.value, str):
                return self.kind(module, ast.parse(node.value, mode="eval").body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return _union([self.kind(module, member) for member in _members(node)])
        if isinstance(node, ast.Subscript):
            outer = ast.unparse(node.value).split(".")[-1]
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if outer == "Optional":
                return _union([self.kind(module, args[0]), _NONE])
            if outer == "Union":
                return _union([self.kind(module, a) for a in args])
            if outer in ("list", "List"):
                return ("list", self.kind(module, args[0]))
            if outer == "Literal":
                return ("choices", tuple(self.value(module, a) for a in args))
            if outer in ("dict", "Dict"):
                return ("scalar", "dict")
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = ast.unparse(node).split(".")[-1]
            if name == "bool":
                return ("bool",)
            if name in ("list", "List"):
                return ("list", ("scalar", "str"))
            if name in _BUILTINS:
                return ("scalar", name)
            try:
                cls = self.value(module, node)
            except _Unknown:
                return ("scalar", name)
            members = self.enum_members(cls) if isinstance(cls, _Class) else None
            if members is not None:
                return ("choices", tuple(members.values()))
        return ("scalar", ast.unparse(node))

    def fields(self, cls: _Class, out: dict[str, tuple[str, ast.AnnAssign]], external: list[str]) -> None:
        """`cls`'s fields into `out` (base classes first; an override keeps its base's place), and
        the base classes that are not lmforge's source (transformers.TrainingArguments)."""
        for base in cls.node.bases:
            try:
                resolved = self.value(cls.module, base)
            except _Unknown:
                resolved = None
            if isinstance(resolved, _Class):
                self.fields(resolved, out, external)
            else:
                external.append(ast.unparse(base))
        for stmt in cls.node.body:
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and "ClassVar" not in ast.unparse(stmt.annotation)):
                out[stmt.target.id] = (cls.module, stmt)

    def flag(self, module: str, stmt: ast.AnnAssign) -> Optional[Flag]:
        """One field as a flag; None for a field(init=False)."""
        metadata, value, factory = {}, stmt.value, None
        if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
            keywords = {k.arg: k.value for k in value.keywords}
            if "init" in keywords and not self.value(module, keywords["init"]):
                return None
            metadata = self.value(module, keywords["metadata"]) if "metadata" in keywords else {}
            value, factory = keywords.get("default"), keywords.get("default_factory")
        required = value is None and factory is None
        try:
            default = None if required else self.value(module, factory)() if factory else self.value(module, value)
        except _Unknown:  # shown as written; tests/test_help.py fails until the reader knows it
            default = ast.unparse(factory or value)
        return _make_flag(stmt.target.id, self.kind(module, stmt.annotation), metadata, default, required)


def _trainer_field_names() -> Optional[list[str]]:
    """The names of transformers' TrainingArguments fields, read from its source (found without
    importing transformers); None when that source cannot be read as expected."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("transformers")
        path = os.path.join(spec.submodule_search_locations[0], "training_args.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments")
        names = []
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            call = stmt.value
            if isinstance(call, ast.Call) and any(
                    k.arg == "init" and isinstance(k.value, ast.Constant) and not k.value.value for k in call.keywords):
                continue
            names.append(stmt.target.id)
        return names or None
    except Exception:  # a layout this reader does not know: the pointer then gives no number
        return None


def source_help_flags(command: str) -> HelpFlags:
    """The flags read from the source of the command's dataclasses; imports nothing."""
    source = _Source()
    groups, others = [], None
    for heading, ref in HELP[command].groups:
        module, name = ref.split(":")
        fields: dict[str, tuple[str, ast.AnnAssign]] = {}
        external: list[str] = []
        where, entry = source.lookup(module, name)
        source.fields(_Class(where, entry[1]), fields, external)
        flags = [source.flag(m, stmt) for m, stmt in fields.values()]
        groups.append((heading, [f for f in flags if f is not None]))
        if "transformers.TrainingArguments" in external:
            trainer_names = _trainer_field_names()
            others = None if trainer_names is None else [n for n in trainer_names if n not in fields]
    return HelpFlags(_shown(command, groups), others)
