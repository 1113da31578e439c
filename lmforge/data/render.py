"""Conversation → (input_ids, labels), with loss only where the masking strategy says.

Boundaries between turns are found by rendering token-level prefixes with the chat template:
for assistant turn i, the tokens of `messages[:i]` with the generation prompt are where the
answer starts, and the tokens of `messages[:i + 1]` are where the turn ends. Both must be exact
token prefixes of the whole conversation; if not (a template that rewrites earlier turns, a
tokenizer that merges across the boundary), the record is refused by name instead of being
trained with a shifted mask. No string offsets, no per-template token arithmetic.

Labels follow the HF convention: aligned with input_ids, -100 where no loss; the model shifts.

Two paths give the same result. `Renderer.render_exact` is the definition: it tokenizes the
whole conversation and every prefix. `Renderer.render_batch` is the fast path used for data
preparation, written here because HF has no batched renderer with exact per-turn masks (its
`return_assistant_tokens_mask` needs `{% generation %}` markers that most templates lack), and
tokenizing every prefix costs several times the conversation itself. The fast path still
renders every prefix as text (with the compiled template, `CompiledTemplate`, at a fraction of
apply_chat_template's cost) and checks that each is a string prefix of the conversation, but
tokenizes only the whole conversation, a batch at a time. Each prefix's tokens are then the
conversation's tokens up to the last added token (`AnchorScan`) inside the prefix, followed by
the tokens of the short rest of the prefix, which are compared with the conversation's: the
exact path's test, decided without tokenizing the prefix again (`_prefix_length` says why).
A record the fast path cannot settle goes to the exact path, which decides.
"""

from __future__ import annotations

import bisect
import enum
import re
from dataclasses import dataclass
from typing import Sequence

from lmforge.data.formats import ASSISTANT, Conversation
from lmforge.errors import LmforgeError, RecordError

IGNORE_INDEX = -100

# Prefix tails up to this many characters have their tokens cached: they are template text
# ("<|im_start|>assistant\n", "<|im_end|>\n"), the same in every record.
TAIL_CACHE_CHARS = 128
TAIL_CACHE_ENTRIES = 4096


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
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (EOS, end-of-turn markers, ...)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            ids.add(token_id)
    return frozenset(ids)


class AnchorScan:
    """Finds the tokenizer's anchor tokens in rendered text, where its splitter finds them.

    The `tokenizers` pipeline first splits the text on its added tokens, then normalizes,
    pre-tokenizes and encodes each piece between them on its own (a piece's tokens depend only
    on its text and on whether it starts the string). So the tokens before an added token do
    not depend on what follows it. Anchors are the added tokens for which that can be used:
    matched before normalization (`normalized=False`), and with an id the model cannot produce
    from ordinary text, so that seeing the id in the tokens means the splitter put it there.
    The splitter matches all non-normalized added tokens leftmost-longest, which is what the
    regular expression below does (alternatives longest first). Tokenizers whose added tokens
    strip neighbouring spaces or match whole words only get no anchors (the exact path)."""

    def __init__(self, backend):
        added = backend.get_added_tokens_decoder() if backend is not None else {}
        plain = {i: t for i, t in added.items() if not t.normalized}
        model_ids = set(backend.get_vocab(with_added_tokens=False).values()) if plain else set()
        usable = plain and not any(t.lstrip or t.rstrip or t.single_word for t in plain.values()) \
            and not getattr(backend, "encode_special_tokens", False)
        self.ids: frozenset[int] = frozenset(i for i in plain if i not in model_ids) if usable else frozenset()
        self.by_content = {plain[i].content: i for i in self.ids}
        contents = sorted({t.content for t in plain.values()}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, contents))) if self.ids else None

    def __call__(self, text: str, ids: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """(start characters, end characters, token indices) of the anchor tokens of `text`,
        whose tokens are `ids`; None when the text and the tokens do not show the same anchors
        in the same order (the caller then takes the exact path)."""
        starts, ends, expected = [], [], []
        for m in self.pattern.finditer(text):
            token = self.by_content.get(m.group())
            if token is not None:
                starts.append(m.start())
                ends.append(m.end())
                expected.append(token)
        anchors = self.ids
        positions = [k for k, t in enumerate(ids) if t in anchors]
        if len(positions) != len(expected) or any(ids[k] != t for k, t in zip(positions, expected)):
            return None
        return starts, ends, positions


class CompiledTemplate:
    """A chat template that renders what `apply_chat_template(tokenize=False)` renders, for
    plain {role, content} string messages, at a fraction of the cost. The fast path renders
    every prefix of every conversation, so renders are its largest cost after tokenizing.

    - The template runs in HF's own sandboxed environment (its globals, filters, extensions),
      through an overlay of it that differs in one method, `getattr` (`_DictFirstGetattr`).
    - It gets the variables apply_chat_template gives it (the special tokens, no tools, no
      documents), with the environment's globals merged once instead of on every call, and
      without apply_chat_template's per-call argument handling.
    Tests compare the texts with apply_chat_template's on every template."""

    def __init__(self, chat_template: str, variables: dict):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(chat_template).environment.overlay()
        environment.getattr = _DictFirstGetattr(environment)
        self.template = environment.from_string(chat_template)
        self.variables = {**dict(self.template.globals), **variables}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = self.template
        variables = {**self.variables, "messages": messages, "add_generation_prompt": add_generation_prompt}
        context = template.new_context(variables, shared=True)  # shared: `variables` already holds the globals
        return template.environment.concat(template.root_render_func(context))


class _DictFirstGetattr:
    """`message.role` in a template, answered without an exception.

    Jinja's sandbox resolves `obj.name` by trying Python's getattr first, and on AttributeError
    `obj["name"]`. Templates read every message field that way, so half the time of a render
    went into raising and catching AttributeError. For a plain dict and a name that is not an
    attribute of dict, getattr always fails, so this goes straight to the key, and to the same
    undefined value when the key is missing; everything else (dict methods such as `items`,
    dunder names, other objects) takes the sandbox's own path and its checks."""

    DICT_ATTRIBUTES = frozenset(dir(dict))

    def __init__(self, environment):
        self.sandboxed = environment.getattr
        self.undefined = environment.undefined

    def __call__(self, obj, attribute):
        if type(obj) is dict and attribute not in self.DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return self.sandboxed(obj, attribute)


def _compile_template(chat_template: str, variables: dict) -> CompiledTemplate | None:
    try:
        return CompiledTemplate(chat_template, variables)
    except ImportError:  # pragma: no cover - a transformers version without HF's template compiler
        return None


class Renderer:
    """Renders conversations with one tokenizer and one jinja chat template."""

    def __init__(self, tokenizer, chat_template: str, strategy: MaskingStrategy = MaskingStrategy.ASSISTANT):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.strategy = MaskingStrategy(strategy)
        self.special_ids = special_token_ids(tokenizer)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        # What apply_chat_template hands the template besides the messages.
        self.template_vars = {"tools": None, "documents": None, **tokenizer.special_tokens_map}
        self.anchors = AnchorScan(self.backend)
        self._init_caches()

    def _init_caches(self) -> None:
        self._compiled = _compile_template(self.chat_template, self.template_vars)
        self._tails: dict[str, list[int]] = {}

    # The compiled template holds closures and cannot be pickled; worker processes compile it again.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_compiled"], state["_tails"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The text `tokenizer.apply_chat_template(messages, tokenize=False)` gives."""
        if self._compiled is None:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return self._compiled.render(messages, add_generation_prompt)

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

    def _trained_turns(self, messages: list[dict]) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        if self.strategy == MaskingStrategy.LAST_ASSISTANT:
            return turns[-1:]
        if self.strategy == MaskingStrategy.ALL:
            return []
        return turns

    def _texts(self, messages: list[dict], turns: list[int]) -> list[str]:
        """The whole conversation, then for each trained turn the prompt before it (with the
        generation prompt) and the conversation through it. The conversation through its last
        message is the whole conversation: not rendered twice."""
        try:
            full = self.text(messages, False)
            texts = [full]
            for i in turns:
                through = full if i + 1 == len(messages) else self.text(messages[: i + 1], False)
                texts += [self.text(messages[:i], True), through]
        except Exception as e:  # jinja raise_exception and template errors
            raise RecordError("template_error", f"the chat template cannot render this conversation: {e}") from None
        return texts

    def __call__(self, conversation: Conversation) -> Rendered:
        result = self.render_batch([conversation])[0]
        if isinstance(result, RecordError):
            raise result
        return result

    # -----------------------------------------------------------------------------------------
    # The exact path: every prefix tokenized.
    # -----------------------------------------------------------------------------------------

    def render_exact(self, conversation: Conversation) -> Rendered:
        """The definition of the masks: the conversation and each prefix tokenized, each
        prefix required to be a token prefix of the conversation."""
        messages = conversation.as_dicts()
        turns = self._trained_turns(messages)
        ids = self.tokenize(self._texts(messages, turns))
        full = ids[0]
        bounds = []
        for k, i in enumerate(turns):
            bounds.append(self._turn_span(i, ids[1 + 2 * k], ids[2 + 2 * k], full))
        return self._labelled(full, bounds)

    def _turn_span(self, i: int, prompt: list[int], through: list[int], full: list[int]) -> tuple[int, int]:
        for name, prefix in (("the prompt before", prompt), ("the conversation through", through)):
            if full[: len(prefix)] != prefix:
                raise RecordError(
                    "template_mismatch",
                    f"{name} assistant turn {i} does not tokenize to a prefix of the whole conversation "
                    f"(first difference at token {_first_difference(prefix, full)}); the template renders "
                    "earlier turns differently once later turns follow, so the answer boundary is ambiguous",
                )
        return self._checked_span(i, len(prompt), len(through))

    @staticmethod
    def _checked_span(i: int, start: int, stop: int) -> tuple[int, int]:
        if stop <= start:
            raise RecordError("template_mismatch", f"assistant turn {i} renders to no tokens after its prompt")
        return start, stop

    def _labelled(self, full: list[int], spans: list[tuple[int, int]]) -> Rendered:
        if self.strategy == MaskingStrategy.ALL:
            return Rendered(full, list(full))
        labels = [IGNORE_INDEX] * len(full)
        for start, stop in spans:
            end = self._end_of_turn(full, start, stop)
            labels[start:end] = full[start:end]
        return Rendered(full, labels)

    def _end_of_turn(self, ids: list[int], start: int, stop: int) -> int:
        """End (exclusive) of the trained span of a turn: through its last special token (the
        end-of-turn / EOS token) so that separators the template writes after it, such as
        ChatML's newline, carry no loss. A template that closes turns with no special token
        trains the whole span."""
        for pos in range(stop - 1, start - 1, -1):
            if ids[pos] in self.special_ids:
                return pos + 1
        return stop

    # -----------------------------------------------------------------------------------------
    # The fast path: the whole conversation tokenized once per record, a batch at a time.
    # -----------------------------------------------------------------------------------------

    def render_batch(self, conversations: Sequence[Conversation]) -> list[Rendered | RecordError]:
        """`render_exact` for each conversation (its result or its RecordError), computed with
        one tokenization of each whole conversation instead of one per prefix. A record the fast
        path cannot settle (a prefix that is not a string prefix, a tail whose tokens differ,
        anchors it cannot place) is rendered by `render_exact`, which then decides."""
        results: list[Rendered | RecordError | None] = [None] * len(conversations)
        rendered: list[tuple[int, list[int], list[str]]] = []  # (record, trained turns, texts)
        for r, conversation in enumerate(conversations):
            messages = conversation.as_dicts()
            turns = self._trained_turns(messages)
            try:
                texts = self._texts(messages, turns)
            except RecordError as e:
                results[r] = e
                continue
            full = texts[0]
            if all(full.startswith(t) for t in texts[1:]):
                rendered.append((r, turns, texts))
        if self.strategy == MaskingStrategy.ALL:  # no boundaries: the whole conversation is all there is
            for (r, _, _), ids in zip(rendered, self.tokenize([texts[0] for _, _, texts in rendered])):
                results[r] = self._labelled(ids, [])
        elif self.anchors.ids:
            self._render_at_anchors(rendered, results)
        for r, result in enumerate(results):
            if result is None:
                try:
                    results[r] = self.render_exact(conversations[r])
                except RecordError as e:
                    results[r] = e
        return results  # type: ignore[return-value]

    def _render_at_anchors(self, rendered: list[tuple[int, list[int], list[str]]],
                           results: list[Rendered | RecordError | None]) -> None:
        """Token counts of the prefixes from the whole conversation's tokens: each prefix's
        tokens are the conversation's tokens up to the last anchor token within the prefix,
        then the tokens of the rest of the prefix (its tail), checked against what follows in
        the conversation's tokens (`_prefix_length`)."""
        full_ids = self.tokenize([texts[0] for _, _, texts in rendered])
        settled = []  # (record, turns, ids, [(anchor token index, tail) per prefix])
        for (r, turns, texts), ids in zip(rendered, full_ids):
            cuts = self._cuts(texts[0], ids, [len(t) for t in texts[1:]])
            if cuts is not None:
                settled.append((r, turns, ids, cuts))
        tails = self._tail_ids([tail for *_, cuts in settled for _, tail in cuts])
        for r, turns, ids, cuts in settled:
            counts = [_prefix_length(ids, anchor, tails[tail]) for anchor, tail in cuts]
            if None in counts:
                continue  # left to the exact path
            try:
                spans = [self._checked_span(i, counts[2 * k], counts[2 * k + 1]) for k, i in enumerate(turns)]
            except RecordError as e:
                results[r] = e
                continue
            results[r] = self._labelled(ids, spans)

    def _cuts(self, full: str, ids: list[int], lengths: list[int]) -> list[tuple[int, str]] | None:
        """For each prefix of `full` (given by its length in characters): the token index of
        the last anchor token that ends within it (0 if none) and the prefix's text from that
        anchor on. None if the anchors in the text and in `ids` do not agree."""
        found = self.anchors(full, ids)
        if found is None:
            return None
        starts, ends, positions = found
        cuts = []
        for n in lengths:
            if n == len(full):
                cuts.append((len(ids), ""))  # the whole conversation
                continue
            a = bisect.bisect_right(ends, n) - 1  # the last anchor ending within the prefix
            cuts.append((positions[a], full[starts[a] : n]) if a >= 0 else (0, full[:n]))
        return cuts

    def _tail_ids(self, tails: list[str]) -> dict[str, list[int]]:
        """Tokens of each tail: short ones (template text) from the cache, the rest in one batch."""
        cache = self._tails
        out = {t: cache[t] for t in tails if t in cache}
        missing = list(dict.fromkeys(t for t in tails if t not in out))
        for tail, ids in zip(missing, self.tokenize(missing) if missing else []):
            out[tail] = ids
            if len(tail) <= TAIL_CACHE_CHARS:
                if len(cache) >= TAIL_CACHE_ENTRIES:
                    cache.clear()
                cache[tail] = ids
        return out


def _prefix_length(ids: list[int], anchor: int, tail_ids: list[int]) -> int | None:
    """The number of tokens the prefix tokenizes to, if it is a token prefix of the whole
    conversation `ids`; None when that is not shown (the exact path then decides).

    The prefix is the conversation's text up to its anchor token at index `anchor` (or
    nothing), then a tail that starts with that anchor and tokenizes to `tail_ids`. Pieces
    between anchors are tokenized independently (`AnchorScan`), so the prefix's tokens are
    `ids[:anchor] + tail_ids`, and it is a token prefix of the conversation exactly when
    `tail_ids` is what follows in `ids`: the exact path's test, decided without tokenizing the
    text before the anchor again. Tokens are compared, not character offsets: a prompt that
    ends in two spaces, followed by a digit, ends on a token boundary of the conversation, yet
    the two spaces alone are one token, not the two the conversation has there."""
    stop = anchor + len(tail_ids)
    if ids[anchor:stop] != tail_ids:
        return None
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
