"""`python -m lmforge.sft` / `torchrun -m lmforge.sft` / `deepspeed --module lmforge.sft`: the same
entry as `lmforge sft`."""

from lmforge.cli import run_entry
from lmforge.methods.sft import main

if __name__ == "__main__":
    run_entry("sft", main)
