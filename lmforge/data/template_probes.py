"""What one chat template does, learnt once per template by rendering it: the template compiled
to render fast (`CompiledTemplate`), what it writes around turns (`TemplateTraits`, from renders
of small probe conversations) and the form of tool calls it takes (`ToolCallForm`). render.py
renders every conversation with the compiled template and reads the traits to find its spans.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from lmforge.data.schema import ASSISTANT, TOOL, USER, Message
from lmforge.data.text_spans import cut
from lmforge.errors import LmforgeError

RenderText = Callable[[list[dict], bool, list[dict] | None], str]
"""(messages, add_generation_prompt, tools) → the template's text (`Renderer.text`)."""


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
        """The template's text for these messages and tools."""
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


def compile_template(chat_template: str, variables: dict) -> CompiledTemplate | None:
    """The compiled template, or None where transformers has no template compiler (the caller
    then renders with `apply_chat_template`)."""
    try:
        return CompiledTemplate(chat_template, variables)
    except ImportError:  # pragma: no cover - a transformers version without HF's template compiler
        return None


@dataclass(frozen=True)
class TemplateTraits:
    """What the template writes around turns, from renders of probe conversations."""

    generation_prompt: str
    """What `add_generation_prompt` appends ("<|im_start|>assistant\\n", "<｜Assistant｜><think>\\n")."""
    final_suffix: str
    """Text written only at the very end of a conversation (Phi-3's EOS); usually ""."""
    renders_reasoning: bool
    """Whether the final assistant turn's `reasoning_content` appears in the render."""


PROBE_TOOL = {"type": "function", "function": {"name": "lookup_probe", "description": "Looks a value up.", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def probe_traits(text: RenderText, added: re.Pattern | None) -> TemplateTraits:
    """The template's traits (`added`: the tokenizer's added tokens, which a boundary never
    cuts); LmforgeError when it renders no user/assistant exchange."""
    error = None
    # Without tools first; a template that reads the tool list unguarded (llama.cpp's Phi-4-mini
    # loops over it) renders only conversations that offer tools.
    for tools in (None, [PROBE_TOOL]):
        try:
            return _traits_with(text, tools, added)
        except Exception as e:  # the template's own error: try the next probe, report the first
            error = error or e
    raise LmforgeError(f"the chat template cannot render a user/assistant exchange: {error}") from None


def _traits_with(text: RenderText, tools: list[dict] | None, added: re.Pattern | None) -> TemplateTraits:
    """The traits shown by renders of small conversations offering `tools`."""
    u1, a1, u2 = {"role": USER, "content": "1"}, {"role": ASSISTANT, "content": "2"}, {"role": USER, "content": "3"}
    a2 = {"role": ASSISTANT, "content": "4"}
    # What a conversation ends with that a longer one does not have there. Probed after a user
    # turn: reasoning templates render a final assistant turn differently.
    before = text([u1, a1, u2], False, tools)
    final = before[cut(before, text([u1, a1, u2, a2], False, tools), added):]
    user = text([u1], False, tools).removesuffix(final)
    prompt = text([u1], True, tools)
    generation = prompt[cut(prompt, user, added):]
    thought = Message(ASSISTANT, "2", reasoning="\ue006").as_dict()
    reasoning = "\ue006" in text([u1, thought], False, tools)
    return TemplateTraits(generation, final, reasoning)


@dataclass(frozen=True)
class ToolCallForm:
    """How a template takes an assistant turn that calls tools. Published templates disagree:
    most `tojson` the arguments (a mapping, the form records are read into), DeepSeek's
    concatenate them to text (a JSON string), and some add the content to the calls with `+`,
    so a call-only turn needs content "" there rather than none. A record in the form its
    template cannot take would be refused, so the form is chosen once per template by
    rendering a probe call in each (`probe_tool_form`)."""

    empty_content: bool
    """A call-only turn gets content "" (else it has no content key)."""
    string_arguments: bool
    """Call arguments go to the template as JSON text (else as the mapping)."""

    def apply(self, messages: list[dict]) -> list[dict]:
        """The messages in this form (the same list when the form is the records' own)."""
        if not (self.empty_content or self.string_arguments):
            return messages
        return [self._message(m) if m.get("tool_calls") else m for m in messages]

    def _message(self, message: dict) -> dict:
        """A copy of a message that calls tools, in this form."""
        out = dict(message)
        if self.empty_content:
            out.setdefault("content", "")
        if self.string_arguments:
            out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _json_text(c["function"]["arguments"])}}
                                 for c in message["tool_calls"]]
        return out


def _json_text(arguments) -> str:
    """Call arguments as JSON text (text already is)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


# In the order they are tried: the mapping first (HF's documented form), content left out first.
TOOL_CALL_FORMS = tuple(ToolCallForm(empty, text) for text in (False, True) for empty in (False, True))


def probe_tool_form(text: RenderText) -> ToolCallForm:
    """The first form in which the template renders a probe call with its name and its
    argument; else the first in which it renders the name; else the first form (records
    with calls then get the template's own error, or are found lacking their calls)."""
    call = {"type": "function", "id": "call_probe", "function": {"name": "lookup_probe", "arguments": {"q": "\ue007"}}}
    messages = [{"role": USER, "content": "1"}, {"role": ASSISTANT, "tool_calls": [call]},
                {"role": TOOL, "tool_call_id": "call_probe", "content": "2"}, {"role": ASSISTANT, "content": "3"}]
    texts = {}
    for form in TOOL_CALL_FORMS:
        try:
            texts[form] = text(form.apply(messages), False, [PROBE_TOOL])
        except Exception:  # the template's own error: this form is not the one it takes
            continue
    for wanted in (("lookup_probe", "\ue007"), ("lookup_probe",)):
        for form, rendered in texts.items():
            if all(w in rendered for w in wanted):
                return form
    return TOOL_CALL_FORMS[0]
