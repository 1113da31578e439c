"""Stage 3 of the data chain, render + mask: Conversation → (input_ids, labels), one render,
assistant spans found in the text, tokens labelled by their character offsets.

The ids are exactly `tokenizer.apply_chat_template(messages, tools=tools)`: the whole
conversation is rendered once with the chat template and tokenized once. The mask is defined on
that rendered text:

- An assistant turn's **span** runs from the end of the generation prompt before it (what the
  model is given at inference) to the end of the template's end-of-turn token that closes it
  (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...). Separators the template writes
  after that token (ChatML's newline) and text it writes only at the very end of a conversation
  (Phi-3's final EOS) are not in the span.
- A token carries loss when any of its characters lies in a span (the rule of transformers'
  `return_assistant_tokens_mask`). A token that straddles the start of a span, such as Qwen's
  "\\n\\n\\n" made of the template's newline after `assistant` and an answer's leading "\\n\\n",
  is trained: the answer's first characters are in it.

Spans are found by rendering prefixes of the conversation as text and comparing them with the
whole (`Renderer._span`): the prompt before turn i (`messages[:i]` with the generation prompt)
gives where the answer starts, the conversation through turn i where it ends. Where a template
renders a prefix differently from the whole (Qwen3 and DeepSeek-R1 drop earlier turns'
thinking, Mistral v0.3 moves the system prompt and tools to the last user turn), the turn's
payload is located instead by rendering the whole conversation with that message replaced by a
sentinel and comparing the two texts. Token prefixes are never compared: BPE merges across turn
boundaries, so they are not a property templates keep.

Characters become token indices without asking the tokenizer for offsets, which would double
the cost of tokenizing: a span boundary right after an added token (`<|im_end|>`) is that
token's index, and one a short piece of template text later ("assistant\n") is found by
tokenizing that piece alone (`Renderer._token_spans`). Only a record where a token straddles a
boundary is tokenized again with offsets. This is written here, not taken from HF, because
`return_assistant_tokens_mask` needs `{% generation %}` blocks that most published templates
lack; where they exist the masks agree (tested).

Labels follow the HF convention: aligned with input_ids, -100 where no loss; the model shifts.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, replace
from typing import Sequence

from lmforge.data.options import MaskingStrategy, Unrendered
from lmforge.data.schema import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message, is_blank_system, validate
from lmforge.errors import LmforgeError, RecordError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]
    dropped: tuple[str, ...] = ()
    """Parts of the record left out under `--unrendered drop` ("system", "reasoning", "tools")."""

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


def _token_pattern(contents: set[str]) -> re.Pattern | None:
    """Leftmost-longest matches of the given token texts, as the tokenizer's splitter finds them."""
    contents = {c for c in contents if c}
    if not contents:
        return None
    return re.compile("|".join(map(re.escape, sorted(contents, key=len, reverse=True))))


class AnchorScan:
    """Finds the tokenizer's anchor tokens in rendered text, where its splitter finds them.

    The `tokenizers` pipeline first splits the text on its added tokens, then normalizes,
    pre-tokenizes and encodes each piece between them on its own (a piece's tokens depend only
    on its text and on whether it starts the string). Anchors are the added tokens for which
    that can be used: matched before normalization (`normalized=False`), and with an id the
    model cannot produce from ordinary text, so that seeing the id in the tokens means the
    splitter put it there. The splitter matches non-normalized added tokens leftmost-longest,
    which is what the regular expression does. Tokenizers whose added tokens strip neighbouring
    spaces or match whole words only get no anchors (every record then takes the offsets path)."""

    def __init__(self, backend):
        added = backend.get_added_tokens_decoder() if backend is not None else {}
        plain = {i: t for i, t in added.items() if not t.normalized}
        model_ids = set(backend.get_vocab(with_added_tokens=False).values()) if plain else set()
        usable = plain and not any(t.lstrip or t.rstrip or t.single_word for t in plain.values()) \
            and not getattr(backend, "encode_special_tokens", False)
        self.ids: frozenset[int] = frozenset(i for i in plain if i not in model_ids) if usable else frozenset()
        self.by_content = {plain[i].content: i for i in self.ids}
        self.pattern = _token_pattern({t.content for t in plain.values()}) if self.ids else None

    def __call__(self, text: str, ids: list[int]) -> tuple[list[int], list[int]] | None:
        """(end characters, token indices) of the anchor tokens of `text`, whose tokens are
        `ids`; None when the text and the tokens do not show the same anchors in the same order."""
        ends, expected = [], []
        for m in self.pattern.finditer(text):
            token = self.by_content.get(m.group())
            if token is not None:
                ends.append(m.end())
                expected.append(token)
        anchors = self.ids
        positions = [k for k, t in enumerate(ids) if t in anchors]
        if len(positions) != len(expected) or any(ids[k] != t for k, t in zip(positions, expected)):
            return None
        return ends, positions


# Tails (the text from an anchor to a span boundary) up to this many characters have their
# tokens cached: they are template text ("assistant\n", "<|end_header_id|>\n\n").
TAIL_CACHE_CHARS = 128
TAIL_CACHE_ENTRIES = 4096


class CompiledTemplate:
    """A chat template that renders what `apply_chat_template(tokenize=False)` renders, at a
    fraction of the cost: spans need several renders per conversation, so renders are the
    largest cost after tokenizing.

    - The template runs in HF's own sandboxed environment (its globals, filters, extensions),
      through an overlay of it that differs in one method, `getattr` (`_DictFirstGetattr`).
    - It gets the variables apply_chat_template gives it (the special tokens, the tools, no
      documents), with the environment's globals merged once instead of on every call.
    Tests compare the texts with apply_chat_template's on every template."""

    def __init__(self, chat_template: str, variables: dict):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(chat_template).environment.overlay()
        environment.getattr = _DictFirstGetattr(environment)
        self.template = environment.from_string(chat_template)
        self.variables = {**dict(self.template.globals), **variables}

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        template = self.template
        variables = {**self.variables, "messages": messages, "tools": tools,
                     "add_generation_prompt": add_generation_prompt}
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


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix: slices are compared in C, halving the window."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the longest common suffix, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n == 0 or a[len(a) - n:] == b[len(b) - n:]:
        return n
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class TemplateTraits:
    """What the template writes around turns, from renders of probe conversations."""

    generation_prompt: str
    """What `add_generation_prompt` appends ("<|im_start|>assistant\\n", "<｜Assistant｜><think>\\n")."""
    final_suffix: str
    """Text written only at the very end of a conversation (Phi-3's EOS); usually ""."""
    renders_reasoning: bool
    """Whether the final assistant turn's `reasoning_content` appears in the render."""


@dataclass(frozen=True)
class ToolCallForm:
    """How a template takes an assistant turn that calls tools. Published templates disagree:
    most `tojson` the arguments (a mapping, the form records are read into), DeepSeek's
    concatenate them to text (a JSON string), and some add the content to the calls with `+`,
    so a call-only turn needs content "" there rather than none. A record in the form its
    template cannot take would be refused, so the form is chosen once per template by
    rendering a probe call in each (`Renderer.tool_form`)."""

    empty_content: bool
    """A call-only turn gets content "" (else it has no content key)."""
    string_arguments: bool
    """Call arguments go to the template as JSON text (else as the mapping)."""

    def apply(self, messages: list[dict]) -> list[dict]:
        if not (self.empty_content or self.string_arguments):
            return messages
        return [self._message(m) if m.get("tool_calls") else m for m in messages]

    def _message(self, message: dict) -> dict:
        out = dict(message)
        if self.empty_content:
            out.setdefault("content", "")
        if self.string_arguments:
            out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _json_text(c["function"]["arguments"])}}
                                 for c in message["tool_calls"]]
        return out


def _json_text(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


# In the order they are tried: the mapping first (HF's documented form), content left out first.
TOOL_CALL_FORMS = tuple(ToolCallForm(empty, text) for text in (False, True) for empty in (False, True))
PROBE_TOOL = {"type": "function", "function": {"name": "lookup_probe", "description": "Looks a value up.", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def sentinel_for(text: str) -> str:
    """Two private-use characters that `text` holds neither of: a message content no template
    writes elsewhere, to find where a message's own text lies."""
    unused = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)
    return next(unused) + next(unused)


class Renderer:
    """Renders conversations with one tokenizer and one jinja chat template."""

    def __init__(self, tokenizer, chat_template: str, strategy: MaskingStrategy = MaskingStrategy.ASSISTANT,
                 unrendered: Unrendered = Unrendered.ERROR, default_tools: tuple[dict, ...] | None = None):
        self.tokenizer = tokenizer
        self.default_tools = default_tools
        """Tools offered to a conversation that names none of its own (`--tools FILE`)."""
        self.chat_template = chat_template
        self.strategy = MaskingStrategy(strategy)
        self.unrendered = Unrendered(unrendered)
        self.special_ids = special_token_ids(tokenizer)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        # What apply_chat_template hands the template besides the messages and tools.
        self.template_vars = {"documents": None, **tokenizer.special_tokens_map}
        added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
        self.added_ids = frozenset(tokenizer.added_tokens_decoder)
        # Special tokens close turns; every added token is atomic text a boundary cannot cut.
        self.special_pattern = _token_pattern({c for c, special in added.items() if special}
                                              | set(tokenizer.all_special_tokens))
        self.added_pattern = _token_pattern(set(added) | set(tokenizer.all_special_tokens))
        self.anchors = AnchorScan(self.backend)
        self._init_caches()

    def _init_caches(self) -> None:
        self._compiled = _compile_template(self.chat_template, self.template_vars)
        self._traits: TemplateTraits | None = None
        self._tool_form: ToolCallForm | None = None
        self._tails: dict[str, list[int]] = {}

    # The compiled template holds closures and cannot be pickled; worker processes compile it again.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_compiled"], state["_traits"], state["_tool_form"], state["_tails"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    # -----------------------------------------------------------------------------------------
    # Text and tokens
    # -----------------------------------------------------------------------------------------

    def text(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        """The text `tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)` gives."""
        if self._compiled is None:
            return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.chat_template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        return self._compiled.render(messages, tools, add_generation_prompt)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Exactly the ids `apply_chat_template` gives for each text: tokenized without the
        tokenizer adding special tokens of its own (templates write their BOS themselves). The
        texts go to the Rust backend in one batch, without offsets (which double its cost)."""
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each token's [start, end) characters in its text."""
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [e.offsets for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self.tokenize([self.text(messages, add_generation_prompt)])[0]

    @property
    def traits(self) -> TemplateTraits:
        if self._traits is None:
            self._traits = self._probe()
        return self._traits

    @property
    def tool_form(self) -> ToolCallForm:
        if self._tool_form is None:
            self._tool_form = self._probe_tool_form()
        return self._tool_form

    def template_messages(self, conversation: Conversation) -> list[dict]:
        """The conversation's messages as this template takes them (`apply_chat_template`
        renders these to the same text)."""
        messages = conversation.as_dicts()
        # The form is probed (once) only when a record calls tools: the others never need it.
        return self.tool_form.apply(messages) if any(m.tool_calls for m in conversation.messages) else messages

    def _probe_tool_form(self) -> ToolCallForm:
        """The first form in which the template renders a probe call with its name and its
        argument; else the first in which it renders the name; else the first form (records
        with calls then get the template's own error, or are found lacking their calls)."""
        call = {"type": "function", "id": "call_probe", "function": {"name": "lookup_probe", "arguments": {"q": "\ue007"}}}
        messages = [{"role": USER, "content": "1"}, {"role": ASSISTANT, "tool_calls": [call]},
                    {"role": TOOL, "tool_call_id": "call_probe", "content": "2"}, {"role": ASSISTANT, "content": "3"}]
        texts = {}
        for form in TOOL_CALL_FORMS:
            try:
                texts[form] = self.text(form.apply(messages), False, [PROBE_TOOL])
            except Exception:  # the template's own error: this form is not the one it takes
                continue
        for wanted in (("lookup_probe", "\ue007"), ("lookup_probe",)):
            for form, text in texts.items():
                if all(w in text for w in wanted):
                    return form
        return TOOL_CALL_FORMS[0]

    def _probe(self) -> TemplateTraits:
        """Renders of small conversations that show what the template writes around turns."""
        u1, a1, u2 = {"role": USER, "content": "1"}, {"role": ASSISTANT, "content": "2"}, {"role": USER, "content": "3"}
        a2 = {"role": ASSISTANT, "content": "4"}
        error = None
        # Without tools first; a template that reads the tool list unguarded (llama.cpp's Phi-4-mini
        # loops over it) renders only conversations that offer tools.
        for tools in (None, [PROBE_TOOL]):
            try:
                # What a conversation ends with that a longer one does not have there. Probed after
                # a user turn: reasoning templates render a final assistant turn differently.
                before = self.text([u1, a1, u2], False, tools)
                final = before[self._cut(before, self.text([u1, a1, u2, a2], False, tools)):]
                user = self.text([u1], False, tools)
                user = user[: len(user) - len(final)] if final and user.endswith(final) else user
                prompt = self.text([u1], True, tools)
                generation = prompt[self._cut(prompt, user):]
                thought = Message(ASSISTANT, "2", reasoning="\ue006").as_dict()
                reasoning = "\ue006" in self.text([u1, thought], False, tools)
                return TemplateTraits(generation, final, reasoning)
            except Exception as e:
                error = error or e
        raise LmforgeError(f"the chat template cannot render a user/assistant exchange: {error}") from None

    def _cut(self, a: str, b: str) -> int:
        """Where `a` and `b` part, moved back to the start of an added token they part inside:
        "<|end|>\\n<|endoftext|>" and "<|end|>\\n<|user|>" part before "<|", not after it."""
        n = common_prefix(a, b)
        if n == len(a) or n == len(b):  # one is a prefix of the other: no token was cut
            return n
        return min(self._atom_start(a, n), self._atom_start(b, n))

    def _atom(self, text: str, pos: int) -> tuple[int, int] | None:
        """The added token of `text` that `pos` falls strictly inside, as (start, end)."""
        if self.added_pattern is None or pos == 0 or pos >= len(text):
            return None
        for m in self.added_pattern.finditer(text, max(0, pos - 64), min(len(text), pos + 64)):
            if m.start() < pos < m.end():
                return m.span()
        return None

    def _atom_start(self, text: str, pos: int) -> int:
        atom = self._atom(text, pos)
        return atom[0] if atom else pos

    def _atom_end(self, text: str, pos: int) -> int:
        atom = self._atom(text, pos)
        return atom[1] if atom else pos

    # -----------------------------------------------------------------------------------------
    # Conversation → text with spans
    # -----------------------------------------------------------------------------------------

    def trained_turns(self, messages: Sequence[Message]) -> list[int]:
        """Indices of the messages whose turns carry loss: the strategy's assistant turns, then
        each message's own `train` flag (tool results never)."""
        chosen = {i for i, m in enumerate(messages) if m.role == ASSISTANT}
        if self.strategy == MaskingStrategy.LAST_ASSISTANT:
            chosen = set(sorted(chosen)[-1:])
        for i, m in enumerate(messages):
            if m.train is not None and m.role != TOOL:
                (chosen.add if m.train else chosen.discard)(i)
        return sorted(chosen)

    def _full_text(self, conversation: Conversation) -> tuple[Conversation, list[dict], str, tuple[str, ...]]:
        """The conversation (and its messages as the template takes them) and its whole text,
        after checking that every part of the record is in it (`--unrendered drop` leaves out
        what is not, and says so)."""
        conversation = self.with_default_tools(conversation)
        dropped: list[str] = []
        while True:
            messages = self.template_messages(conversation)
            try:
                full = self.text(messages, False, conversation.tool_list)
                missing = None if conversation.plain else self._missing(conversation, messages, full)
            except Exception as e:  # jinja raise_exception and template errors
                if any(is_blank_system(m) for m in conversation.messages):
                    # A blank system message holds nothing to lose: a template that takes no
                    # system message (Gemma-2 raises on any) renders the record without it.
                    conversation = _without_system(conversation, blank_only=True)
                    continue
                missing = self._raises_on(conversation, e)
            if not missing:
                return conversation, messages, full, tuple(dropped)
            part, why = missing
            if self.unrendered == Unrendered.ERROR or part not in DROPPABLE:
                advice = "; pass --unrendered drop to train without it" if part in DROPPABLE else ""
                if part == "reasoning":
                    advice = ("; pass --reasoning_turns generated to train it as the model generates it, or "
                              "--unrendered drop to train without it")
                raise RecordError(f"unrendered_{part}" if part in DROPPABLE else "template_error", why + advice)
            conversation = DROPPABLE[part](conversation)
            dropped.append(part)

    def with_default_tools(self, conversation: Conversation) -> Conversation:
        """The conversation offering `--tools FILE`'s tools when it names none of its own."""
        if conversation.tools is None and self.default_tools is not None:
            return replace(conversation, tools=self.default_tools, plain=False)
        return conversation

    def _raises_on(self, conversation: Conversation, error: Exception) -> tuple[str, str]:
        """The part of the record a template error is about: a system message when the template
        renders the conversation without it (Gemma-2 raises on any), else the whole record."""
        if any(m.role == SYSTEM for m in conversation.messages):
            try:
                self.text(self.template_messages(_without_system(conversation)), False, conversation.tool_list)
                return "system", f"the chat template does not take a system message (it raises: {error})"
            except Exception:
                pass
        return "template", f"the chat template cannot render this conversation: {error}"

    def _missing(self, conversation: Conversation, as_given: list[dict], full: str) -> tuple[str, str] | None:
        """The first part of the record that the rendered text lacks, with why, or None.
        `as_given`: the messages as the template took them to render `full`."""
        messages = conversation.messages
        for i, m in enumerate(messages):
            if m.role == SYSTEM and not is_blank_system(m) and not self._renders_system(conversation, as_given, i, full):
                return "system", ("the chat template does not render this record's system message (Mistral v0.3's, "
                                  "for one, renders it only before a final user turn)")
        last = max(i for i, m in enumerate(messages) if m.role == ASSISTANT)
        for i, m in enumerate(messages):
            if m.role == ASSISTANT and _lost_reasoning(m, full, i == last, self.traits.renders_reasoning):
                return "reasoning", (f"the chat template does not render the reasoning of turn {i} ({m.role})"
                                     + ("" if self.traits.renders_reasoning else "; it renders no reasoning at all"))
        if conversation.tools and not all(_tool_name(t) in full for t in conversation.tools):
            return "tools", "the chat template does not render the record's tools"
        for i, m in enumerate(messages):
            if m.tool_calls and not self._renders_calls(conversation, as_given, i, full):
                return "tool_calls", f"the chat template does not render the tool calls of turn {i}"
            if m.role == TOOL and m.content.strip() and m.content.strip() not in full \
                    and json.dumps(m.content.strip(), ensure_ascii=False)[1:-1] not in full:
                return "tool_results", f"the chat template does not render the tool result of turn {i}"
        return None

    def _renders_system(self, conversation: Conversation, as_given: list[dict], i: int, full: str) -> bool:
        """Whether system message i is in the rendered text. A short one could also occur
        elsewhere in the text by chance: it is looked for as a sentinel put in its place."""
        content = conversation.messages[i].content.strip()
        if content not in full:
            return False
        if len(content) >= 32:
            return True
        sentinel = sentinel_for(full)
        messages = list(as_given)
        messages[i] = {**messages[i], "content": sentinel}
        return sentinel in self.text(messages, False, conversation.tool_list)

    def _renders_calls(self, conversation: Conversation, as_given: list[dict], i: int, full: str) -> bool:
        """Whether the tool calls of message i are in the rendered text. Their names do not
        tell: the record's tools hold them too, and templates render those (Kimi-K2's renders
        the tools and no calls). Each call's name is looked for as a sentinel put in its place."""
        calls = conversation.messages[i].tool_calls
        if not all(c["function"]["name"] in full for c in calls):
            return False
        sentinel = sentinel_for(full)
        messages = list(as_given)
        messages[i] = {**messages[i], "tool_calls": [{**c, "function": {**c["function"], "name": sentinel}}
                                                     for c in messages[i]["tool_calls"]]}
        try:
            return sentinel in self.text(messages, False, conversation.tool_list)
        except Exception:  # a template that checks calls against the tools it was given: the names were there
            return True

    def _span(self, messages: list[dict], tools, full: str, i: int, after: int) -> tuple[int, int]:
        """Characters [start, end) of `full` that message i's turn trains (see the module
        docstring); `after` is where the previous trained span ended."""
        traits = self.traits
        end = None  # the end of the turn's text, where prefix renders agree with the whole
        if i + 1 == len(messages):
            end = len(full) - len(traits.final_suffix) if full.endswith(traits.final_suffix) else len(full)
        else:
            through = self.text(messages[: i + 1], False, tools)
            if traits.final_suffix and through.endswith(traits.final_suffix):
                through = through[: len(through) - len(traits.final_suffix)]
            if full.startswith(through):
                end = len(through)
        start, prompt = None, ""
        if i > 0:
            prompt = self.text(messages[:i], True, tools)
            cut = self._cut(full, prompt)
            if len(prompt) - len(traits.generation_prompt) <= cut and after <= cut and (end is None or cut <= end):
                start = cut
        if start is None or end is None:
            payload_start, payload_end = self._payload(messages, tools, full, i)
            if start is None:
                start = self._opener_end(full, prompt, after, payload_start) if i > 0 else payload_start
            if end is None:
                return start, self._closer_end(full, payload_end, payload_end)
        return start, self._closer_end(full, start, end, last=True)

    def _opener_end(self, full: str, prompt: str, after: int, payload_start: int) -> int:
        """Where a turn starts when the prompt before it renders differently from the whole
        conversation (Mistral v0.3 moves tools and the system prompt to the last user turn): after
        the nearest text before the turn's payload that the prompt ends with, from its last
        added token on ("[/INST]", "<|end_header_id|>\n\n", "<|im_start|>assistant\n")."""
        if self.added_pattern is not None:
            tokens = list(self.added_pattern.finditer(prompt, max(0, len(prompt) - 256)))
            if tokens:
                opener = prompt[tokens[-1].start():]
                at = full.rfind(opener, after, payload_start)
                if at >= 0:
                    return at + len(opener)
        return payload_start

    def _payload(self, messages: list[dict], tools, full: str, i: int) -> tuple[int, int]:
        """Where message i's own text (content, reasoning, tool calls) lies in `full`: the
        whole conversation rendered with that message replaced by a sentinel differs from
        `full` there and nowhere else."""
        sentinel = sentinel_for(full)
        swapped = list(messages)
        payload_keys = ("content", "tool_calls", "reasoning_content", "thinking")
        swapped[i] = {k: v for k, v in messages[i].items() if k not in payload_keys}
        if messages[i].get("tool_calls"):  # still a call (templates check roles around calls), to a sentinel
            call = messages[i]["tool_calls"][0]
            swapped[i]["tool_calls"] = [{**call, "function": {"name": sentinel, "arguments": {}}}]
            swapped = self.tool_form.apply(swapped)
        else:
            swapped[i]["content"] = sentinel
        other = self.text(swapped, False, tools)
        start = self._cut(full, other)
        end = len(full) - common_suffix(full, other, len(full) - start)
        end = self._atom_end(full, end)
        if other == full or end < start:
            raise RecordError("unrendered_turn", (
                f"the chat template renders turn {i} ({messages[i]['role']}) the same whatever it holds, so it has "
                "nothing of that turn to train on" + ("; --reasoning_turns split trains each assistant turn rendered as "
                                                      "the last" if i + 1 < len(messages) else "")))
        return start, end

    def _closer_end(self, full: str, start: int, end: int, last: bool = False) -> int:
        """The end of the special token that closes a turn: the last one in [start, end) when
        `end` is where the turn's text ends (`last`), else the first one from `start` on. A
        template without special tokens around turns trains up to `end`."""
        if self.special_pattern is None:
            return end
        if last:
            closer = end
            for m in self.special_pattern.finditer(full, start, end):
                closer = m.end()
            return closer
        m = self.special_pattern.search(full, start)
        return m.end() if m else end

    def _spans(self, conversation: Conversation, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """The trained character spans of `full`, in order. Under `--masking all` that is the
        whole text but the turns of messages marked `train: false`."""
        tools = conversation.tool_list
        if self.strategy == MaskingStrategy.ALL:  # all but untrained turns and tool results
            off = [i for i, m in enumerate(conversation.messages) if m.train is False and m.role != TOOL]
            results = [self._payload(messages, tools, full, i) for i, m in enumerate(conversation.messages)
                       if m.role == TOOL]
            return _complement(sorted(self._turn_spans(messages, tools, full, off) + results), len(full))
        return self._turn_spans(messages, tools, full, self.trained_turns(conversation.messages))

    def _turn_spans(self, messages: list[dict], tools, full: str, turns: list[int]) -> list[tuple[int, int]]:
        spans, after = [], 0
        try:
            for i in turns:
                start, end = self._span(messages, tools, full, i, after)
                if end <= start:
                    raise RecordError("template_error", f"turn {i} ({messages[i]['role']}) renders to no text to train on")
                spans.append((start, end))
                after = end
        except RecordError:
            raise
        except Exception as e:  # a template that raises on a prefix of a conversation it renders whole
            raise RecordError("template_error", f"the chat template cannot render a part of this conversation: {e}") \
                from None
        return spans

    # -----------------------------------------------------------------------------------------
    # A turn written as the model generates it (--reasoning_turns generated)
    # -----------------------------------------------------------------------------------------

    def _drops_final_reasoning(self, conversation: Conversation) -> bool:
        """Whether the template leaves out the reasoning of the conversation's last turn, the
        turn being trained (DeepSeek-R1-Distill's cuts every <think> block)."""
        last = conversation.messages[-1]
        if last.role != ASSISTANT or not _reasoning_and_answer(last)[0]:
            return False
        try:
            full = self.text(self.template_messages(conversation), False, conversation.tool_list)
        except Exception:  # the template's own error: the ordinary path reports it
            return False
        return _lost_reasoning(last, full, True, self.traits.renders_reasoning)

    def _generated(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]], tuple[str, ...]]:
        """(text, trained span, parts left out) of a sample whose last turn is written as the
        model generates it: the earlier turns rendered by the template with the generation
        prompt, as at inference (their reasoning left out, as clients send history: the answer
        alone), then `<think>\n{reasoning}\n</think>\n\n{answer}` (less what the generation
        prompt already opens, R1-Distill's "<think>\n") and the template's end-of-turn token.
        The rest of the record (system, tools, calls, results) is checked as for any record."""
        plain, messages, _, dropped = self._full_text(_without_reasoning(conversation))
        head, tools = messages[:-1], plain.tool_list
        prompt = self.text(head, True, tools)
        reasoning, answer = _reasoning_and_answer(conversation.messages[-1])
        completion = f"{THINK_OPEN}{reasoning}\n</think>\n\n{answer}"
        opened = next((k for k in range(len(THINK_OPEN), 0, -1) if prompt.endswith(THINK_OPEN[:k])), 0)
        full = prompt + completion[opened:] + self._turn_closer(head, tools, prompt)
        return full, [(len(prompt), len(full))], dropped

    def _turn_closer(self, head: list[dict], tools, prompt: str) -> str:
        """The text a template writes after an assistant answer that follows `head` (whose
        `prompt` is given), up to and with its end-of-turn token ("<｜end▁of▁sentence｜>")."""
        sentinel = sentinel_for(prompt)
        text = self.text(head + [{"role": ASSISTANT, "content": sentinel}], False, tools)
        after = text[text.rindex(sentinel) + len(sentinel):]
        m = self.special_pattern.search(after) if self.special_pattern is not None else None
        if m is not None:
            return after[: m.end()]
        final = self.traits.final_suffix
        return after[: len(after) - len(final)] if final and after.endswith(final) else after

    # -----------------------------------------------------------------------------------------
    # Batches
    # -----------------------------------------------------------------------------------------

    def __call__(self, conversation: Conversation) -> Rendered:
        result = self.render_batch([conversation])[0]
        if isinstance(result, RecordError):
            raise result
        return result

    def render_batch(self, conversations: Sequence[Conversation]) -> list[Rendered | RecordError]:
        """Each conversation's `Rendered` or its RecordError; the texts are tokenized in one batch."""
        results: list[Rendered | RecordError | None] = [None] * len(conversations)
        texts, spans, dropped, where = [], [], [], []
        for r, conversation in enumerate(conversations):
            try:
                if conversation.generated and self._drops_final_reasoning(conversation):
                    full, record_spans, parts = self._generated(conversation)
                else:
                    conversation, messages, full, parts = self._full_text(conversation)
                    record_spans = self._spans(conversation, messages, full)
                spans.append(record_spans)
            except RecordError as e:
                results[r] = e
                continue
            texts.append(full)
            dropped.append(parts)
            where.append(r)
        all_ids = self.tokenize(texts)
        token_spans = [self._token_spans(text, ids, record_spans)
                       for text, ids, record_spans in zip(texts, all_ids, spans)]
        unplaced = [k for k, t in enumerate(token_spans) if t is None]
        for k, offsets in zip(unplaced, self.offsets([texts[k] for k in unplaced])):
            token_spans[k] = spans_to_tokens(offsets, spans[k], all_ids[k], self.added_ids)
        for r, ids, record_spans, parts in zip(where, all_ids, token_spans, dropped):
            labels = [IGNORE_INDEX] * len(ids)
            for start, stop in record_spans:
                labels[start:stop] = ids[start:stop]
            results[r] = Rendered(ids, labels, parts)
        return results  # type: ignore[return-value]

    def _token_spans(self, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """Token index ranges of character spans without the tokenizer's offsets: a boundary
        right after an anchor token is that token's index; one after an anchor and a short
        tail is where the tail's own tokens end, when the text's tokens continue with exactly
        them (`AnchorScan` says why pieces between anchors tokenize alone). None when a
        boundary is not shown to fall between tokens (a token straddles it): the caller then
        asks the tokenizer for offsets."""
        if not spans:
            return []
        if not self.anchors.ids:
            return None
        found = self.anchors(text, ids)
        if found is None:
            return None
        ends, positions = found
        out = []
        for start, stop in spans:
            first, last = self._boundary(text, ids, ends, positions, start), \
                self._boundary(text, ids, ends, positions, stop)
            if first is None or last is None:
                return None
            out.append((first, last))
        return out

    def _boundary(self, text: str, ids: list[int], ends: list[int], positions: list[int], char: int) -> int | None:
        if char == len(text):
            return len(ids)
        a = bisect.bisect_right(ends, char) - 1  # the last anchor ending at or before `char`
        anchor_end, token = (ends[a], positions[a] + 1) if a >= 0 else (0, 0)
        if anchor_end == char:
            return token
        tail = self._tail_ids(text[anchor_end:char])
        if ids[token : token + len(tail)] != tail:
            return None
        return token + len(tail)

    def _tail_ids(self, tail: str) -> list[int]:
        ids = self._tails.get(tail)
        if ids is None:
            ids = self.tokenize([tail])[0]
            if len(tail) <= TAIL_CACHE_CHARS:
                if len(self._tails) >= TAIL_CACHE_ENTRIES:
                    self._tails.clear()
                self._tails[tail] = ids
        return ids


def spans_to_tokens(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]], ids: Sequence[int] = (),
                    added_ids: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Token index ranges of character spans: a token belongs to a span when any of its
    characters lies in it (spans sorted and disjoint; a token on the boundary of two spans goes
    to the first), except an added token (`added_ids`) that starts before the span: that is the
    template's own header, which took the answer's first characters in (Phi-3's `<|assistant|>`
    strips the whitespace after it), and a model must never learn to emit it."""
    ends = [e for _, e in offsets]
    out = []
    for start, stop in spans:
        first = bisect.bisect_right(ends, start)  # the first token ending after the span starts
        if first < len(offsets) and offsets[first][0] < start and ids and ids[first] in added_ids:
            first += 1
        last = first
        while last < len(offsets) and offsets[last][0] < stop:
            last += 1
        out.append((first, max(last, first)))
    return out


def _complement(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    out, at = [], 0
    for start, end in spans:
        if start > at:
            out.append((at, start))
        at = max(at, end)
    if at < length:
        out.append((at, length))
    return out


def _lost_reasoning(m: Message, full: str, last: bool, renders_reasoning: bool) -> bool:
    """Whether the thinking an assistant message carries is missing from the rendered text.
    Reasoning templates drop earlier turns' thinking by design (--reasoning_turns split trains
    it), so only the last turn's is looked for there; a template that renders no reasoning
    field loses any, and one that rewrites contents (DeepSeek-R1's cuts "<think>" blocks out)
    loses a <think> block unless the content is there as written."""
    if m.reasoning is not None and m.reasoning.strip():
        return not renders_reasoning or (last and m.reasoning.strip() not in full)
    thought = _think_block(m.content)
    if not thought:
        return False
    if renders_reasoning:
        return last and thought not in full
    return m.content.strip() not in full


THINK_OPEN = "<think>\n"


def _reasoning_and_answer(m: Message) -> tuple[str, str]:
    """An assistant message's reasoning (its field, else a <think> block opening its content)
    and its answer, newlines around each trimmed as reasoning templates write them (Qwen3's)."""
    if m.reasoning is not None and m.reasoning.strip():
        return m.reasoning.strip("\n"), m.content.lstrip("\n")
    if not _think_block(m.content):
        return "", m.content
    return (m.content.split("</think>")[0].split("<think>")[-1].strip("\n"),
            m.content.split("</think>")[-1].lstrip("\n"))


def _think_block(content: str) -> str | None:
    """The text of a <think> block at the start of a content, or None."""
    if "</think>" not in content:
        return None
    return content.split("</think>")[0].split("<think>")[-1].strip() or None


def _tool_name(tool: dict) -> str:
    """A tool's function name (`parse_tools` gives every function schema OpenAI's shape)."""
    function = tool.get("function")
    return function.get("name", "") if isinstance(function, dict) else ""


def _without_system(conversation: Conversation, blank_only: bool = False) -> Conversation:
    """The conversation without its system messages (`blank_only`: without its blank ones)."""
    return Conversation(tuple(m for m in conversation.messages
                              if not (is_blank_system(m) if blank_only else m.role == SYSTEM)), conversation.tools)


def _without_reasoning(conversation: Conversation) -> Conversation:
    def plain(m: Message) -> Message:
        content = m.content.split("</think>")[-1].lstrip("\n") if "</think>" in m.content else m.content
        return m._replace(reasoning=None, content=content)

    return Conversation(tuple(plain(m) if m.role == ASSISTANT else m for m in conversation.messages),
                        conversation.tools)


def _without_tools(conversation: Conversation) -> Conversation:
    return Conversation(conversation.messages, None)


# Parts a record can be trained without, when the user asks for it (`--unrendered drop`).
DROPPABLE = {"system": _without_system, "reasoning": _without_reasoning, "tools": _without_tools}


def split_turns(conversation: Conversation, renderer: Renderer, generated: bool = False) -> list[Conversation]:
    """One conversation per trained assistant turn, ending with it and training only it:
    each turn rendered as the last, as reasoning templates render the turn they generate
    (`--reasoning_turns split`); `generated`: written as the model generates it where the
    template leaves its reasoning out (`--reasoning_turns generated`, `Renderer._generated`)."""
    messages = conversation.messages
    out = []
    for i in renderer.trained_turns(messages):
        if messages[i].role != ASSISTANT:
            continue
        head = tuple(m._replace(train=False) if m.role == ASSISTANT else m for m in messages[:i])
        out.append(Conversation(head + (messages[i]._replace(train=True),), conversation.tools, conversation.plain,
                                generated))
    return out


def end_of_turn_token_id(renderer: Renderer) -> int | None:
    """The special token that closes an assistant turn under this template (the token
    generation must stop at), found by rendering a probe conversation."""
    probe = validate([Message(USER, "1"), Message(ASSISTANT, "2")])
    if renderer.strategy == MaskingStrategy.ALL:  # every token trained: the answer's span is not marked
        renderer = Renderer(renderer.tokenizer, renderer.chat_template)
    try:
        rendered = renderer(probe)
    except RecordError as e:
        raise LmforgeError(f"the chat template cannot render a user/assistant exchange: {e}") from None
    trained = [t for t, label in zip(rendered.input_ids, rendered.labels) if label != IGNORE_INDEX]
    return next((t for t in reversed(trained) if t in renderer.special_ids), None)


def template_end_of_turn(tokenizer) -> int | None:
    """The end-of-turn token of the tokenizer's own chat template, or None without one (a
    pretraining tokenizer); a model saved with it stops generating there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return end_of_turn_token_id(Renderer(tokenizer, tokenizer.chat_template))
    except LmforgeError:
        return None
