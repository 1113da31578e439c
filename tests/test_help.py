"""`lmforge COMMAND --help`: lmforge's flags first, grouped, from `lmforge.flags` without importing
torch or transformers; `--help_all` adds the Trainer's; `lmforge --version`.

The table of which dataclasses each command's help shows is held to what the commands really
parse, so that the two cannot drift."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import subprocess
import sys
import time

import pytest

from lmforge import cli, flag_help

COMMANDS = list(cli.COMMANDS)
TRAINING = ["sft", "lora", "dpo", "pretrain", "prepare"]
# What each command's main needs to reach its `parse` call.
MAIN_ARGS = {"tokenizer": ["train"], "report": ["RUN_DIR"], "chat": ["MODEL"]}
FLAG_LINE = re.compile(r"^  --(\w+) ", re.MULTILINE)


def flag_names(text: str) -> list[str]:
    return FLAG_LINE.findall(text)


@pytest.fixture(scope="module")
def fast():
    return {c: flag_help.help_text(c) for c in COMMANDS}


@pytest.fixture(scope="module")
def full():
    return {c: flag_help.help_text(c, full=True) for c in COMMANDS}


def test_every_command_has_help():
    assert set(flag_help.HELP) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_line_names_the_command(command, fast, full):
    for text in (fast[command], full[command]):
        assert text.splitlines()[0].startswith(f"usage: lmforge {command} ")
    assert flag_help.help_text("sft").splitlines()[0] == "usage: lmforge sft [flags]"


def test_groups_in_order_lmforge_flags_before_the_trainers(fast, full):
    text = fast["dpo"]
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["model", "data", "LoRA", "DPO", "speed / run"]
    assert "--fused_loss" in text and "--compile_blocks" in text and "--resume" in text
    lines = full["sft"].splitlines()
    trainer_at = lines.index(next(line for line in lines if line.startswith("the Trainer's flags")))
    lmforge_flags = {f.name for _, group in flag_help.help_flags("sft").groups for f in group}
    trainer_flags = {f.name for f in flag_help.help_flags("sft", trainer=True).trainer_flags}
    for i, line in enumerate(lines):
        m = FLAG_LINE.match(line + " ")
        if m and m.group(1) in lmforge_flags:
            assert i < trainer_at
        elif m:
            assert i > trainer_at and m.group(1) in trainer_flags


def test_trainer_flags_behind_help_all(fast, full):
    assert "warmup_steps" not in flag_names(fast["sft"])
    assert "warmup_steps" in flag_names(full["sft"]) and "learning_rate" in flag_names(full["sft"])
    pointer = " ".join(fast["sft"].split("\n\n")[-1].split())
    assert pointer.startswith("the Trainer's other flags (--output_dir, ") and pointer.endswith("lmforge sft --help_all")
    # prepare declares --output_dir itself (optional there): it is lmforge's flag, not the Trainer's
    assert "output_dir" in flag_names(fast["prepare"]) and "--output_dir" not in fast["prepare"].split("\n\n")[-1]
    for command in ("tokenizer", "merge", "report", "chat", "demo"):
        assert "Trainer" not in fast[command] and full[command] == fast[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_as_values_and_flags_once(command, fast, full):
    for text in (fast[command], full[command]):
        assert "DataFormat." not in text
        assert not re.search(r"\b[A-Z][A-Za-z]+\.[A-Z][A-Z_0-9]+\b", text), "an enum shown by its repr"
        names = flag_names(text)
        assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
        assert not [n for n in names if n.startswith("no_")]


def test_boolean_and_enum_flags_shown_with_their_values(fast):
    sft = fast["sft"]
    assert re.search(r"^  --packing \{True,False\} .*", sft, re.MULTILINE)
    packing = sft[sft.index("  --packing "):].split("\n  --")[0]
    assert "(default: True)" in packing
    data_format = sft[sft.index("  --data_format "):].split("\n  --")[0]
    assert data_format.startswith("  --data_format {auto,sharegpt,openai,alpaca}")
    assert "(default: auto)" in data_format
    assert "--loss_type {sigmoid,ipo,hinge}" in fast["dpo"]
    assert "--text_split {file,blank_line,line}" in fast["tokenizer"]
    assert re.search(r"--lora \{True,False\}.*\(default: True\)", fast["lora"])  # lmforge lora: LoRA on
    assert re.search(r"--model STR .*\s+.*\(required\)", fast["chat"])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_and_help_all_show_every_flag_parse_accepts(command):
    """The short help's groups are --help_all's; with the Trainer's flags, every flag of the
    dataclasses the command parses, once."""
    short, full = flag_help.help_flags(command), flag_help.help_flags(command, trainer=True)
    assert short.groups == full.groups and short.trainer == full.trainer
    classes = [flag_help._import_class(ref) for _, ref in flag_help.HELP[command].groups]
    shown = [f.name for _, group in short.groups for f in group] + [f.name for f in full.trainer_flags or []]
    import transformers

    parsed = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    if short.trainer:
        parsed |= {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    assert sorted(shown) == sorted(parsed)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_table_is_what_the_command_parses(command, monkeypatch):
    """HELP names the dataclasses each command's main hands to `parse`, in that order."""
    import lmforge.config
    import lmforge.recipe

    class Parsed(Exception):
        pass

    def capture(classes, argv):
        raise Parsed(tuple(classes))

    module = importlib.import_module(cli.COMMANDS[command][0])
    for owner in (lmforge.config, lmforge.recipe, module):
        if hasattr(owner, "parse"):
            monkeypatch.setattr(owner, "parse", capture)
    with pytest.raises(Parsed) as parsed:
        module.main(MAIN_ARGS.get(command, []))
    shown = [flag_help._import_class(ref) for _, ref in flag_help.HELP[command].groups]
    parsed_classes = parsed.value.args[0]
    assert len(parsed_classes) == len(shown)
    for parsed_class, shown_class in zip(parsed_classes, shown):
        # The same class, or (training flags) transformers' TrainingArguments joined with it: the
        # flags lmforge declares in the parsed class are exactly the shown class's.
        assert issubclass(parsed_class, shown_class), (parsed_class, shown_class)
        lmforge_own = {f.name for f in dataclasses.fields(parsed_class)
                       if any(f.name in vars(k).get("__annotations__", {}) for k in parsed_class.__mro__
                              if k.__module__.startswith("lmforge"))}
        assert lmforge_own == {f.name for f in dataclasses.fields(shown_class)}, (parsed_class, shown_class)
    if command in TRAINING:
        method = next(v for v in vars(module).values() if isinstance(v, type)
                      and issubclass(v, lmforge.recipe.Method) and getattr(v, "command", None) == command)
        assert dict(flag_help.HELP[command].shown_defaults).get("lora", False) == method.lora_default


def test_version(capsys, monkeypatch):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"lmforge {importlib.metadata.version('lmforge')}\n"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    import lmforge

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"lmforge {lmforge.__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h", "--help_all"])
def test_help_exits_zero(command, flag, capsys):
    assert cli.main([command, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmforge {command} ")


def test_help_after_other_flags_and_subcommand(capsys):
    assert cli.main(["tokenizer", "train", "--vocab_size", "9", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: lmforge tokenizer train ")
    from lmforge import tokenizer

    tokenizer.main(["--help"])  # called directly, not through the CLI
    assert capsys.readouterr().out.startswith("usage: lmforge tokenizer train ")


def test_module_entry_help(capsys, monkeypatch):
    """`python -m lmforge.sft --help` (run_entry): the same help, naming the command."""
    monkeypatch.setattr(sys, "argv", ["sft.py", "--help"])

    def entry(argv):
        raise AssertionError("--help must not run the command")

    with pytest.raises(SystemExit) as e:
        cli.run_entry("sft", entry)
    assert e.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == "usage: lmforge sft [flags]"


def test_the_flags_module_imports_only_the_standard_library_and_the_data_options():
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import lmforge.flags\n"
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('lmforge') or '.' not in m "
            "and m in ('torch', 'transformers', 'numpy', 'tokenizers', 'yaml')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(["lmforge", "lmforge.data", "lmforge.data.options", "lmforge.errors",
                                      "lmforge.flags"]))


def test_fast_help_imports_neither_torch_nor_transformers():
    code = ("import contextlib, io, sys\n"
            "from lmforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = main(['sft', '--help'])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'lmforge.config', 'lmforge.sft') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"


@pytest.mark.parametrize("command", ["sft", "lora", "dpo", "pretrain"])
def test_module_entry_help_imports_neither_torch_nor_transformers(command):
    """`python -m lmforge.COMMAND --help` (the torchrun / deepspeed entry) answers before the
    command module's own imports."""
    code = ("import contextlib, io, runpy, sys\n"
            f"sys.argv = ['{command}.py', '--help']\n"
            "out = io.StringIO()\n"
            "try:\n"
            "    with contextlib.redirect_stdout(out):\n"
            f"        runpy.run_module('lmforge.{command}', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "print(rc, out.getvalue().splitlines()[0], sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"0 usage: lmforge {command} [flags] []"


def test_fast_help_subprocess_is_quick():
    """A generous bound (the help takes a fraction of a second; importing the command, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lmforge", "sft", "--help"], capture_output=True, text=True)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lmforge sft [flags]")
    assert elapsed < 5, f"lmforge sft --help took {elapsed:.1f} s"


def test_help_all_shows_each_trainer_flag_as_the_parser_reads_it():
    """Every Trainer flag of --help_all against HfArgumentParser's own reading of it: the choices
    it accepts, a list where it takes several values, {True,False} for booleans, INT / FLOAT for
    numbers (a union such as `str | list[DebugOption]` is read by the parser's rule, not guessed)."""
    import enum

    import transformers
    from transformers.hf_argparser import string_to_bool

    parser = transformers.HfArgumentParser(transformers.TrainingArguments)
    flags = flag_help.help_flags("sft", trainer=True).trainer_flags
    assert len(flags) > 100
    for flag in flags:
        action = parser._option_string_actions[f"--{flag.name}"]
        kind = action.type
        choices = action.choices or ([m.value for m in kind] if isinstance(kind, type) and issubclass(kind, enum.Enum)
                                     else None)
        if choices:
            assert all(str(c) in flag.metavar for c in choices), (flag.name, flag.metavar, choices)
        if action.nargs == "+":
            assert flag.metavar.endswith("...]"), (flag.name, flag.metavar)
        if kind is string_to_bool:
            assert "{True,False}" in flag.metavar, (flag.name, flag.metavar)
        if kind in (int, float) and not choices:
            assert flag.metavar.strip("[]") == kind.__name__.upper(), (flag.name, flag.metavar)
    shown = {f.name: f.metavar for f in flags}
    assert shown["trackio_static_space_id"] == "STR" and shown["debug"].startswith("{underflow_overflow,")
