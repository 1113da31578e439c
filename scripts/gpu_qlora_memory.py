"""GPU memory of a base model after loading: bf16 vs 4-bit NF4 (lmforge's QLoRA loading),
on the device machine: python3 scripts/gpu_qlora_memory.py BASE_DIR"""

import sys

import torch

from lmforge.flags import LoraArguments, ModelArguments
from lmforge.modeling.load import load_model, load_tokenizer


def loaded_gib(model_args: ModelArguments, lora: LoraArguments) -> float:
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    model = load_model(model_args, load_tokenizer(model_args), model_max_length=2048, lora=lora)
    model.cuda()
    used = (torch.cuda.memory_allocated() - start) / 2**30
    del model
    torch.cuda.empty_cache()
    return used


base = sys.argv[1]
bf16 = loaded_gib(ModelArguments(model_name_or_path=base, torch_dtype="bfloat16"), LoraArguments(lora=True))
linear_only = loaded_gib(ModelArguments(model_name_or_path=base), LoraArguments(q_lora=True, q_lora_embeddings=False))
nf4 = loaded_gib(ModelArguments(model_name_or_path=base), LoraArguments(q_lora=True))
print(f"base after loading: bf16 {bf16:.2f} GiB; 4-bit linear layers only {linear_only:.2f} GiB "
      f"= {100 * linear_only / bf16:.1f} %; 4-bit with embedding and head {nf4:.2f} GiB = {100 * nf4 / bf16:.1f} %")
