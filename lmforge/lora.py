"""`lmforge lora`: `lmforge sft` with LoRA on — FastChat's train_lora.py command line runs here
unchanged (`--q_lora True` for QLoRA).

    deepspeed --module lmforge.lora --model_name_or_path MODEL --data_path data.json \\
        --output_dir out --bf16 True --deepspeed zero2
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m lmforge.lora --help: answered before the imports below
    from lmforge.cli import answer_help

    answer_help("lora")

from typing import Sequence

from lmforge.recipe import run
from lmforge.sft import Sft


class Lora(Sft):
    command, lora_default = "lora", True


def main(argv: Sequence[str], callbacks: Sequence = ()) -> str:
    return run(Lora(), argv, callbacks)


if __name__ == "__main__":  # python -m lmforge.lora / torchrun -m lmforge.lora / deepspeed --module lmforge.lora
    from lmforge.cli import run_entry

    run_entry("lora", main)
