"""Stage 2 of the data chain (with `records.py`), the schema: `Message` and `Conversation`, the
one conversation type every chat method trains on.

A record's messages are read here whatever file format they came in (`records.py` finds the
list of messages and the record-level fields): roles, contents (a string or OpenAI-style parts),
reasoning, tool calls, tool results, the tools a record offers, and per-message loss flags.
Nothing a record carries is dropped here: an empty system message of an OpenAI-messages record
is a message and renders as written (`records.py` reads an empty ShareGPT / Alpaca `system`
column, or an empty ShareGPT system turn, as "no system prompt", as LLaMA-Factory does).

Only what is actually invalid is refused, each with a `RecordError` saying what is wrong: an
unknown role, a missing, null or wrongly typed field, an empty user or assistant turn, a tool result
that answers no call, a conversation with no assistant turn. The order of user and assistant
turns is the template's business: a template that cannot render an order raises, and that
error names the record (`render.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lmforge.errors import RecordError

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"

# A ShareGPT turn under this role holds a tool call (LLaMA-Factory's `function_call`), not text.
FUNCTION_CALL = "function_call"

# ShareGPT / Vicuna role names as they occur in FastChat- and LLaMA-Factory-style data.
SHAREGPT_ROLES = {
    "system": SYSTEM,
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bard": ASSISTANT,
    "bing": ASSISTANT,
    "function_call": FUNCTION_CALL,
    "observation": TOOL,
    "tool": TOOL,
}
# OpenAI roles; "developer" is the newer name of the system role, "ipython" Llama 3.1's tool role.
OPENAI_ROLES = {SYSTEM: SYSTEM, "developer": SYSTEM, USER: USER, ASSISTANT: ASSISTANT, TOOL: TOOL, "ipython": TOOL}

# Per-message loss flags: `train` (bool), or a weight of 0 or 1 (`weight`, LLaMA-Factory's
# `loss_weight`).
WEIGHT_KEYS = ("weight", "loss_weight")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")

# Text parts of a list content are joined with a newline, as vLLM's OpenAI server joins them for
# text-only templates, so a model is trained on the text it will be served.
PART_JOINER = "\n"


class Message(NamedTuple):
    """One message. A named tuple rather than a frozen dataclass: a million conversations are
    built, pickled to worker processes and read back, and a tuple is several times cheaper."""

    role: str
    content: str
    reasoning: str | None = None
    """The assistant's thinking, given apart from its content (`reasoning_content`)."""
    tool_calls: tuple[dict, ...] | None = None
    """OpenAI-shaped calls: {"type": "function", "function": {"name", "arguments"}, "id"?}."""
    tool_call_id: str | None = None
    name: str | None = None
    train: bool | None = None
    """True / False where the record says whether this message carries loss; None: the masking
    strategy decides."""

    def as_dict(self) -> dict[str, Any]:
        """The message as `tokenizer.apply_chat_template` takes it. Reasoning goes under
        `reasoning_content` and `thinking` (the names templates read; transformers aliases them
        the same way). No key holds None: apply_chat_template leaves such keys out before the
        template sees them (a template printing `message.content` would write "None")."""
        out: dict[str, Any] = {"role": self.role}
        if self.content or not self.tool_calls:  # an assistant turn that only calls tools has no content
            out["content"] = self.content
        if self.reasoning is not None:
            out["thinking"] = self.reasoning
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Conversation:
    """A validated conversation: messages with at least one assistant turn, and the tools the
    record offers (OpenAI function schemas, passed to the template as `tools`)."""

    messages: tuple[Message, ...]
    tools: tuple[dict, ...] | None = None
    plain: bool = field(default=False, compare=False)
    """True when the messages are known to carry only system-free user / assistant text (no
    system message, reasoning, tools, tool calls or results): nothing a template could leave
    out, so the renderer skips looking for it."""
    generated: bool = field(default=False, compare=False)
    """True for a sample whose last turn is to be written as the model generates it where the
    template leaves that turn's reasoning out (`--reasoning_turns generated`)."""

    def as_dicts(self) -> list[dict[str, Any]]:
        """The message list that `tokenizer.apply_chat_template` takes."""
        return [m.as_dict() for m in self.messages]

    @property
    def tool_list(self) -> list[dict] | None:
        """The `tools` the template gets: None where the record offers none, an empty list
        included. LLaMA-Factory reads `"tools": []` as no tools, and a template that tests
        `tools is not none` (Llama-3.1's) would otherwise write its tool preamble into the record
        (109 of the 300 records of LLaMA-Factory's glaive_toolcall_en_demo.json)."""
        return list(self.tools) if self.tools else None


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------


def require_str(value: Any, what: str) -> str:
    """`value` (a field that is there) as a string; null is called null. A field that may be
    absent is read with `require_field`, which tells the two apart."""
    if value is None:
        raise RecordError("missing_field", f"{what} is null")
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{what} must be a string, got {type(value).__name__}")
    return value


def require_field(obj: dict, key: str, what: str) -> str:
    """`obj[key]` as a string: "is missing" when there is no such key, "is null" when it holds
    null (an export that writes null for an empty cell is told so, not that it lacks the key)."""
    if key not in obj:
        raise RecordError("missing_field", f"{what} is missing")
    return require_str(obj[key], what)


def _json_value(value: Any, what: str) -> Any:
    """A field that some exports store as a JSON string (LLaMA-Factory's `tools`)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordError("malformed_field", f"{what} is a string that is not JSON ({e.msg} at column {e.colno})") \
            from None


def parse_tools(value: Any, what: str = "field 'tools'") -> tuple[dict, ...] | None:
    """The tools a record offers: a list of function schemas, or a JSON string of one. A bare
    function schema ({"name", "description", "parameters"}, as LLaMA-Factory's glaive data has
    them) is wrapped as OpenAI's {"type": "function", "function": ...}, the shape templates
    read (Mistral's reads `tool.function`) and transformers' `get_json_schema` writes.

    An empty list (`[]`, `"[]"`, or an empty string, as LLaMA-Factory's glaive data writes for a
    record without tools) is `()`: this record offers no tools (`--tools FILE` is not offered to
    it either), and none reach the template (`Conversation.tool_list`)."""
    if value is None:
        return None
    if isinstance(value, str) and not value.strip():
        return ()
    tools = _json_value(value, what)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("malformed_field", f"{what} must be a list of tool schemas (objects)")
    return tuple({"type": "function", "function": t} if "name" in t and "function" not in t else t for t in tools)


def _arguments(value: Any) -> Any:
    """Call arguments as a dict where they are a JSON object: templates expect a mapping (they
    `tojson` it); a string would be rendered quoted by most of them."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def _tool_call(call: Any, what: str) -> dict:
    if not isinstance(call, dict):
        raise RecordError("malformed_field", f"{what} must be an object, got {type(call).__name__}")
    function = call.get("function", call)  # OpenAI nests it; LLaMA-Factory / glaive do not
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RecordError("malformed_field", f"{what} has no function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    out: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": _arguments(arguments)}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def parse_tool_calls(value: Any, what: str) -> tuple[dict, ...]:
    """Tool calls: OpenAI's list, one call, or a JSON string of either (LLaMA-Factory)."""
    calls = _json_value(value, what)
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RecordError("malformed_field", f"{what} must hold one or more tool calls")
    return tuple(_tool_call(c, f"{what}[{k}]") for k, c in enumerate(calls))


def _part_text(part: Any, what: str) -> str:
    if isinstance(part, str):
        return part
    key = next((k for k in ("text", "value", "content") if k in part), None)
    if key is None:
        raise RecordError("missing_field", f"{what} text is missing")
    return require_str(part[key], f"{what} text")


def parse_content(value: Any, what: str) -> tuple[str, str | None, tuple[dict, ...] | None]:
    """(text, reasoning, tool calls) of a message's content: a string, null (an assistant turn
    that only calls tools), or a list of parts: `text` parts (OpenAI's "text" key or
    LLaMA-Factory's "value"), `reasoning` / `thinking` parts and `tool_call` parts. Parts of
    other types (images, audio) are an error: lmforge trains text models."""
    if value is None:
        return "", None, None
    if isinstance(value, str):
        return value, None, None
    if not isinstance(value, list):
        raise RecordError("non_string_content",
                          f"{what} must be a string or a list of content parts, got {type(value).__name__}")
    texts, reasoning, calls = [], [], []
    for k, part in enumerate(value):
        where = f"{what}[{k}]"
        kind = part.get("type", "text") if isinstance(part, dict) else "text" if isinstance(part, str) else None
        if kind == "text":
            texts.append(_part_text(part, where))
        elif kind in ("reasoning", "thinking"):
            reasoning.append(_part_text(part, where))
        elif kind in ("tool_call", "function_call"):
            payload = next((part[k] for k in ("tool_call", "value", "text", "function") if k in part), part)
            calls.extend(parse_tool_calls(payload, where))
        else:
            raise RecordError("unsupported_content", f"{where} is a {kind!r} part; lmforge trains text models and "
                                                     "reads 'text', 'reasoning' and 'tool_call' parts only")
    return (PART_JOINER.join(texts), PART_JOINER.join(reasoning) if reasoning else None,
            tuple(calls) if calls else None)


def _train_flag(turn: dict, what: str) -> bool | None:
    if "train" in turn and turn["train"] is not None:
        if not isinstance(turn["train"], bool):
            raise RecordError("malformed_field", f"{what}.train must be true or false")
        return turn["train"]
    for key in WEIGHT_KEYS:
        if turn.get(key) is not None:
            weight = turn[key]
            if isinstance(weight, bool) or weight not in (0, 1):
                raise RecordError("malformed_field", f"{what}.{key} is {weight!r}: a message is trained fully (1) "
                                                     "or not at all (0)")
            return bool(weight)
    return None


def _reasoning(turn: dict, what: str) -> str | None:
    for key in REASONING_KEYS:
        if turn.get(key) is not None:
            return require_str(turn[key], f"{what}.{key}")
    return None


def parse_message(turn: Any, what: str, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    """One message of a record (`what` names it in errors, e.g. "messages[3]")."""
    if not isinstance(turn, dict):
        raise RecordError("malformed_turn", f"{what} must be an object, got {type(turn).__name__}")
    if role_key not in turn:
        raise RecordError("missing_field", f"{what} has no '{role_key}'")
    role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if role is None:
        raise RecordError("unknown_role", f"{what} has unknown role {turn[role_key]!r}; known roles: {sorted(roles)}")
    train = _train_flag(turn, what)
    if content_key not in turn and (role == FUNCTION_CALL or not turn.get("tool_calls")):
        raise RecordError("missing_field", f"{what} has no '{content_key}'")
    if role == FUNCTION_CALL:
        calls = parse_tool_calls(require_str(turn[content_key], f"{what}.{content_key}"), f"{what}.{content_key}")
        return Message(ASSISTANT, "", tool_calls=calls, train=train)
    calls = parse_tool_calls(turn["tool_calls"], f"{what}.tool_calls") if turn.get("tool_calls") else None
    if turn.get(content_key) is None and not calls:  # only a call may come without content (OpenAI's null)
        raise RecordError("missing_field", f"{what}.{content_key} is null (only an assistant turn that calls tools "
                                           "may have no content)")
    content, part_reasoning, part_calls = parse_content(turn.get(content_key), f"{what}.{content_key}")
    reasoning = _reasoning(turn, what) if role == ASSISTANT else None
    calls = (calls or ()) + (part_calls or ()) or None
    return Message(role, content, reasoning=reasoning if reasoning is not None else part_reasoning,
                   tool_calls=calls if role == ASSISTANT else None,
                   tool_call_id=_optional_str(turn, "tool_call_id", what), name=_optional_str(turn, "name", what),
                   train=train)


def _optional_str(turn: dict, key: str, what: str) -> str | None:
    value = turn.get(key)
    return None if value is None else require_str(value, f"{what}.{key}")


def parse_messages(turns: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(turns, list):
        raise RecordError("missing_field", f"field '{key}' must be a list of turns, got {type(turns).__name__}")
    return [parse_message(t, f"{key}[{i}]", role_key, content_key, roles) for i, t in enumerate(turns)]


# ---------------------------------------------------------------------------------------------
# Messages → Conversation
# ---------------------------------------------------------------------------------------------


def is_empty(m: Message) -> bool:
    return not m.content.strip() and not m.tool_calls and not (m.reasoning or "").strip()


def is_blank_system(m: Message) -> bool:
    """A system message with no text but whitespace: nothing is lost where it is left out."""
    return m.role == SYSTEM and not m.content.strip()


def validate(messages: list[Message], tools: tuple[dict, ...] | None = None) -> Conversation:
    """Check the messages; return the conversation or raise `RecordError`. Every message is
    kept, an empty system message too (it renders as written)."""
    if not messages:
        raise RecordError("no_turns", "the conversation has no turns")
    for i, m in enumerate(messages):
        if m.role in (USER, ASSISTANT) and is_empty(m):
            raise RecordError("empty_content", f"turn {i} ({m.role}) is empty")
        if m.role == TOOL and not (i > 0 and (messages[i - 1].tool_calls or messages[i - 1].role == TOOL)):
            raise RecordError("roles_out_of_order", f"turn {i} is a tool result that follows no assistant tool call")
    if not any(m.role == ASSISTANT for m in messages):
        raise RecordError("no_assistant_turn", "the conversation has no assistant turn to train on")
    plain = not tools and all(m.role in (USER, ASSISTANT) and m.reasoning is None and not m.tool_calls
                              and "</think>" not in m.content for m in messages)
    return Conversation(tuple(messages), tools, plain)
