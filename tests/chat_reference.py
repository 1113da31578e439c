"""An independent reference for the loss masks, written from what each template's text looks
like rather than from how lmforge's renderer finds turns.

For a template it takes its *style*: the text that opens an assistant answer (the end of the
generation prompt: "<|im_start|>assistant\\n", "[/INST]", ...), the end-of-turn text that
closes one, and how the template writes a message's content (trimmed or not, thinking kept or
dropped). It walks the rendered conversation message by message, finds each message's text in
order, and for a trained assistant turn takes the span from the opener before its text to the
end of the first end-of-turn text after it. Tokens are then labelled when any of their
characters lies in a span (HF's `return_assistant_tokens_mask` rule), from the tokenizer's own
offsets. Records built for it carry distinct texts (tests tag every message), so that the walk
cannot land in another message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

X = -100


def _plain(content: str, message: dict, thinking: bool) -> str:
    return content


def _trim(content: str, message: dict, thinking: bool) -> str:
    return content.strip()


def _drop_thinking(content: str, message: dict, thinking: bool) -> str:
    return content.split("</think>")[-1]


def _qwen3(content: str, message: dict, thinking: bool) -> str:
    # Qwen3 splits <think> out of the content and writes the rest after "\n\n" (lstripped).
    if message.get("reasoning_content") is None and "</think>" in content:
        content = content.split("</think>")[-1].lstrip("\n")
    return content.lstrip("\n") if thinking else content


@dataclass(frozen=True)
class Style:
    openers: tuple[str, ...]
    """Texts right before an assistant answer (a turn's trained span starts after the last)."""
    eot: str
    """The end-of-turn text that closes an assistant answer."""
    content: Callable[[str, dict, bool], str] = _plain
    """How the template writes an assistant message's content (the bool: thinking shown)."""
    user_content: Callable[[str], str] = field(default=lambda c: c)


STYLES: dict[str, Style] = {
    "chatml": Style(("<|im_start|>assistant\n",), "<|im_end|>"),
    "qwen3": Style(("<|im_start|>assistant\n",), "<|im_end|>", _qwen3),
    "deepseek-r1-distill": Style(("<｜Assistant｜>", "<｜tool▁outputs▁end｜>"), "<｜end▁of▁sentence｜>", _drop_thinking),
    "llama-3.1": Style(("<|start_header_id|>assistant<|end_header_id|>\n\n",), "<|eot_id|>", _trim, str.strip),
    "mistral-7b-v0.3": Style(("[/INST]", "[/TOOL_RESULTS]"), "</s>", _trim, str.strip),
    "gemma": Style(("<start_of_turn>model\n",), "<end_of_turn>", _trim, str.strip),
    "phi-3-mini": Style(("<|assistant|>\n",), "<|end|>"),
    "phi-4": Style(("<|im_start|>assistant<|im_sep|>",), "<|im_end|>"),
    "vicuna": Style(("ASSISTANT:",), "</s>", _trim, str.strip),
}


def _last_query(messages: list[dict]) -> int:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return users[-1] if users else -1


def message_text(style: Style, messages: list[dict], i: int) -> str:
    """A text of message i that the render must hold, to find the message by."""
    m = messages[i]
    content = m.get("content") or ""
    if m["role"] == "assistant":
        if m.get("tool_calls") and not content.strip():
            return m["tool_calls"][0]["function"]["name"]
        thinking = i > _last_query(messages)
        return style.content(content, m, thinking)
    if m["role"] == "user":
        return style.user_content(content)
    return content.strip()


def reference_spans(full: str, messages: list[dict], style: Style, trained: set[int]) -> list[tuple[int, int]]:
    cursor, spans = 0, []
    for i, m in enumerate(messages):
        needle = message_text(style, messages, i)
        if not needle or m["role"] == "tool":
            continue
        pos = full.index(needle, cursor)
        if i not in trained:
            cursor = pos + len(needle)
            continue
        start = max(full.rindex(o, cursor, pos) + len(o) for o in style.openers if o in full[cursor:pos])
        end = full.index(style.eot, pos + len(needle)) + len(style.eot)
        spans.append((start, end))
        cursor = end
    return spans


def reference_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                     added: frozenset[int] = frozenset()) -> list[int]:
    """A token is trained when any of its characters lies in a span, except an added token
    (`added`: the template's own tokens) that starts before the span: a header that took in
    the whitespace an answer starts with (Phi-3's `<|assistant|>` strips what follows it)."""
    return [t if any(s < e2 and max(e, s + 1) > s2 and not (t in added and s < s2) for s2, e2 in spans) else X
            for t, (s, e) in zip(ids, offsets)]


def labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for t in labels:
        if t == X:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    if current:
        runs.append(current)
    return runs
