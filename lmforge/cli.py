"""`lmforge <command> [flags | run.yaml flags]`: parses the command name and hands the rest of
the command line to that command's entry. Errors the user can fix are printed without a
traceback, with exit status 2. `lmforge <command> --help` lists a command's flags without
importing the command (`flag_help.py`); `lmforge --version` names the installed version."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from lmforge.commands import COMMANDS
from lmforge.errors import LmforgeError, is_disk_full
from lmforge.flag_help import help_text, help_wanted, print_help
from lmforge.logs import quiet_library_imports


def usage() -> str:
    lines = ["usage: lmforge <command> [flags]", "       lmforge --version", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lmforge <command> --help` lists a command's flags (--help_all: with the Trainer's)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(f"lmforge {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    quiet_library_imports()  # before the command's module imports them
    if command not in COMMANDS:
        print(f"lmforge: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if printed_help(command, rest):  # before the command's module is imported: that import alone takes seconds
        return 0
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
        if not is_disk_full(e):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"lmforge {command}: error: {e.strerror or 'no space left on device'}{where}", file=sys.stderr)
        return 2
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """After a command that succeeded under a launcher (torchrun, accelerate, deepspeed), destroy
    the default process group, as PyTorch asks of every program that made one. The Trainer
    leaves it alive, and NCCL then warns at exit, in every process, that resources may leak.
    Only after success: after an error the other processes may still be inside a collective,
    and waiting on them here could keep this process from exiting with its message."""
    dist = sys.modules.get("torch.distributed")  # imported by the command if it made a group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def printed_help(command: str, argv: Sequence[str]) -> bool:
    """Print `command`'s help, read from the flags' source (`flag_help.py`), if `argv` asks for
    it; whether it did."""
    wanted = help_wanted(argv)
    if wanted:
        print_help(help_text(command, full=wanted == "all"))
    return bool(wanted)


def answer_help(command: str) -> None:
    """`python -m lmforge.<command> --help`: the help, then exit. The command modules call this
    before their own imports (torch, transformers), so the help comes as fast as `lmforge
    <command> --help`. Also the first thing such an entry does: the libraries' import noise goes."""
    quiet_library_imports()
    if printed_help(command, sys.argv[1:]):
        sys.exit(0)


def run_entry(command: str, entry: Callable[[list[str]], object]) -> None:
    """`python -m lmforge.<command>` (and torchrun -m / deepspeed --module): the same entry and
    error handling as `lmforge <command>`."""
    answer_help(command)
    sys.exit(_call(command, entry, sys.argv[1:]))


def version() -> str:
    """The installed distribution's version; lmforge.__version__ when run from a source tree
    that is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("lmforge")
    except importlib.metadata.PackageNotFoundError:
        from lmforge import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())
