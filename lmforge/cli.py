"""`lmforge <command> [flags | run.yaml flags]`: parses the command name and hands the rest of
the command line to that command's entry. Errors the user can fix are printed without a
traceback, with exit status 2."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from lmforge.errors import LmforgeError

COMMANDS = {
    "sft": ("lmforge.methods.sft", "full-parameter supervised fine-tuning on chat data"),
    "prepare": ("lmforge.methods.prepare", "tokenize data into the cache; print counts; --dump records"),
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
    try:
        module.main(rest)
    except LmforgeError as e:
        print(f"lmforge {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
