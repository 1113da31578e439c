"""`python -m lmforge.dpo` / `torchrun -m lmforge.dpo` / `deepspeed --module lmforge.dpo`: the same
entry as `lmforge dpo`."""

from lmforge.cli import run_entry
from lmforge.methods.dpo import main

if __name__ == "__main__":
    run_entry("dpo", main)
