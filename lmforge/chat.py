"""`lmforge chat`: talk to a model lmforge saved, through the chat template it was trained with.

    lmforge chat out/ --prompt "What is 2 + 3?"     # one answer
    lmforge chat out/                               # interactive; an empty line quits
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import transformers

from lmforge.config import parse
from lmforge.errors import LmforgeError
from lmforge.flags import ChatArguments
from lmforge.training.checkpoint import last_complete_checkpoint


@dataclass
class Reply:
    text: str
    stopped: bool
    """True when generation ended on an end-of-turn / EOS token, not at the token limit."""


def saved_model_dir(path: str) -> str:
    """The directory to load: `path` when it holds a saved model (or adapter); for an lmforge
    run that has checkpoints but no final save (stopped, killed, still training), its newest
    complete checkpoint, saying so."""
    if not os.path.isdir(path):
        raise LmforgeError(f"{path}: no such model directory")
    if any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "adapter_config.json")):
        return path
    checkpoint = last_complete_checkpoint(path, quiet=True)
    if checkpoint is None:
        raise LmforgeError(f"{path}: holds no saved model (no config.json) and no complete checkpoint-N")
    print(f"lmforge chat: {path} has no final save (its run did not finish); using its newest complete "
          f"checkpoint, {checkpoint}")
    return checkpoint


def load_for_chat(path: str, device: str | None = None):
    path = saved_model_dir(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise LmforgeError(f"{path}: the tokenizer has no chat template (was it saved by lmforge sft?)")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def stop_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@torch.no_grad()
def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, do_sample: bool = False) -> Reply:
    """Greedy (or sampled) answer to `messages`, and whether it stopped on its own."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
    )
    new = out[0, ids.shape[1]:].tolist()
    stops = stop_ids(model)
    stopped = bool(new) and new[-1] in stops
    if stopped:
        new = new[:-1]
    return Reply(tokenizer.decode(new, skip_special_tokens=True), stopped)


def main(argv: Sequence[str]) -> None:
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0]] + argv[1:]
    (args,) = parse((ChatArguments,), argv)
    model, tokenizer = load_for_chat(args.model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply = generate(model, tokenizer, messages + [{"role": "user", "content": args.prompt}],
                         args.max_new_tokens, args.do_sample)
        print(reply.text)
        return
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, messages, args.max_new_tokens, args.do_sample)
        messages.append({"role": "assistant", "content": reply.text})
        print(f"model> {reply.text}")
