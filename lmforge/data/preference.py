"""Preference pairs (a prompt, a chosen and a rejected answer) → cached token records for DPO.

Formats, detected from the first record like the SFT formats (or `--data_format`):

  prompt    {"prompt" | "question": str, "chosen": str, "rejected": str, optional "system": str}
  sharegpt  {"conversations": [{from, value}, ...], "chosen": {from: gpt, value}, "rejected": {...}}
            (LLaMA-Factory's preference data: the conversation up to the last user turn, then
            the two candidate assistant turns)
  openai    {"chosen": [{role, content}, ...], "rejected": [...]}: two conversations that share
            everything but the last assistant turn; or {"prompt": [messages], "chosen":
            [assistant message], "rejected": [...]}

Each side is rendered as a conversation (the prompt turns, then its answer) through the same
`Renderer` as SFT, scoring the last assistant turn only: its answer tokens and the end-of-turn
token that closes it carry labels, everything before is -100. The prompt tokens of the two
sides must be identical (checked on the tokens, not assumed from the text), and the two answers
must differ; a record that breaks either is an error naming it, or a counted skip.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Sequence

from lmforge.data.cache import Cached, RowWriter, build_or_load, cache_key, chunked, ordered_map
from lmforge.data.formats import OnBadRecord, SkipCounter, check_then_render, records_with_format
from lmforge.data.render import IGNORE_INDEX, MaskingStrategy, Rendered, Renderer
from lmforge.data.schema import (
    ASSISTANT,
    OPENAI_ROLES,
    SHAREGPT_ROLES,
    SYSTEM,
    TOOL,
    USER,
    Conversation,
    Message,
    is_empty,
    parse_message,
    parse_messages,
    parse_tools,
    validate,
)
from lmforge.data.sft import LENGTH_SKIPS, PrepareOptions, PrepareStats, ReasoningTurns, apply_length_policy
from lmforge.errors import DataError, LmforgeError, RecordError

CHUNK = 128  # pairs per worker task (each is two conversations)
COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


class PreferenceFormat(str, enum.Enum):
    AUTO = "auto"
    PROMPT = "prompt"
    SHAREGPT = "sharegpt"
    OPENAI = "openai"


@dataclass(frozen=True)
class Pair:
    """A validated preference pair: the prompt turns (ending with a user turn or a tool result),
    two assistant answers, and the tools the record offers."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    tools: tuple[dict, ...] | None = None

    def conversations(self) -> tuple[Conversation, Conversation]:
        return (Conversation(self.prompt + (self.chosen,), self.tools),
                Conversation(self.prompt + (self.rejected,), self.tools))


def detect_format(record: Any) -> PreferenceFormat:
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return PreferenceFormat.SHAREGPT
    if isinstance(record.get("chosen"), list) or isinstance(record.get("prompt"), list):
        return PreferenceFormat.OPENAI
    if "prompt" in record or "question" in record:
        return PreferenceFormat.PROMPT
    raise RecordError(
        "unknown_format",
        f"cannot tell the preference format from the keys {sorted(record)}: expected 'prompt' or 'question' with "
        "'chosen' / 'rejected' strings, 'conversations' with 'chosen' / 'rejected' turns (ShareGPT), or "
        "'chosen' / 'rejected' message lists (OpenAI); or pass --data_format")


def _side(record: dict, key: str) -> Any:
    if key not in record or record[key] is None:
        raise RecordError("missing_side", f"field '{key}' is missing (keys: {sorted(record)})")
    return record[key]


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{what} must be a string, got {type(value).__name__}")
    return value


def _answer(message: Message, key: str) -> Message:
    if message.role != ASSISTANT:
        raise RecordError("roles_out_of_order", f"the '{key}' answer is a {message.role!r} turn, not an assistant turn")
    return message


def from_prompt(record: dict) -> tuple[list[Message], Message, Message]:
    key = "prompt" if "prompt" in record else "question"
    prompt = [Message(USER, _string(record[key], f"field '{key}'"))]
    if record.get("system"):
        prompt.insert(0, Message(SYSTEM, _string(record["system"], "field 'system'")))
    return (prompt, Message(ASSISTANT, _string(_side(record, "chosen"), "field 'chosen'")),
            Message(ASSISTANT, _string(_side(record, "rejected"), "field 'rejected'")))


def from_sharegpt(record: dict) -> tuple[list[Message], Message, Message]:
    prompt = parse_messages(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    if record.get("system"):
        prompt.insert(0, Message(SYSTEM, _string(record["system"], "field 'system'")))
    answers = []
    for key in ("chosen", "rejected"):
        side = _side(record, key)
        if isinstance(side, str):  # some exports give the answer text alone
            answers.append(Message(ASSISTANT, side))
        else:
            answers.append(_answer(parse_message(side, f"field '{key}'", "from", "value", SHAREGPT_ROLES), key))
    return prompt, answers[0], answers[1]


def from_openai(record: dict) -> tuple[list[Message], Message, Message]:
    chosen = parse_messages(_side(record, "chosen"), "chosen", "role", "content", OPENAI_ROLES)
    rejected = parse_messages(_side(record, "rejected"), "rejected", "role", "content", OPENAI_ROLES)
    if "prompt" in record:
        prompt = parse_messages(record["prompt"], "prompt", "role", "content", OPENAI_ROLES)
        chosen, rejected = prompt + chosen, prompt + rejected
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not side:
            raise RecordError("empty_answer", f"field '{key}' holds no messages")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise RecordError("prompt_mismatch", f"'chosen' and 'rejected' differ before their last turn (first at "
                                             f"message {at}): a pair must share its prompt")
    return chosen[:-1], _answer(chosen[-1], "chosen"), _answer(rejected[-1], "rejected")


NORMALISERS = {
    PreferenceFormat.PROMPT: from_prompt,
    PreferenceFormat.SHAREGPT: from_sharegpt,
    PreferenceFormat.OPENAI: from_openai,
}


def to_pair(record: Any, fmt: PreferenceFormat) -> Pair:
    """Check one raw record and return its `Pair`, or raise `RecordError` saying what is wrong."""
    if fmt == PreferenceFormat.AUTO:
        fmt = detect_format(record)
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    prompt, chosen, rejected = NORMALISERS[fmt](record)
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if is_empty(answer):
            raise RecordError("empty_answer", f"the '{key}' answer is empty")
    if chosen == rejected:
        raise RecordError("identical_answers", "'chosen' and 'rejected' are the same answer: the pair prefers nothing")
    if not prompt or prompt[-1].role not in (USER, TOOL):
        raise RecordError("roles_out_of_order", "the prompt must end with a user turn (the answers follow it)")
    tools = parse_tools(record.get("tools"))
    checked = validate(prompt + [chosen], tools)  # no empty turn, tool results after calls
    return Pair(checked.messages[:-1], chosen, rejected, tools)


# ---------------------------------------------------------------------------------------------
# Pairs → (chosen, rejected) token records, checked
# ---------------------------------------------------------------------------------------------


def answer_start(r: Rendered) -> int:
    """Index of the first labelled token: the prompt is everything before it."""
    return next(i for i, label in enumerate(r.labels) if label != IGNORE_INDEX)


def check_pair(chosen: Rendered, rejected: Rendered) -> tuple[Rendered, Rendered]:
    """The tokens before both answers must be identical, and the scored tokens must differ.
    The two answers may start one token apart: where an answer begins with whitespace, BPE
    merges the template's last characters before it into the answer's first token (a scored
    token), so the other side keeps that token unscored in its prompt."""
    start = min(answer_start(chosen), answer_start(rejected))
    if chosen.input_ids[:start] != rejected.input_ids[:start]:
        raise RecordError("prompt_tokens_differ", "the prompt renders to different tokens before the chosen and the "
                                                  "rejected answer; the template must render the prompt the same way")
    if chosen.input_ids[start:] == rejected.input_ids[start:] and chosen.labels == rejected.labels:
        raise RecordError("identical_answers", "'chosen' and 'rejected' render to the same scored tokens")
    return chosen, rejected


def render_pairs(renderer: Renderer, pairs: Sequence[Pair]) -> list[tuple[Rendered, Rendered] | RecordError]:
    """Each pair's two sides rendered in one batch (exact masks, last answer scored), checked."""
    conversations = [c for pair in pairs for c in pair.conversations()]
    rendered = renderer.render_batch(conversations)
    results = []
    for chosen, rejected in zip(rendered[0::2], rendered[1::2]):
        error = next((r for r in (chosen, rejected) if isinstance(r, RecordError)), None)
        try:
            results.append(error or check_pair(chosen, rejected))
        except RecordError as e:
            results.append(e)
    return results


_RENDERER: Renderer | None = None


def _init_worker(renderer: Renderer) -> None:
    global _RENDERER
    _RENDERER = renderer


def _render_chunk(chunk: list[tuple[str, str, Any, PreferenceFormat]]):
    assert _RENDERER is not None
    return check_then_render(chunk, to_pair, lambda pairs: render_pairs(_RENDERER, pairs))


def _records(paths: Sequence[str], fmt: PreferenceFormat, on_bad: OnBadRecord, skips: SkipCounter):
    for path in paths:
        for location, record, file_fmt in records_with_format(path, fmt, detect_format, on_bad, skips):
            yield path, location, record, file_fmt


def _length_policy(pair: tuple[Rendered, Rendered], options: PrepareOptions):
    """SFT's length policy on each side; a pair is kept only if both sides are."""
    sides = [apply_length_policy(r, options) for r in pair]
    error = next((s for s in sides if isinstance(s, RecordError)), None)
    return error or tuple(sides)


def _write(tmp: str, records, options: PrepareOptions, skips: SkipCounter) -> PrepareStats:
    stats = PrepareStats()
    with RowWriter(tmp, COLUMNS) as writer:
        for path, location, result in records:
            truncated = False
            if not isinstance(result, RecordError):
                truncated = any(len(r.input_ids) > options.model_max_length for r in result)
                result = _length_policy(result, options)
            if isinstance(result, RecordError):
                if options.on_bad_record == OnBadRecord.SKIP or result.kind in LENGTH_SKIPS:
                    skips.add(result.kind, f"{path}, {location}: {result.reason}")
                    continue
                raise DataError(path, location, result.reason)
            chosen, rejected = result
            stats.truncated += int(truncated)
            stats.kept += 1
            stats.tokens += len(chosen.input_ids) + len(rejected.input_ids)
            stats.trained_tokens += chosen.num_trained + rejected.num_trained
            writer.add(chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels)
    stats.records = stats.kept + skips.total
    stats.skipped = dict(skips.counts)
    stats.skip_examples = dict(skips.examples)
    return stats


def prepare_pairs(paths: Sequence[str], tokenizer, chat_template: str, options: PrepareOptions,
                  fmt: PreferenceFormat = PreferenceFormat.AUTO, cache_dir: str | None = None,
                  num_workers: int = 1) -> Cached[PrepareStats]:
    """Render the preference pairs of `paths` into the cache (or find them there). Stats count
    pairs as records and the tokens of both sides."""
    if not paths:
        raise LmforgeError("no data file given (--data_path)")
    fmt = PreferenceFormat(fmt)
    options = replace(options, masking=MaskingStrategy.LAST_ASSISTANT, reasoning_turns=ReasoningTurns.RENDERED)
    key = cache_key("dpo", paths, tokenizer, {"template": chat_template, "format": fmt.value, **asdict(options)})

    def build(tmp: str) -> dict:
        skips = SkipCounter(Counter(), {})
        renderer = Renderer(tokenizer, chat_template, MaskingStrategy.LAST_ASSISTANT, options.unrendered, options.tools)
        records = _records(paths, fmt, options.on_bad_record, skips)
        chunks = chunked(records, CHUNK)
        rendered = (item for results in ordered_map(_render_chunk, chunks, num_workers, _init_worker, (renderer,))
                    for item in results)
        stats = _write(tmp, rendered, options, skips)
        if stats.kept == 0:
            raise LmforgeError(f"no usable preference pair in {', '.join(paths)}:\n{stats.summary()}")
        return asdict(stats)

    entry = build_or_load(cache_dir, "dpo", key, build)
    return Cached(entry, PrepareStats(**entry.stats))


def iter_pairs(path: str, fmt: PreferenceFormat = PreferenceFormat.AUTO) -> Iterator[tuple[str, Pair]]:
    """(location, Pair) for each record of one file; a bad record raises a `DataError` naming it."""
    for p, location, record, record_fmt in _records([path], fmt, OnBadRecord.ERROR, None):
        try:
            yield location, to_pair(record, record_fmt)
        except RecordError as e:
            raise DataError(p, location, e.reason) from None
