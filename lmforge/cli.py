"""`lmforge <command> [flags | run.yaml flags]`: parses the command name and hands the rest of
the command line to that command's entry. Errors the user can fix are printed without a
traceback, with exit status 2."""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Callable, Sequence

from lmforge.errors import LmforgeError

COMMANDS = {
    "sft": ("lmforge.sft", "supervised fine-tuning on chat data (full, or --lora / --q_lora)"),
    "lora": ("lmforge.lora", "sft with LoRA on (FastChat's train_lora.py command lines)"),
    "dpo": ("lmforge.dpo", "preference training (DPO / IPO / hinge) on chosen / rejected pairs"),
    "pretrain": ("lmforge.pretrain", "causal-LM pretraining on text, from a config or from weights"),
    "tokenizer": ("lmforge.tokenizer", "`lmforge tokenizer train`: a byte-level BPE tokenizer from text"),
    "merge": ("lmforge.export", "merge a LoRA adapter into its base model"),
    "prepare": ("lmforge.prepare", "tokenize data into the cache; print counts; --dump / --show records"),
    "report": ("lmforge.report", "`lmforge report DIR`: rebuild DIR/report.md (curves, data, throughput)"),
    "chat": ("lmforge.chat", "generate with a trained model through its chat template"),
    "demo": ("lmforge.demo", "build a tiny chat model end to end on CPU and measure it"),
}


def usage() -> str:
    lines = ["usage: lmforge <command> [flags]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lmforge <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lmforge: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return _call(command, module.main, rest)


def _call(command: str, entry: Callable[[list[str]], object], argv: list[str]) -> int:
    try:
        entry(argv)
    except LmforgeError as e:
        print(f"lmforge {command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # a run stopped by a signal exits with 128 + signal
    except OSError as e:
        # A full disk can strike any write (a checkpoint, the final save, a log); wherever it
        # does, the user needs the one line that names it, not a traceback through the Trainer.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"lmforge {command}: error: {e.strerror or 'no space left on device'}{where}", file=sys.stderr)
        return 2
    return 0


def run_entry(command: str, entry: Callable[[list[str]], object]) -> None:
    """`python -m lmforge.<command>` (and torchrun -m / deepspeed --module): the same entry and
    error handling as `lmforge <command>`."""
    sys.exit(_call(command, entry, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
