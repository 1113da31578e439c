"""What lmforge says to the user: lines on stdout from the main process only.

Every process of a run (torchrun, deepspeed, accelerate) runs the same code; the user reads one
log. `say` is the one place that decides which process speaks, so the code that reports
something does not carry a rank check, a `log` parameter or a no-op stand-in for the others.
Lines are flushed as they are written: a supervisor (or a test) watching the log sees a line
before whatever comes next, a kill included. Lines every process must write (a process' own
failure) use print directly.
"""

from __future__ import annotations

import os
import sys


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
