"""`lmforge lora`: `lmforge sft` with LoRA on — FastChat's train_lora.py command line runs here
unchanged (`--q_lora True` for QLoRA).

    deepspeed --module lmforge.lora --model_name_or_path MODEL --data_path data.json \\
        --output_dir out --bf16 True --deepspeed zero2
"""

from __future__ import annotations

from typing import Sequence

from lmforge.methods import sft


def main(argv: Sequence[str]) -> str:
    return sft.main(argv, lora_default=True)
