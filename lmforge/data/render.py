"""Conversation → (input_ids, labels), with loss only where the masking strategy says.

Boundaries between turns are found by rendering token-level prefixes with the chat template:
for assistant turn i, the tokens of `messages[:i]` with the generation prompt are where the
answer starts, and the tokens of `messages[:i + 1]` are where the turn ends. Both must be exact
token prefixes of the whole conversation; if not (a template that rewrites earlier turns, a
tokenizer that merges across the boundary), the record is refused by name instead of being
trained with a shifted mask. No string offsets, no per-template token arithmetic.

Labels follow the HF convention: aligned with input_ids, -100 where no loss; the model shifts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lmforge.data.formats import ASSISTANT, Conversation
from lmforge.errors import LmforgeError, RecordError

IGNORE_INDEX = -100


class MaskingStrategy(str, enum.Enum):
    """Which tokens carry loss."""

    ASSISTANT = "assistant"
    """Every assistant turn: its content and the end-of-turn token that closes it (default)."""
    LAST_ASSISTANT = "last_assistant"
    """Only the last assistant turn; earlier turns are context."""
    ALL = "all"
    """Every token of the conversation, system and user turns included."""


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (EOS, end-of-turn markers, ...)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            ids.add(token_id)
    return frozenset(ids)


class Renderer:
    """Renders conversations with one tokenizer and one jinja chat template."""

    def __init__(self, tokenizer, chat_template: str, strategy: MaskingStrategy = MaskingStrategy.ASSISTANT):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.strategy = MaskingStrategy(strategy)
        self.special_ids = special_token_ids(tokenizer)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)

    def text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Exactly the ids `tokenizer.apply_chat_template` gives for each text: tokenized without
        the tokenizer adding special tokens of its own (templates write their BOS themselves).
        Tokenizing dominates rendering, so the texts go to the Rust backend in one batch,
        without the Python wrapper's per-text work (the ids are the same; tests compare them
        with `apply_chat_template`)."""
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self.tokenize([self.text(messages, add_generation_prompt)])[0]

    def __call__(self, conversation: Conversation) -> Rendered:
        messages = conversation.as_dicts()
        turns = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        if self.strategy == MaskingStrategy.LAST_ASSISTANT:
            turns = turns[-1:]
        elif self.strategy == MaskingStrategy.ALL:
            turns = []
        try:
            # The whole conversation, then for each trained turn the prompt before it (with the
            # generation prompt) and the conversation through it.
            texts = [self.text(messages, False)]
            for i in turns:
                texts += [self.text(messages[:i], True), self.text(messages[: i + 1], False)]
        except Exception as e:  # jinja raise_exception and template errors
            raise RecordError("template_error", f"the chat template cannot render this conversation: {e}") from None
        ids = self.tokenize(texts)
        full = ids[0]
        if self.strategy == MaskingStrategy.ALL:
            return Rendered(full, list(full))
        labels = [IGNORE_INDEX] * len(full)
        for k, i in enumerate(turns):
            start, stop = self._turn_span(i, ids[1 + 2 * k], ids[2 + 2 * k], full)
            end = self._end_of_turn(full, start, stop)
            labels[start:end] = full[start:end]
        return Rendered(full, labels)

    def _turn_span(self, i: int, prompt: list[int], through: list[int], full: list[int]) -> tuple[int, int]:
        for name, prefix in (("the prompt before", prompt), ("the conversation through", through)):
            if full[: len(prefix)] != prefix:
                raise RecordError(
                    "template_mismatch",
                    f"{name} assistant turn {i} does not tokenize to a prefix of the whole conversation "
                    f"(first difference at token {_first_difference(prefix, full)}); the template renders "
                    "earlier turns differently once later turns follow, so the answer boundary is ambiguous",
                )
        if len(through) <= len(prompt):
            raise RecordError("template_mismatch", f"assistant turn {i} renders to no tokens after its prompt")
        return len(prompt), len(through)

    def _end_of_turn(self, ids: list[int], start: int, stop: int) -> int:
        """End (exclusive) of the trained span of a turn: through its last special token (the
        end-of-turn / EOS token) so that separators the template writes after it, such as
        ChatML's newline, carry no loss. A template that closes turns with no special token
        trains the whole span."""
        for pos in range(stop - 1, start - 1, -1):
            if ids[pos] in self.special_ids:
                return pos + 1
        return stop


def _first_difference(a: list[int], b: list[int]) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def end_of_turn_token_id(renderer: Renderer) -> int | None:
    """The special token that closes an assistant turn under this template (the token
    generation must stop at), found by rendering a probe conversation."""
    from lmforge.data.formats import Message, validate

    probe = validate([Message("user", "1"), Message(ASSISTANT, "2")])
    messages = probe.as_dicts()
    try:
        prompt = renderer.encode(messages[:1], add_generation_prompt=True)
        through = renderer.encode(messages, add_generation_prompt=False)
    except Exception as e:
        raise LmforgeError(f"the chat template cannot render a user/assistant exchange: {e}") from None
    for token in reversed(through[len(prompt) :]):
        if token in renderer.special_ids:
            return token
    return None


def template_end_of_turn(tokenizer) -> int | None:
    """The end-of-turn token of the tokenizer's own chat template, or None without one (a
    pretraining tokenizer); a model saved with it stops generating there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return end_of_turn_token_id(Renderer(tokenizer, tokenizer.chat_template))
    except LmforgeError:
        return None
