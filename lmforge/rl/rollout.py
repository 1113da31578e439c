"""Prompts in, sampled completions out: the first half of a GRPO step.

Prompts are read by the data chain's first stages (`sources.iter_records` → `records.to_prompt`)
and rendered by the same template code as SFT, with the generation prompt (`Renderer.text(...,
add_generation_prompt=True)`), so that a model is sampled on exactly the text it is trained and
served on. They are held in memory rather than in the token cache: RL prompt sets are thousands
of short records, tokenized in a second, and each carries columns of any JSON type (answers,
test cases) for the reward functions.

Completions come from an `Engine`, one small interface, so that another generator (vLLM, as a
server or in-process) can be put in without touching the rest. `TransformersEngine` is
transformers' own `generate`. Sampling is a function of the weights, the prompts and a seed:
each generation batch draws from its own seeded RNG (`seed`), forked from the process' RNG, so
a resumed run samples what the uninterrupted one did and dropout's draws are untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from lmforge.data.options import DataFormat, LongRecords, OnBadRecord
from lmforge.data.records import iter_records, to_prompt
from lmforge.data.render import Renderer
from lmforge.data.sources import SkipCounter, bad_record
from lmforge.errors import DataError, RecordError
from lmforge.training.distributed import sharded_across_processes


@dataclass(frozen=True)
class Prompt:
    """One prompt, ready to sample from and to reward."""

    location: str
    """Where it came from ("data.jsonl, line 7"), for errors about it."""
    messages: list[dict]
    """Its messages as the template takes them: what reward functions get as `prompts[i]`."""
    input_ids: list[int]
    """The rendered prompt, generation prompt included."""
    columns: dict
    """The record's other fields (`answer`, `solution`, ...), handed to the reward functions."""


def read_prompts(paths: Sequence[str], renderer: Renderer, data_format: DataFormat, on_bad_record: OnBadRecord,
                 max_prompt_length: int, long_records: LongRecords, skips: SkipCounter) -> list[Prompt]:
    """Every prompt of `paths`, rendered with the generation prompt. A bad record is an error
    naming it, or a counted skip (`on_bad_record`); a prompt longer than `max_prompt_length` is
    refused, or dropped and counted under `--long_records drop` (a prompt cut short would lose
    its end, the question and the generation prompt)."""
    prompts: list[Prompt] = []
    for path in paths:
        for location, record, fmt in iter_records(path, data_format, on_bad_record, skips):
            try:
                prompt = to_prompt(record, fmt)
                conversation = renderer.with_default_tools(prompt.conversation)  # --tools FILE
                messages = renderer.template_messages(conversation)
                text = renderer.text(messages, True, conversation.tool_list)
                ids = renderer.tokenize([text])[0]
                if len(ids) > max_prompt_length:
                    why = RecordError("too_long", f"the prompt has {len(ids)} tokens, more than --max_prompt_length "
                                                  f"{max_prompt_length}")
                    if long_records == LongRecords.DROP:
                        skips.add(why.kind, f"{path}, {location}: {why.reason}")
                        continue
                    raise DataError(path, location, why.reason + "; raise it, or pass --long_records drop")
            except RecordError as e:
                bad_record(path, location, e, on_bad_record, skips)
                continue
            prompts.append(Prompt(f"{path}, {location}", messages, ids, prompt.columns))
    return prompts


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""


@dataclass(frozen=True)
class Completion:
    ids: list[int]
    """The sampled tokens, up to and with the token that ended the turn."""
    truncated: bool
    """True when it reached `max_new_tokens` without ending."""
    entropy: float = float("nan")
    """The mean entropy (nats) of the distributions its tokens were drawn from, at the sampling
    temperature; NaN where the engine does not measure it."""


class EntropyMeter:
    """A logits processor that changes nothing and records, per generated position, each row's
    entropy of softmax(logits / temperature) (the policy's at the sampling temperature, as TRL
    logs it). transformers runs the processors a caller passes before its own top-k / top-p
    cuts, so those do not enter. Kept on the device until `per_row` reads it once."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # On a GPU, one fused kernel instead of seven passes over rows x vocabulary floats per
        # sampled position: eager, the meter took about a tenth of the sampling time
        # (bench/grpo_generation.py, the static cache with and without it).
        measure = _compiled_entropy() if scores.is_cuda else _entropy
        self.steps.append(measure(scores, self.temperature))
        return scores

    def per_row(self, lengths: Sequence[int]) -> list[float]:
        """Each row's mean entropy over its first `lengths[row]` positions."""
        if not self.steps:
            return [float("nan")] * len(lengths)
        table = torch.stack(self.steps, dim=1).cpu()  # rows x positions
        return [table[row, :n].mean().item() if n else float("nan") for row, n in enumerate(lengths)]


def _entropy(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each row's entropy of softmax(scores / temperature), in fp32."""
    logp = torch.log_softmax(scores.float() / temperature, dim=-1)
    # exp(-inf) * -inf is NaN: tokens a processor forbade carry no probability.
    return -torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)


@functools.cache
def _compiled_entropy():
    """`_entropy` compiled, once per process (on first use: a CPU run never compiles it)."""
    return torch.compile(_entropy, dynamic=True)


class Engine(Protocol):
    """What samples completions: `prompts` (token ids) in, one `Completion` per prompt out, in order."""

    def complete(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling,
                 seed: int) -> list[Completion]: ...


# A static cache's prompt part is rounded up to a multiple of this many tokens: each length
# is a new cache shape, which compiles the decode step again (seconds each).
PROMPT_BUCKET = 64


class TransformersEngine:
    """transformers' `generate`, sampling, on the policy's current weights (the same module that
    trains: no copy to keep in sync; LoRA adapters stay unmerged). Prompts are left-padded into
    one batch; generation stops at the template's end-of-turn token (`stop_ids`).

    `static_cache`: a cache of fixed size, for which transformers compiles the decode step (into
    CUDA graphs on a GPU): several times the dynamic cache's speed once compiled (measured:
    docs/bench_results.md, GRPO on one H100). Prompts are then padded to a multiple of
    `PROMPT_BUCKET`, so that a run compiles a few cache shapes, not one per step."""

    def __init__(self, pad_id: int, stop_ids: Sequence[int], static_cache: bool = False):
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.static_cache = static_cache

    @torch.no_grad()
    def complete(self, model, prompts, sampling, seed):
        device = next(model.parameters()).device
        # Sharded weights (FSDP, ZeRO-3) are gathered at each forward from every process, so
        # each one runs every decoding step until all have finished (a process whose completions
        # ended early keeps calling the model), and the static cache is not used: its compiled
        # step would have to capture those gathers.
        synced = sharded_across_processes(model)
        static = self.static_cache and not synced
        longest = max(len(p) for p in prompts)
        if static:
            longest = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids):] = torch.as_tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        was_training = model.training
        model.eval()  # no dropout while sampling: the completions are the policy's own
        devices = [device] if device.type == "cuda" else []
        meter = EntropyMeter(sampling.temperature)
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None,
                    max_new_tokens=sampling.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                    use_cache=True, logits_processor=[meter], synced_gpus=synced,
                    **({"cache_implementation": "static"} if static else {}))
        finally:
            model.train(was_training)
        completions = [self._completion(row) for row in out[:, longest:].tolist()]
        entropies = meter.per_row([len(c.ids) for c in completions])
        return [Completion(c.ids, c.truncated, e) for c, e in zip(completions, entropies)]

    def _completion(self, row: list[int]) -> Completion:
        stop = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
        if stop is None:
            return Completion(row, True)
        return Completion(row[: stop + 1], False)
