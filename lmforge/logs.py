"""What lmforge says to the user: lines on stdout from the main process only.

Every process of a run (torchrun, deepspeed, accelerate) runs the same code; the user reads one
log. `say` is the one place that decides which process speaks, so the code that reports
something does not carry a rank check, a `log` parameter or a no-op stand-in for the others.
Lines are flushed as they are written: a supervisor (or a test) watching the log sees a line
before whatever comes next, a kill included. Lines every process must write (a process' own
failure) use print directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable


def main_process() -> bool:
    """True in the process whose lines the user reads: rank 0 of the process group when there
    is one, else the launcher's RANK (torchrun, deepspeed and accelerate set it), else the only
    process."""
    distributed = sys.modules.get("torch.distributed")  # never imported here: the help runs without torch
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def say(*parts: object) -> None:
    """print(*parts) on the main process, flushed; nothing on the others."""
    if main_process():
        print(*parts, flush=True)


def _torch_without_cuda() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.version.cuda is None


# Lines libraries log while they are imported that say nothing a user of lmforge can act on, by
# the logger that writes them. Each is dropped by a filter on that logger; every other line of
# theirs is shown as before.
IMPORT_NOISE: dict[str, Callable[[str], bool]] = {
    # DeepSpeed, imported by transformers and accelerate wherever it is installed (also without
    # --deepspeed), says at WARNING level which accelerator it picked ("Setting accelerator to CPU").
    "DeepSpeed": lambda line: line.startswith(("Setting accelerator to ", "Setting ds_accelerator to ")),
    # torchao, imported by transformers wherever it is installed: on a torch built without CUDA
    # its CUDA extensions cannot load, and nothing lmforge runs there needs them.
    "torchao": lambda line: line.startswith("Failed to load ") and _torch_without_cuda(),
    # torch's notice to libraries (torchao 0.18) that still register enums with pytree.
    "torch.utils._pytree": lambda line: "Calling register_constant() on Enum subclasses is deprecated" in line,
}


class _DropImportNoise(logging.Filter):
    def __init__(self, is_noise: Callable[[str], bool]):
        super().__init__()
        self.is_noise = is_noise

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.is_noise(str(record.getMessage()))
        except Exception:  # a record that does not format: shown as it is
            return True


def quiet_library_imports() -> None:
    """Drop `IMPORT_NOISE` from the libraries' loggers, before they are imported (a filter set on
    a logger before its library creates it stays on it). Called where a command starts;
    idempotent."""
    for name, is_noise in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) for f in logger.filters):
            logger.addFilter(_DropImportNoise(is_noise))


@contextlib.contextmanager
def library_bars(show: bool):
    """transformers' own progress bars ("Loading weights" in from_pretrained, "Writing model
    shards" in save_pretrained) off in the block unless `show`, then as they were (through
    transformers' switch; never turned on where a user turned them off)."""
    from transformers.utils import logging as hf_logging

    hide = not show and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
