"""`python -m lmforge.pretrain` / `torchrun -m lmforge.pretrain` / `deepspeed --module lmforge.pretrain`: the same
entry as `lmforge pretrain`."""

from lmforge.cli import run_entry
from lmforge.methods.pretrain import main

if __name__ == "__main__":
    run_entry("pretrain", main)
