"""From characters to tokens: the ids of rendered texts, and the token index ranges of their
trained character spans (a token is trained when any of its characters lies in a span).

Characters become token indices without asking the tokenizer for offsets, which would double
the cost of tokenizing: a span boundary right after an added token (`<|im_end|>`) is that
token's index, and one a short piece of template text later ("assistant\\n") is found by
tokenizing that piece alone (`AnchorScan` says why a piece between anchors tokenizes alone).
Only a text where a token straddles a boundary is tokenized again with offsets
(`spans_to_tokens`).
"""

from __future__ import annotations

import bisect
from typing import Sequence

from lmforge.data.text_spans import Span, token_pattern


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
        self.pattern = token_pattern({t.content for t in plain.values()}) if self.ids else None

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


class TokenMap:
    """One tokenizer's ids for rendered texts, and the token ranges of their character spans."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.added_ids = frozenset(tokenizer.added_tokens_decoder)
        self.anchors = AnchorScan(self.backend)
        self._tails: dict[str, list[int]] = {}

    # Worker processes get this pickled; the tails they tokenize are their own.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_tails"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tails = {}

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

    def token_spans(self, texts: list[str], all_ids: list[list[int]], spans: list[list[Span]]) -> list[list[Span]]:
        """For each text (its ids, its character spans): the token index ranges of its spans.
        The texts no anchor places are tokenized again with offsets, in one batch."""
        out = [self._by_anchors(text, ids, text_spans) for text, ids, text_spans in zip(texts, all_ids, spans)]
        unplaced = [k for k, found in enumerate(out) if found is None]
        for k, offsets in zip(unplaced, self.offsets([texts[k] for k in unplaced])):
            out[k] = spans_to_tokens(offsets, spans[k], all_ids[k], self.added_ids)
        return out  # type: ignore[return-value]

    def _by_anchors(self, text: str, ids: list[int], spans: list[Span]) -> list[Span] | None:
        """Token index ranges of character spans without the tokenizer's offsets: a boundary
        right after an anchor token is that token's index; one after an anchor and a short
        tail is where the tail's own tokens end, when the text's tokens continue with exactly
        them. None when a boundary is not shown to fall between tokens (a token straddles it)."""
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
        """The token index that character boundary `char` of `text` falls on, reckoned from
        the anchor before it (`ends`: the anchors' end characters, `positions`: their token
        indices); None when no token is shown to start there."""
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
        """The ids of a piece of text between an anchor and a boundary, cached while short."""
        ids = self._tails.get(tail)
        if ids is None:
            ids = self.tokenize([tail])[0]
            if len(tail) <= TAIL_CACHE_CHARS:
                if len(self._tails) >= TAIL_CACHE_ENTRIES:
                    self._tails.clear()
                self._tails[tail] = ids
        return ids


def spans_to_tokens(offsets: Sequence[tuple[int, int]], spans: list[Span], ids: Sequence[int] = (),
                    added_ids: frozenset[int] = frozenset()) -> list[Span]:
    """Token index ranges of character spans: a token belongs to a span when any of its
    characters lies in it (spans sorted and disjoint; a token that straddles two is in both),
    except an added token (`added_ids`) that starts before the span: that is the
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
