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

This is written here, not taken from HF, because `return_assistant_tokens_mask` needs
`{% generation %}` blocks that most published templates lack; where they exist the masks agree
(tested).

The parts, each in a module of its own: text_spans.py compares rendered texts (prefix / suffix,
the opener and closer of a turn; no tokenizer), template_probes.py learns what the template
does (compiled once, its traits, its tool-call form), token_spans.py turns the character spans
into token spans (without offsets where it can). This module renders and decides the spans.

Labels follow the HF convention: aligned with input_ids, -100 where no loss; the model shifts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Sequence

from lmforge.data.options import MaskingStrategy, Unrendered
from lmforge.data.schema import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message, is_blank_system, validate
from lmforge.data.template_probes import TemplateTraits, ToolCallForm, compile_template, probe_tool_form, probe_traits
from lmforge.data.text_spans import (Span, closer_text, complement, differing_span, last_closer_end, next_closer_end,
                                     opener_end, sentinel_for, token_pattern, turn_end, turn_start)
from lmforge.data.token_spans import TokenMap
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
        """How many tokens carry loss."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (EOS, end-of-turn markers, ...)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            ids.add(token_id)
    return frozenset(ids)


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
        # What apply_chat_template hands the template besides the messages and tools.
        self.template_vars = {"documents": None, **tokenizer.special_tokens_map}
        added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
        # Special tokens close turns; every added token is atomic text a boundary cannot cut.
        self.special_pattern = token_pattern({c for c, special in added.items() if special}
                                             | set(tokenizer.all_special_tokens))
        self.added_pattern = token_pattern(set(added) | set(tokenizer.all_special_tokens))
        self.token_map = TokenMap(tokenizer)
        self._init_caches()

    def _init_caches(self) -> None:
        """Sets what is learnt from the template (compiled now, probed when first needed)."""
        self._compiled = compile_template(self.chat_template, self.template_vars)
        self._traits: TemplateTraits | None = None
        self._tool_form: ToolCallForm | None = None

    # The compiled template holds closures and cannot be pickled; worker processes compile it again.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_compiled"], state["_traits"], state["_tool_form"]
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
        """Exactly the ids `apply_chat_template` gives for each text (`TokenMap.tokenize`)."""
        return self.token_map.tokenize(texts)

    def encode(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """The ids of the messages' text (no tools)."""
        return self.tokenize([self.text(messages, add_generation_prompt)])[0]

    @property
    def traits(self) -> TemplateTraits:
        """What the template writes around turns, probed once."""
        if self._traits is None:
            self._traits = probe_traits(self.text, self.added_pattern)
        return self._traits

    @property
    def tool_form(self) -> ToolCallForm:
        """The form of tool calls the template takes, probed once."""
        if self._tool_form is None:
            self._tool_form = probe_tool_form(self.text)
        return self._tool_form

    def template_messages(self, conversation: Conversation) -> list[dict]:
        """The conversation's messages as this template takes them (`apply_chat_template`
        renders these to the same text)."""
        messages = conversation.as_dicts()
        # The form is probed (once) only when a record calls tools: the others never need it.
        return self.tool_form.apply(messages) if any(m.tool_calls for m in conversation.messages) else messages

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

    def _span(self, messages: list[dict], tools, full: str, i: int, after: int) -> Span:
        """Characters [start, end) of `full` that message i's turn trains (see the module
        docstring); `after` is where the previous trained span ended."""
        traits = self.traits
        # Where the turn's text ends: where the conversation through it stops agreeing with the
        # whole (the whole conversation is its own last prefix).
        through = full if i + 1 == len(messages) else self.text(messages[: i + 1], False, tools)
        end = turn_end(full, through, traits.final_suffix)
        start, prompt = None, ""
        if i > 0:
            prompt = self.text(messages[:i], True, tools)
            start = turn_start(full, prompt, traits.generation_prompt, after, end, self.added_pattern)
        if start is None or end is None:
            payload_start, payload_end = self._payload(messages, tools, full, i)
            if start is None:
                start = opener_end(full, prompt, after, payload_start, self.added_pattern) if i > 0 else payload_start
            if end is None:
                return start, next_closer_end(full, payload_end, self.special_pattern)
        return start, last_closer_end(full, start, end, self.special_pattern)

    def _payload(self, messages: list[dict], tools, full: str, i: int) -> Span:
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
        start, end = differing_span(full, other, self.added_pattern)
        if other == full or end < start:
            raise RecordError("unrendered_turn", (
                f"the chat template renders turn {i} ({messages[i]['role']}) the same whatever it holds, so it has "
                "nothing of that turn to train on" + ("; --reasoning_turns split trains each assistant turn rendered as "
                                                      "the last" if i + 1 < len(messages) else "")))
        return start, end

    def _spans(self, conversation: Conversation, messages: list[dict], full: str) -> list[Span]:
        """The trained character spans of `full`, in order. Under `--masking all` that is the
        whole text but the turns of messages marked `train: false`."""
        tools = conversation.tool_list
        if self.strategy == MaskingStrategy.ALL:  # all but untrained turns and tool results
            off = [i for i, m in enumerate(conversation.messages) if m.train is False and m.role != TOOL]
            results = [self._payload(messages, tools, full, i) for i, m in enumerate(conversation.messages)
                       if m.role == TOOL]
            return complement(sorted(self._turn_spans(messages, tools, full, off) + results), len(full))
        return self._turn_spans(messages, tools, full, self.trained_turns(conversation.messages))

    def _turn_spans(self, messages: list[dict], tools, full: str, turns: list[int]) -> list[Span]:
        """The trained character spans of the given turns of `full`, in order; RecordError
        when one is empty or the template cannot render a prefix of the conversation."""
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

    def _generated(self, conversation: Conversation) -> tuple[str, list[Span], tuple[str, ...]]:
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
        return closer_text(text, sentinel, self.special_pattern, self.traits.final_suffix)

    # -----------------------------------------------------------------------------------------
    # Batches
    # -----------------------------------------------------------------------------------------

    def __call__(self, conversation: Conversation) -> Rendered:
        """The conversation rendered and masked; RecordError when it cannot be."""
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
        token_spans = self.token_map.token_spans(texts, all_ids, spans)
        for r, ids, record_spans, parts in zip(where, all_ids, token_spans, dropped):
            labels = [IGNORE_INDEX] * len(ids)
            for start, stop in record_spans:
                labels[start:stop] = ids[start:stop]
            results[r] = Rendered(ids, labels, parts)
        return results  # type: ignore[return-value]


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
    """The conversation with its assistant turns' reasoning left out (field and <think> block)."""
    def plain(m: Message) -> Message:
        content = m.content.split("</think>")[-1].lstrip("\n") if "</think>" in m.content else m.content
        return m._replace(reasoning=None, content=content)

    return Conversation(tuple(plain(m) if m.role == ASSISTANT else m for m in conversation.messages),
                        conversation.tools)


def _without_tools(conversation: Conversation) -> Conversation:
    """The conversation offering no tools."""
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
