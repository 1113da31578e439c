"""Stage 2 of the data chain, records: a raw record (a dict read by `sources.py`) → the typed
record the renderer takes, checked: a `Conversation` (SFT: ShareGPT, OpenAI messages,
Alpaca) or a `Pair` (DPO: a prompt and two answers). Messages are read by `schema.py`.

Every record is checked before any tokenizer sees it; a bad one raises `RecordError`, which
the sources' policy turns into an error naming the file and the record, or a counted skip.
The format of a file is fixed by its first record when `--data_format auto`, so a file that
mixes formats is reported rather than half-read under two interpretations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from lmforge.data.options import DataFormat, OnBadRecord, PreferenceFormat
from lmforge.data.schema import (
    ASSISTANT,
    OPENAI_ROLES,
    SHAREGPT_ROLES,
    SYSTEM,
    TOOL,
    USER,
    Conversation,
    Message,
    is_blank_system,
    is_empty,
    parse_message,
    parse_messages,
    parse_tools,
    require_field,
    require_str,
    validate,
)
from lmforge.data.sources import (
    SkipCounter,
    bad_record,
    llama_factory_columns,
    read_records,
    records_with_format,
    remap_record,
)
from lmforge.errors import DataError, RecordError

# ---------------------------------------------------------------------------------------------
# Chat records → Conversation (SFT)
# ---------------------------------------------------------------------------------------------


def detect_format(record: Any) -> DataFormat:
    """The format of a record, from its keys."""
    if isinstance(record, dict):
        if "conversations" in record:
            return DataFormat.SHAREGPT
        if "messages" in record:
            return DataFormat.OPENAI
        if "instruction" in record or "output" in record:
            return DataFormat.ALPACA
        keys = sorted(record)
        raise RecordError(
            "unknown_format",
            f"cannot tell the format from the keys {keys}: expected 'conversations' (ShareGPT), "
            "'messages' (OpenAI) or 'instruction'/'output' (Alpaca); or pass --data_format",
        )
    raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")


def _messages_field(record: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise RecordError("missing_field", f"field '{key}' is missing (keys: {sorted(record)})")
    messages = parse_messages(record[key], key, role_key, content_key, roles)
    system = _system_column(record)
    if system is not None and not any(m.role == SYSTEM for m in messages):
        messages.insert(0, system)
    return messages


def _system_column(record: dict) -> Message | None:
    """The system prompt of LLaMA-Factory's `system` column (ShareGPT, Alpaca, preference
    data). An empty or blank cell means no system prompt, as LLaMA-Factory reads it: the
    template then renders what it renders without one (Qwen2.5 its default prompt)."""
    system = record.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return None
    return Message(SYSTEM, require_str(system, "field 'system'"))


def _without_blank_system(messages: list[Message]) -> list[Message]:
    """ShareGPT data: a blank system turn means no system prompt, as LLaMA-Factory reads it
    (an OpenAI-messages record keeps it: its ids are `apply_chat_template(messages)`'s)."""
    return [m for m in messages if not is_blank_system(m)]


def from_sharegpt(record: Any) -> Conversation:
    messages = _messages_field(record, "conversations", "from", "value", SHAREGPT_ROLES)
    return validate(_without_blank_system(messages), parse_tools(record.get("tools")))


def from_openai(record: Any) -> Conversation:
    messages = _messages_field(record, "messages", "role", "content", OPENAI_ROLES)
    return validate(messages, parse_tools(record.get("tools")))


def _alpaca_prompt(record: Any) -> list[Message]:
    """An Alpaca record's messages before its output: system, history, the instruction."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    instruction = require_field(record, "instruction", "field 'instruction'")
    extra = record.get("input") or ""
    extra = require_str(extra, "field 'input'")
    system = _system_column(record)
    messages = [system] if system is not None else []
    for h, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError("malformed_turn", f"history[{h}] must be a [question, answer] pair")
        messages.append(Message(USER, require_str(pair[0], f"history[{h}][0]")))
        messages.append(Message(ASSISTANT, require_str(pair[1], f"history[{h}][1]")))
    # The instruction and its input are joined by a newline, the usual Alpaca convention.
    messages.append(Message(USER, instruction + ("\n" + extra if extra else "")))
    return messages


def from_alpaca(record: Any) -> Conversation:
    messages = _alpaca_prompt(record)
    output = require_field(record, "output", "field 'output'")
    return validate(messages + [Message(ASSISTANT, output)])


NORMALISERS: dict[DataFormat, Callable[[Any], Conversation]] = {
    DataFormat.SHAREGPT: from_sharegpt,
    DataFormat.OPENAI: from_openai,
    DataFormat.ALPACA: from_alpaca,
}


def to_conversation(record: Any, fmt: DataFormat) -> Conversation:
    if fmt == DataFormat.AUTO:
        fmt = detect_format(record)
    return NORMALISERS[fmt](record)


def iter_conversations(
    path: str,
    fmt: DataFormat = DataFormat.AUTO,
    on_bad_record: OnBadRecord = OnBadRecord.ERROR,
    skips: SkipCounter | None = None,
) -> Iterator[tuple[str, Conversation]]:
    """Yield `(location, Conversation)` for each good record of `path`.

    The format is fixed from the first record when `fmt` is auto, so a file that mixes formats
    is reported rather than half-read under two interpretations.
    """
    for location, record, record_fmt in iter_records(path, fmt, on_bad_record, skips):
        try:
            yield location, to_conversation(record, record_fmt)
        except RecordError as e:
            bad_record(path, location, e, on_bad_record, skips)


def iter_records(
    path: str,
    fmt: DataFormat = DataFormat.AUTO,
    on_bad_record: OnBadRecord = OnBadRecord.ERROR,
    skips: SkipCounter | None = None,
) -> Iterator[tuple[str, Any, DataFormat]]:
    """Yield `(location, raw record, format)`: the first step of `iter_conversations`, which
    fixes the format, without checking the records (`to_conversation` does that; the
    prepare driver does it in its worker processes). A file described by a LLaMA-Factory `dataset_info.json`
    beside it has its columns and role tags read from there."""
    columns = llama_factory_columns(path)
    if columns is None:
        yield from records_with_format(path, fmt, detect_format, on_bad_record, skips)
        return
    mapped_fmt = DataFormat.SHAREGPT if columns.get("formatting") == "sharegpt" else DataFormat.ALPACA
    for location, record in read_records(path, on_bad_record, skips):
        yield location, remap_record(record, columns), mapped_fmt


# ---------------------------------------------------------------------------------------------
# Prompt records → PromptRecord (GRPO)
# ---------------------------------------------------------------------------------------------

# The fields a format reads its messages from; every other field of a prompt record is a column
# handed to the reward functions.
MESSAGE_FIELDS = {DataFormat.SHAREGPT: ("conversations", "system", "tools"),
                  DataFormat.OPENAI: ("messages", "system", "tools"),
                  DataFormat.ALPACA: ("instruction", "input", "system", "history")}


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample completions for: its messages (ending with a user turn or a tool
    result; a trailing assistant turn of the record is its reference answer, not part of the
    prompt), the tools it offers, and the record's other columns (`answer`, `solution`, ...)."""

    conversation: Conversation
    """The prompt's messages (no assistant turn at the end) and tools."""
    columns: dict
    """Every other field of the record, as read (the trailing assistant turn's text under
    `completion` when the record has one and no such column)."""


def to_prompt(record: Any, fmt: DataFormat) -> PromptRecord:
    """A record of any chat format as a GRPO prompt; raises RecordError saying what is wrong."""
    if fmt == DataFormat.AUTO:
        fmt = detect_format(record)
    tools = None
    if fmt == DataFormat.ALPACA:
        messages = _alpaca_prompt(record)
    else:
        key = "conversations" if fmt == DataFormat.SHAREGPT else "messages"
        roles = SHAREGPT_ROLES if fmt == DataFormat.SHAREGPT else OPENAI_ROLES
        role_key, content_key = ("from", "value") if fmt == DataFormat.SHAREGPT else ("role", "content")
        messages = _messages_field(record, key, role_key, content_key, roles)
        if fmt == DataFormat.SHAREGPT:
            messages = _without_blank_system(messages)
        tools = parse_tools(record.get("tools"))
        if messages and messages[-1].role == ASSISTANT and "completion" not in record:
            record = {**record, "completion": messages[-1].content}  # the reference answer, for rewards
        if messages and messages[-1].role == ASSISTANT:
            messages = messages[:-1]
    if not messages or messages[-1].role not in (USER, TOOL):
        raise RecordError("roles_out_of_order", "a prompt must end with a user turn (or a tool result): the "
                                                "completion answers it")
    # Checked as the conversation it becomes once answered.
    checked = validate(list(messages) + [Message(ASSISTANT, "-")], tools)
    columns = {k: v for k, v in record.items() if k not in MESSAGE_FIELDS[fmt]}
    return PromptRecord(Conversation(checked.messages[:-1], checked.tools), columns)


# ---------------------------------------------------------------------------------------------
# Preference records → Pair (DPO)
# ---------------------------------------------------------------------------------------------


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


def detect_pair_format(record: Any) -> PreferenceFormat:
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return PreferenceFormat.SHAREGPT
    if isinstance(record.get("chosen"), list) or isinstance(record.get("prompt"), list) or "chosen_messages" in record:
        return PreferenceFormat.OPENAI
    if "prompt" in record or "question" in record:
        return PreferenceFormat.PROMPT
    raise RecordError(
        "unknown_format",
        f"cannot tell the preference format from the keys {sorted(record)}: expected 'prompt' or 'question' with "
        "'chosen' / 'rejected' strings, 'conversations' with 'chosen' / 'rejected' turns (ShareGPT), or "
        "'chosen' / 'rejected' (or 'chosen_messages' / 'rejected_messages') message lists (OpenAI); or pass "
        "--data_format")


def _side(record: dict, key: str) -> Any:
    if key not in record:
        raise RecordError("missing_side", f"field '{key}' is missing (keys: {sorted(record)})")
    if record[key] is None:
        raise RecordError("missing_side", f"field '{key}' is null")
    return record[key]


def _string(value: Any, what: str) -> str:
    if value is None:
        raise RecordError("non_string_content", f"{what} is null, not a string")
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{what} must be a string, got {type(value).__name__}")
    return value


def _answer(message: Message, key: str) -> Message:
    if message.role != ASSISTANT:
        raise RecordError("roles_out_of_order", f"the '{key}' answer is a {message.role!r} turn, not an assistant turn")
    return message


def pair_from_prompt(record: dict) -> tuple[list[Message], Message, Message]:
    key = "prompt" if "prompt" in record else "question"
    prompt = [Message(USER, _string(record[key], f"field '{key}'"))]
    system = _system_column(record)
    if system is not None:
        prompt.insert(0, system)
    return (prompt, Message(ASSISTANT, _string(_side(record, "chosen"), "field 'chosen'")),
            Message(ASSISTANT, _string(_side(record, "rejected"), "field 'rejected'")))


def pair_from_sharegpt(record: dict) -> tuple[list[Message], Message, Message]:
    prompt = _without_blank_system(parse_messages(record["conversations"], "conversations", "from", "value",
                                                  SHAREGPT_ROLES))
    system = _system_column(record)
    if system is not None and not any(m.role == SYSTEM for m in prompt):
        prompt.insert(0, system)
    answers = []
    for key in ("chosen", "rejected"):
        side = _side(record, key)
        if isinstance(side, str):  # some exports give the answer text alone
            answers.append(Message(ASSISTANT, side))
        else:
            answers.append(_answer(parse_message(side, f"field '{key}'", "from", "value", SHAREGPT_ROLES), key))
    return prompt, answers[0], answers[1]


def pair_from_openai(record: dict) -> tuple[list[Message], Message, Message]:
    """OpenAI message lists: `chosen` / `rejected`, or LLaMA-Factory v1's `chosen_messages` /
    `rejected_messages` (content parts with `value`, per-message `loss_weight`), each the whole
    conversation or, with a `prompt` list, the answers alone."""
    v1 = "chosen_messages" in record and "chosen" not in record
    keys = ("chosen_messages", "rejected_messages") if v1 else ("chosen", "rejected")
    chosen, rejected = (parse_messages(_side(record, key), key, "role", "content", OPENAI_ROLES) for key in keys)
    if "prompt" in record:
        prompt = parse_messages(record["prompt"], "prompt", "role", "content", OPENAI_ROLES)
        chosen, rejected = prompt + chosen, prompt + rejected
    for key, side in zip(keys, (chosen, rejected)):
        if not side:
            raise RecordError("empty_answer", f"field '{key}' holds no messages")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise RecordError("prompt_mismatch", f"'{keys[0]}' and '{keys[1]}' differ before their last turn (first at "
                                             f"message {at}): a pair must share its prompt")
    return chosen[:-1], _answer(chosen[-1], keys[0]), _answer(rejected[-1], keys[1])


PAIR_READERS = {
    PreferenceFormat.PROMPT: pair_from_prompt,
    PreferenceFormat.SHAREGPT: pair_from_sharegpt,
    PreferenceFormat.OPENAI: pair_from_openai,
}


def to_pair(record: Any, fmt: PreferenceFormat) -> Pair:
    """Check one raw record and return its `Pair`, or raise `RecordError` saying what is wrong."""
    if fmt == PreferenceFormat.AUTO:
        fmt = detect_pair_format(record)
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    prompt, chosen, rejected = PAIR_READERS[fmt](record)
    # A pair scores its last answer and nothing else: per-message loss flags (LLaMA-Factory v1
    # writes `loss_weight` on every message) have no say here.
    prompt = [m._replace(train=None) for m in prompt]
    chosen, rejected = chosen._replace(train=None), rejected._replace(train=None)
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


def iter_pairs(path: str, fmt: PreferenceFormat = PreferenceFormat.AUTO) -> Iterator[tuple[str, Pair]]:
    """(location, Pair) for each record of one file; a bad record raises a `DataError` naming it."""
    for location, record, record_fmt in records_with_format(path, PreferenceFormat(fmt), detect_pair_format,
                                                         OnBadRecord.ERROR, None):
        try:
            yield location, to_pair(record, record_fmt)
        except RecordError as e:
            raise DataError(path, location, e.reason) from None
