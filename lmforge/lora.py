"""`python -m lmforge.lora` / `torchrun -m lmforge.lora` / `deepspeed --module lmforge.lora`: the same
entry as `lmforge lora`."""

from lmforge.cli import run_entry
from lmforge.methods.lora import main

if __name__ == "__main__":
    run_entry("lora", main)
