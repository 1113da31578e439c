"""The model: loading it, what lmforge changes in how it computes, and the optimizer over its
weights; one module a concern.

  load.py        tokenizer and model loading: weights or a config, attention, RoPE scaling,
                 LoRA / QLoRA through PEFT, compiled decoder blocks
  attention.py   attention confined to each packed record: masks, and lmforge's varlen attention
  quantize.py    QLoRA: the frozen embedding and output head in 4-bit (shared when tied)
  fp8.py         float8 training of the decoder blocks' linear layers (torchao), where it measures faster
  loss.py        the loss at labelled positions, projection + cross-entropy in chunks; per-sequence log-probs
  optim.py       AdamW over fp32 master copies of 16-bit weights

Nothing is imported here, so that importing one module does not load the others.
"""
