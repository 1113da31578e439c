"""`lmforge merge`: a LoRA adapter merged into its base model, written as a complete model in
safetensors with the tokenizer and chat template it was trained with and a generation config
that stops at the template's end-of-turn token.

    lmforge merge --base path/to/base --adapter out-lora --output merged

A QLoRA adapter is merged into the unquantised base (loaded in --torch_dtype), not into 4-bit
weights, so the merge adds no quantisation error of its own.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import transformers

from lmforge.config import parse
from lmforge.data.render import template_end_of_turn
from lmforge.errors import LmforgeError
from lmforge.flags import MergeArguments
from lmforge.logs import library_bars
from lmforge.modeling.load import DTYPES
from lmforge.training.save import BASE_CONFIG, set_generation_defaults


def _tokenizer_for(adapter: str, base: str):
    """The adapter's tokenizer (it carries the training template), else the base's."""
    source = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base
    return transformers.AutoTokenizer.from_pretrained(source)


def merge(base: str, adapter: str, output: str, torch_dtype: str = "float32"):
    import peft

    for flag, path in (("--base", base), ("--adapter", adapter)):
        if not os.path.isdir(path):
            raise LmforgeError(f"{flag} {path}: no such directory")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise LmforgeError(f"--adapter {adapter}: no adapter_config.json; not a LoRA adapter directory")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise LmforgeError(f"--output {output} exists and is not an empty directory")
    config = transformers.AutoConfig.from_pretrained(base)
    trained = os.path.join(adapter, BASE_CONFIG)
    if os.path.isfile(trained):
        config = type(config).from_json_file(trained)
    config.quantization_config = None  # QLoRA: merge into the unquantised base
    with library_bars(False):  # the merge is one line, printed when it is done
        model = transformers.AutoModelForCausalLM.from_pretrained(base, config=config, dtype=DTYPES[torch_dtype])
    tokenizer = _tokenizer_for(adapter, base)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    try:
        model = peft.PeftModel.from_pretrained(model, adapter)
    except Exception as e:
        raise LmforgeError(f"cannot load the adapter {adapter} onto {base}: {e}") from None
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    set_generation_defaults(merged, tokenizer, template_end_of_turn(tokenizer))
    os.makedirs(output, exist_ok=True)
    with library_bars(False):
        merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return merged


def main(argv: Sequence[str]) -> None:
    (args,) = parse((MergeArguments,), argv)
    with torch.no_grad():
        merge(args.base, args.adapter, args.output, args.torch_dtype)
    print(f"lmforge: merged {args.adapter} into {args.base}: {args.output}")
