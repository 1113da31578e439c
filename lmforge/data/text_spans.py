"""Where a turn lies in a rendered conversation, found by comparing texts alone: where two
renders of one chat template part (their common prefix and suffix), where a turn's opener ends
and which special token closes it. No tokenizer and no template: render.py renders the texts,
these functions compare them (the module docstring of render.py gives the rule they serve).

"Added tokens" below are the tokenizer's added tokens as one regular expression
(`token_pattern`): atomic text that a boundary never cuts ("<|im_end|>"); "special" the ones
that close turns. Tested on hand-written strings:

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/data/test_text_spans.py
"""

from __future__ import annotations

import re

Span = tuple[int, int]
"""Characters [start, end) of a text."""

# An added token is looked for this far around a position: the longest added tokens
# ("<｜end▁of▁sentence｜>") are well under it.
ATOM_REACH = 64
# How far back from the end of a prompt its last added token is looked for: the openers it
# starts ("[/INST]", "<|start_header_id|>assistant<|end_header_id|>\n\n") are short.
OPENER_REACH = 256


def token_pattern(contents: set[str]) -> re.Pattern | None:
    """A pattern matching the given token texts leftmost-longest, as the tokenizer's splitter
    finds them (longer texts tried first); None when there is no non-empty text."""
    contents = {c for c in contents if c}
    if not contents:
        return None
    return re.compile("|".join(map(re.escape, sorted(contents, key=len, reverse=True))))


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`. Slices are compared in C,
    halving the window, rather than character by character in Python."""
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
    """The length of the longest common suffix of `a` and `b`, at most `limit`."""
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


def sentinel_for(text: str) -> str:
    """Two private-use characters that `text` holds neither of: a message content no template
    writes elsewhere, to find where a message's own text lies."""
    unused = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)
    return next(unused) + next(unused)


def atom_at(text: str, pos: int, added: re.Pattern | None) -> Span | None:
    """The (start, end) of the added token of `text` that `pos` falls strictly inside, or None."""
    if added is None or pos == 0 or pos >= len(text):
        return None
    for m in added.finditer(text, max(0, pos - ATOM_REACH), min(len(text), pos + ATOM_REACH)):
        if m.start() < pos < m.end():
            return m.span()
    return None


def atom_start(text: str, pos: int, added: re.Pattern | None) -> int:
    """`pos`, or the start of the added token it falls inside."""
    atom = atom_at(text, pos, added)
    return atom[0] if atom else pos


def atom_end(text: str, pos: int, added: re.Pattern | None) -> int:
    """`pos`, or the end of the added token it falls inside."""
    atom = atom_at(text, pos, added)
    return atom[1] if atom else pos


def cut(a: str, b: str, added: re.Pattern | None) -> int:
    """Where `a` and `b` part, moved back to the start of an added token they part inside:
    "<|end|>\\n<|endoftext|>" and "<|end|>\\n<|user|>" part before "<|", not after it."""
    n = common_prefix(a, b)
    if n == len(a) or n == len(b):  # one is a prefix of the other: no token was cut
        return n
    return min(atom_start(a, n, added), atom_start(b, n, added))


def differing_span(full: str, other: str, added: re.Pattern | None) -> Span:
    """The characters of `full` that `other` does not share: from where the two part to where
    their common suffix starts, widened to whole added tokens (empty where `other` only adds
    text to `full`)."""
    start = cut(full, other, added)
    end = len(full) - common_suffix(full, other, len(full) - start)
    return start, atom_end(full, end, added)


def turn_end(full: str, through: str, final_suffix: str) -> int | None:
    """Where a turn's text ends in `full`, given `through`, the conversation rendered up to and
    with that turn: its length, less the text written only at a conversation's very end; None
    when `full` does not start with it (the template renders that prefix differently)."""
    through = through.removesuffix(final_suffix)
    return len(through) if full.startswith(through) else None


def turn_start(full: str, prompt: str, generation_prompt: str, after: int, end: int | None,
               added: re.Pattern | None) -> int | None:
    """Where the answer after `prompt` (the turns before it with the generation prompt) starts
    in `full`: where the two part, when that is inside the generation prompt's text, not before
    `after` (the previous trained span's end) and not past `end` (the turn's end, if known);
    else None, as `prompt` renders the earlier turns differently from the whole."""
    start = cut(full, prompt, added)
    if len(prompt) - len(generation_prompt) <= start and after <= start and (end is None or start <= end):
        return start
    return None


def opener_end(full: str, prompt: str, after: int, payload_start: int, added: re.Pattern | None) -> int:
    """Where a turn starts when the prompt before it renders differently from the whole
    conversation (Mistral v0.3 moves tools and the system prompt to the last user turn): after
    the nearest text before the turn's payload that the prompt ends with, from its last added
    token on ("[/INST]", "<|end_header_id|>\\n\\n", "<|im_start|>assistant\\n"); else the
    payload's start."""
    if added is not None:
        tokens = list(added.finditer(prompt, max(0, len(prompt) - OPENER_REACH)))
        if tokens:
            opener = prompt[tokens[-1].start():]
            at = full.rfind(opener, after, payload_start)
            if at >= 0:
                return at + len(opener)
    return payload_start


def last_closer_end(full: str, start: int, end: int, special: re.Pattern | None) -> int:
    """The end of the last special token in full[start:end), where `end` is where the turn's
    text ends (what follows that token, ChatML's newline, is separator); `end` without one."""
    closer = end
    if special is not None:
        for m in special.finditer(full, start, end):
            closer = m.end()
    return closer


def next_closer_end(full: str, start: int, special: re.Pattern | None) -> int:
    """The end of the first special token from `start` on, the one that closes a turn whose
    payload ends at `start`; `start` without one."""
    m = special.search(full, start) if special is not None else None
    return m.end() if m else start


def closer_text(text: str, sentinel: str, special: re.Pattern | None, final_suffix: str) -> str:
    """What the template writes after the answer `sentinel` in `text`: up to and with the first
    special token after it (the end-of-turn token); without one, the rest of the text less what
    is written only at a conversation's very end."""
    after = text[text.rindex(sentinel) + len(sentinel):]
    m = special.search(after) if special is not None else None
    if m is not None:
        return after[: m.end()]
    return after.removesuffix(final_suffix)


def complement(spans: list[Span], length: int) -> list[Span]:
    """The spans of [0, length) that none of `spans` (sorted by start) covers."""
    out, at = [], 0
    for start, end in spans:
        if start > at:
            out.append((at, start))
        at = max(at, end)
    if at < length:
        out.append((at, length))
    return out
