"""Callbacks that tests hand a training run, through lmforge's events (`lmforge.training.events.LmforgeCallback`),
and an entry that runs an lmforge command with them, for tests and scripts that start runs in
other processes (a subprocess, torchrun, deepspeed, accelerate launch):

    python tests/hooks.py [HOOKS] COMMAND [FLAGS]       # as `lmforge COMMAND [FLAGS]`, with HOOKS
    torchrun ... tests/hooks.py [HOOKS] COMMAND [FLAGS]
    deepspeed ... tests/hooks.py [HOOKS] COMMAND [FLAGS]

HOOKS, before COMMAND:
    --pause_save STEP:SECONDS   `PauseInsideSave(STEP, SECONDS)`
    --record_logits PATH        `RecordLogits(PATH)`

COMMAND's `main(argv, callbacks=[...])` runs with `lmforge.cli`'s error handling, so the exit
status is `lmforge COMMAND`'s. Options of the form --name=value before COMMAND that are not
hooks (deepspeed's launcher puts --local_rank=N there) are handed on to COMMAND.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import time
from typing import Sequence

import torch
import transformers

from lmforge.modeling.load import is_peft
from lmforge.training.events import LmforgeCallback


def fixed_input_ids(vocab_size: int, length: int = 32) -> list[int]:
    """A fixed token sequence (the same for every run and tokenizer of that vocabulary size)."""
    return [(i * 7919 + 13) % vocab_size for i in range(length)]


class PauseInsideSave(LmforgeCallback):
    """Holds the save of checkpoint-STEP for SECONDS after its files are written and before its
    manifest, so a test can kill a run inside a save deterministically: it waits for the line
    printed here ("... pausing SECONDS s inside the save of STAGED_DIR")."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = int(step), float(seconds)

    def on_checkpoint_staged(self, args, state, staged_dir: str) -> None:
        if state.global_step == self.step:
            print(f"lmforge test hook: pausing {self.seconds:g} s inside the save of {staged_dir}", flush=True)
            time.sleep(self.seconds)


class RecordLogits(LmforgeCallback):
    """After the final save, the in-memory model (sharded or not, with the precision it trained
    in) computes the logits of `fixed_input_ids`, and the main process writes them to PATH, so a
    test can compare them with the saved model's. Every process runs the forward pass: under
    FSDP and ZeRO-3 it gathers the shards."""

    def __init__(self, path: str):
        self.path = path

    def on_final_save(self, trainer: transformers.Trainer) -> None:
        model = trainer.model
        base = model.get_base_model() if is_peft(model) else model
        ids = torch.tensor([fixed_input_ids(base.config.get_text_config().vocab_size)], device=trainer.args.device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), trainer.compute_loss_context_manager():
            logits = model(input_ids=ids, use_cache=False).logits
        model.train(was_training)
        if trainer.is_world_process_zero():
            torch.save({"input_ids": ids.cpu(), "logits": logits.float().cpu()}, self.path)


def _pause_save(value: str) -> PauseInsideSave:
    step, sep, seconds = value.partition(":")
    if not sep:
        raise ValueError(f"--pause_save takes STEP:SECONDS, not {value!r}")
    return PauseInsideSave(int(step), float(seconds))


HOOKS = {"--pause_save": _pause_save, "--record_logits": RecordLogits}


def parse(argv: Sequence[str]) -> tuple[list[LmforgeCallback], str, list[str]]:
    """(callbacks, COMMAND, COMMAND's argv) from `[HOOKS] COMMAND [FLAGS]`."""
    argv = list(argv)
    callbacks, handed_on = [], []
    while argv and argv[0].startswith("-"):
        arg = argv.pop(0)
        name, eq, value = arg.partition("=")
        if name in HOOKS:
            if not eq:
                if not argv:
                    raise ValueError(f"{name} needs a value")
                value = argv.pop(0)
            callbacks.append(HOOKS[name](value))
        elif eq:
            handed_on.append(arg)  # a launcher's --local_rank=N
        else:
            raise ValueError(f"unknown option {arg!r} before the command")
    if not argv:
        raise ValueError("no command")
    return callbacks, argv[0], handed_on + argv[1:]


def main(argv: Sequence[str] | None = None) -> int:
    import lmforge.cli as cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        callbacks, command, rest = parse(argv)
    except ValueError as e:
        print(f"tests/hooks.py: {e}", file=sys.stderr)
        return 2
    if command not in cli.COMMANDS:
        print(f"tests/hooks.py: unknown command {command!r}\n\n{cli.usage()}", file=sys.stderr)
        return 2
    entry = importlib.import_module(cli.COMMANDS[command][0]).main
    if callbacks:
        if "callbacks" not in inspect.signature(entry).parameters:
            print(f"tests/hooks.py: {entry.__module__}.main takes no callbacks", file=sys.stderr)
            return 2
        entry = functools.partial(entry, callbacks=callbacks)
    return cli._call(command, entry, rest)  # run_entry's error handling and exit status


if __name__ == "__main__":
    sys.exit(main())
