"""Sample generations at each evaluation (`--eval_samples N`): the model being trained answers
the first N held-out prompts, greedily, and the answers go to OUTPUT_DIR/samples.jsonl (one
line per prompt and evaluation), the console and the run report. Loss says how well the model
predicts the held-out answers; a few answers read side by side with the references say what
it has learned (or that it has not learned to stop).

A held-out SFT record gives its prompt (the tokens before its first labelled one: the
conversation up to the first trained answer, that answer's header included) and its reference
(the labelled tokens that follow).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import transformers

from lmforge.data.render import IGNORE_INDEX

SAMPLES_NAME = "samples.jsonl"


@dataclass
class Prompt:
    prompt_ids: list[int]
    reference_ids: list[int]


def held_out_prompts(records: Sequence[dict], n: int) -> list[Prompt]:
    """The prompts and references of the first `n` records that have a labelled token."""
    prompts = []
    for record in records:
        if len(prompts) == n:
            break
        ids, labels = list(record["input_ids"]), list(record["labels"])
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not first:  # no labelled token, or one at position 0 (nothing to prompt with)
            continue
        end = first
        while end < len(labels) and labels[end] != IGNORE_INDEX:
            end += 1
        prompts.append(Prompt(ids[:first], ids[first:end]))
    return prompts


def _stop_ids(tokenizer, end_of_turn_id: Optional[int]) -> list[int]:
    ids = [i for i in (end_of_turn_id, tokenizer.eos_token_id) if i is not None]
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], pad_id: int,
             synced: bool) -> list[int]:
    """Greedy continuation of one prompt (without the prompt), cut after the first stop token."""
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True,
                         synced_gpus=synced)
    new = out[0, len(prompt_ids):].tolist()
    for i, token in enumerate(new):
        if token in stop_ids:
            return new[:i + 1]
    return new


class SampleGenerations(transformers.TrainerCallback):
    """Answers the held-out prompts after each evaluation. Every process generates (a model
    sharded by FSDP or ZeRO-3 needs all of them for each forward, kept in step by
    `synced_gpus`); the first one writes."""

    def __init__(self, tokenizer, prompts: list[Prompt], end_of_turn_id: Optional[int], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.stop_ids = _stop_ids(tokenizer, end_of_turn_id)
        self.max_new_tokens = max_new_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None or not self.prompts:
            return
        was_training = model.training
        model.eval()
        try:
            answers = [generate(model, p.prompt_ids, self.max_new_tokens, self.stop_ids, self.pad_id,
                                synced=args.world_size > 1) for p in self.prompts]
        finally:
            model.train(was_training)
        if not state.is_world_process_zero:
            return
        decode = self.tokenizer.decode
        lines = [{"step": state.global_step, "prompt": decode(p.prompt_ids), "generation": decode(a),
                  "reference": decode(p.reference_ids), "stopped": bool(a) and a[-1] in self.stop_ids}
                 for p, a in zip(self.prompts, answers)]
        with open(os.path.join(args.output_dir, SAMPLES_NAME), "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        for i, line in enumerate(lines, 1):
            print(f"lmforge: sample {i} at step {line['step']}: {line['generation']!r} "
                  f"(reference {line['reference']!r})")


def read_samples(run_dir: str) -> list[dict]:
    """The newest evaluation's samples from OUTPUT_DIR/samples.jsonl ([] when there are none)."""
    path = os.path.join(run_dir, SAMPLES_NAME)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run: the complete ones still count
    if not rows:
        return []
    last = max(r.get("step", 0) for r in rows)
    return [r for r in rows if r.get("step", 0) == last]
