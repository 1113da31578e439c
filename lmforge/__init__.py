"""lmforge: train large language models — pretraining, SFT, LoRA / QLoRA — on the HF stack."""

__version__ = "0.1.0"
