"""Load the tokenizer and the model: from weights (`--model_name_or_path`) or from a config with
random weights (`--config_name`). Attention is chosen through `attn_implementation`; nothing
is patched."""

from __future__ import annotations

import os

import torch
import transformers

from lmforge.config import ModelArguments
from lmforge.errors import LmforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _from_local(loader, flags: list[tuple[str, str | None]], what: str, missing: str, trust_remote_code: bool):
    """`loader.from_pretrained` on the first of `flags` that is set, with an error naming the
    flag and the path for a path that does not exist or does not load."""
    flag, path = next(((f, p) for f, p in flags if p), (None, None))
    if path is None:
        raise LmforgeError(missing)
    if not os.path.exists(path):
        raise LmforgeError(f"{flag} {path}: no such file or directory (lmforge loads models from local paths only)")
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LmforgeError(f"{flag} {path}: cannot load a {what}: {e}") from None


def load_tokenizer(args: ModelArguments):
    tokenizer = _from_local(
        transformers.AutoTokenizer,
        [("--tokenizer_name", args.tokenizer_name), ("--model_name_or_path", args.model_name_or_path)],
        "tokenizer",
        "no tokenizer: pass --tokenizer_name (required with --config_name) or --model_name_or_path",
        args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token serves.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_config(args: ModelArguments):
    return _from_local(
        transformers.AutoConfig,
        [("--config_name", args.config_name), ("--model_name_or_path", args.model_name_or_path)],
        "model config",
        "no model: pass --model_name_or_path (weights) or --config_name (a config, random init)",
        args.trust_remote_code,
    )


def attention_implementation(args: ModelArguments, flash_attn: bool = False) -> str:
    return "flash_attention_2" if flash_attn else args.attn_implementation


def load_model(args: ModelArguments, tokenizer, flash_attn: bool = False):
    """The causal LM to train, with `use_cache` off (training recomputes every position)."""
    config = load_config(args)
    dtype = DTYPES[args.torch_dtype]
    attn = attention_implementation(args, flash_attn)
    try:
        if args.model_name_or_path and not args.config_name:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.model_name_or_path, config=config, dtype=dtype, attn_implementation=attn,
                trust_remote_code=args.trust_remote_code,
            )
        else:
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation=attn,
                trust_remote_code=args.trust_remote_code,
            )
    except (ImportError, ValueError) as e:
        raise LmforgeError(f"cannot build the model ({attn} attention, {args.torch_dtype}): {e}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # A config smaller than the tokenizer would index past the embedding table.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.use_cache = False
    return model
