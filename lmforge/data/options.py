"""The choices a user makes about the data, one type per flag, shared by the stages that act
on them and by `config.py`, which parses them from the command line. Everything here is a
plain value: no stage's code is imported to parse a flag."""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_MAX_LENGTH = 2048


class DataFormat(str, enum.Enum):
    """How a chat record is laid out (`--data_format`)."""

    AUTO = "auto"
    """Detected from the first record of each file."""
    SHAREGPT = "sharegpt"
    """{"conversations": [{"from", "value"}, ...]} (FastChat, LLaMA-Factory)."""
    OPENAI = "openai"
    """{"messages": [{"role", "content"}, ...]}."""
    ALPACA = "alpaca"
    """{"instruction", "input", "output"} (and "system", "history")."""


class PreferenceFormat(str, enum.Enum):
    """How a preference pair is laid out (`lmforge dpo --data_format`)."""

    AUTO = "auto"
    """Detected from the first record of each file."""
    PROMPT = "prompt"
    """{"prompt" | "question", "chosen", "rejected"} strings (and "system")."""
    SHAREGPT = "sharegpt"
    """{"conversations", "chosen": turn, "rejected": turn} (LLaMA-Factory's preference data)."""
    OPENAI = "openai"
    """{"chosen": messages, "rejected": messages} sharing a prefix, or {"prompt": messages, ...};
    LLaMA-Factory v1's {"chosen_messages", "rejected_messages"} alike."""


class OnBadRecord(str, enum.Enum):
    """What a record that cannot be read or rendered does to the run (`--on_bad_record`)."""

    ERROR = "error"
    """Stop at the first one, naming the file, the record and the cause."""
    SKIP = "skip"
    """Leave it out, counted by reason (with a first example) in the stats and the report."""


class TextSplit(str, enum.Enum):
    """How a .txt file is cut into documents (an EOS token follows each document)."""

    FILE = "file"
    """The whole file is one document."""
    BLANK_LINE = "blank_line"
    """Paragraphs separated by one or more blank lines are documents."""
    LINE = "line"
    """Every non-empty line is a document."""


class MaskingStrategy(str, enum.Enum):
    """Which tokens carry loss (a message's own `train` flag overrides it for that message)."""

    ASSISTANT = "assistant"
    """Every assistant turn: its content and the end-of-turn token that closes it (default)."""
    LAST_ASSISTANT = "last_assistant"
    """Only the last assistant turn; earlier turns are context."""
    ALL = "all"
    """Every token of the conversation, system and user turns included."""


class Unrendered(str, enum.Enum):
    """What to do with a part of a record that the chat template does not render."""

    ERROR = "error"
    """Refuse the record, naming the part and the template's behaviour (default)."""
    DROP = "drop"
    """Train the record without that part (a system message, reasoning, tools), counted."""


class ReasoningTurns(str, enum.Enum):
    """Which samples a multi-turn conversation gives, for templates that render a turn
    differently once later turns follow (Qwen3 and DeepSeek-R1 drop earlier turns' thinking)."""

    RENDERED = "rendered"
    """One sample: each assistant turn trained as the whole conversation renders it (default)."""
    SPLIT = "split"
    """One sample per assistant turn, rendered as the last turn: every turn's thinking trained."""
    GENERATED = "generated"
    """As split; and a turn whose reasoning the template leaves out even as the last turn
    (DeepSeek-R1-Distill's drops every <think> block) is written as the model generates it: the
    prompt with the generation prompt, then `<think>\n{reasoning}\n</think>\n\n{answer}` and the
    end-of-turn token. The only way to distil reasoning into such a model."""


class LongRecords(str, enum.Enum):
    """What to do with a record longer than `model_max_length`."""

    TRUNCATE = "truncate"
    """Keep its first `model_max_length` tokens (skipped if no trained token remains)."""
    DROP = "drop"
    """Leave it out, counted as a skip."""


class Remainder(str, enum.Enum):
    """The last tokens of a pretraining corpus that do not fill a block."""

    DROP = "drop"
    """Leave them out (counted in the stats), so every block is exactly block_size tokens."""
    PAD = "pad"
    """Keep them as a shorter last block; the collator pads it and masks the padding."""


@dataclass(frozen=True)
class ChatOptions:
    """Everything besides the files and the tokenizer that changes the cached tokens of chat
    records (SFT) and of preference pairs (DPO)."""

    data_format: DataFormat | PreferenceFormat = DataFormat.AUTO
    """The record layout (`DataFormat` for chat records, `PreferenceFormat` for pairs)."""
    masking: MaskingStrategy = MaskingStrategy.ASSISTANT
    """Which tokens carry loss (pairs: always the last answer)."""
    model_max_length: int = DEFAULT_MAX_LENGTH
    """The longest record in tokens; longer ones follow `long_records`."""
    long_records: LongRecords = LongRecords.TRUNCATE
    """Truncate or drop a record longer than `model_max_length` (both counted)."""
    on_bad_record: OnBadRecord = OnBadRecord.ERROR
    """Stop at a bad record, or skip it, counted."""
    unrendered: Unrendered = Unrendered.ERROR
    """Refuse a record with a part the template does not render, or train without the part."""
    reasoning_turns: ReasoningTurns = ReasoningTurns.RENDERED
    """One sample per conversation, or one per assistant turn."""
    tools: tuple[dict, ...] | None = None
    """Tools offered to every record that names none of its own (`--tools FILE`)."""


@dataclass(frozen=True)
class TextOptions:
    """Everything besides the files and the tokenizer that changes the cached pretraining blocks."""

    block_size: int = DEFAULT_MAX_LENGTH
    """Tokens per block."""
    text_field: str = "text"
    """The field holding a document's text in .json / .jsonl / .parquet records."""
    text_split: TextSplit = TextSplit.FILE
    """How a .txt file is cut into documents."""
    remainder: Remainder = Remainder.DROP
    """The corpus' last tokens that fill no block: dropped (counted) or a shorter last block."""
    on_bad_record: OnBadRecord = OnBadRecord.ERROR
    """Stop at a bad record, or skip it, counted."""
