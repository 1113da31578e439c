"""token_spans.spans_to_tokens on hand-written offsets, no tokenizer: which tokens a span takes.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/data/test_token_spans.py
"""

from __future__ import annotations

from lmforge.data.token_spans import spans_to_tokens

# "<a>hi there": an added token "<a>" (id 7), then "hi", then " there".
OFFSETS = [(0, 3), (3, 5), (5, 11)]
IDS = [7, 20, 21]


def test_a_token_belongs_to_a_span_when_any_of_its_characters_does():
    assert spans_to_tokens(OFFSETS, [(3, 11)]) == [(1, 3)]
    assert spans_to_tokens(OFFSETS, [(4, 6)]) == [(1, 3)]  # straddling both ends: both trained
    assert spans_to_tokens(OFFSETS, [(3, 5), (5, 11)]) == [(1, 2), (2, 3)]
    assert spans_to_tokens(OFFSETS, []) == []


def test_a_token_that_straddles_two_spans_is_in_both():
    assert spans_to_tokens(OFFSETS, [(3, 6), (6, 11)]) == [(1, 3), (2, 3)]


def test_an_added_token_that_took_in_the_spans_first_characters_is_not_trained():
    # Phi-3's "<|assistant|>" strips the whitespace after it: the span starts inside the header.
    assert spans_to_tokens(OFFSETS, [(2, 11)], IDS, frozenset({7})) == [(1, 3)]
    assert spans_to_tokens(OFFSETS, [(2, 11)], IDS, frozenset()) == [(0, 3)]
