"""text_spans.py on hand-written strings, no tokenizer: the exact positions each comparison gives.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/data/test_text_spans.py
"""

from __future__ import annotations

from lmforge.data.text_spans import (atom_at, atom_end, atom_start, closer_text, common_prefix, common_suffix,
                                     complement, cut, differing_span, last_closer_end, next_closer_end, opener_end,
                                     sentinel_for, token_pattern, turn_end, turn_start)

CHATML = token_pattern({"<|im_start|>", "<|im_end|>"})
PHI3 = token_pattern({"<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"})
MISTRAL = token_pattern({"<s>", "</s>", "[INST]", "[/INST]"})
CHATML_PROMPT = "<|im_start|>user\n1<|im_end|>\n<|im_start|>assistant\n"


def test_token_pattern_matches_the_longest_token_first_and_escapes_the_text():
    assert token_pattern({"<s>", "<s>x"}).findall("<s>x<s>") == ["<s>x", "<s>"]
    assert CHATML.findall("a|b<|im_end|>\n<|im_start|>") == ["<|im_end|>", "<|im_start|>"]
    assert token_pattern({"", "a"}).pattern == "a"
    assert token_pattern({""}) is None
    assert token_pattern(set()) is None


def test_common_prefix():
    assert common_prefix("abcdef", "abcxef") == 3
    assert common_prefix("abc", "abcdef") == 3
    assert common_prefix("same", "same") == 4
    assert common_prefix("xbc", "abc") == 0
    assert common_prefix("", "x") == 0
    assert common_prefix("a" * 1000 + "b", "a" * 1000 + "c") == 1000  # the halving window


def test_common_suffix_stops_at_the_limit():
    assert common_suffix("xxabc", "yabc", 10) == 3
    assert common_suffix("xxabc", "yabc", 2) == 2
    assert common_suffix("abc", "abd", 5) == 0
    assert common_suffix("abc", "abc", 0) == 0
    assert common_suffix("b" + "a" * 1000, "c" + "a" * 1000, 5000) == 1000


def test_sentinel_is_two_private_use_characters_the_text_lacks():
    assert sentinel_for("plain") == "\ue000\ue001"
    assert sentinel_for("\ue000 and \ue002") == "\ue001\ue003"


def test_a_position_strictly_inside_an_added_token_is_in_that_atom():
    text = "<|end|>\n<|endoftext|>"
    assert atom_at(text, 10, PHI3) == (8, 21)
    assert (atom_start(text, 10, PHI3), atom_end(text, 10, PHI3)) == (8, 21)
    assert atom_at(text, 8, PHI3) is None  # at a token's start: not inside it
    assert atom_at(text, 7, PHI3) is None
    assert atom_at(text, 0, PHI3) is None
    assert atom_at(text, len(text), PHI3) is None
    assert (atom_start(text, 10, None), atom_end(text, 10, None)) == (10, 10)


def test_renders_part_before_an_added_token_they_part_inside():
    # Phi-3: a conversation's end and a next user turn share "<|end|>\n<|" and part before "<|".
    assert cut("<|end|>\n<|endoftext|>", "<|end|>\n<|user|>", PHI3) == 8
    assert cut("<|end|>\n<|endoftext|>", "<|end|>\n<|user|>", None) == 10
    assert cut("abc", "abcdef", PHI3) == 3  # one is a prefix of the other


def test_differing_span_is_a_message_payload_widened_to_whole_tokens():
    full = "<|user|>q<|end|>\n<|assistant|>hello<|end|>\n"
    other = full.replace("hello", "\ue000\ue001")
    assert differing_span(full, other, PHI3) == (30, 35)
    assert full[30:35] == "hello"
    tokens = token_pattern({"<|x|>", "<|y|>"})
    assert differing_span("A<|x|>B", "A<|y|>B", tokens) == (1, 6)
    assert differing_span("A<|x|>B", "A<|y|>B", None) == (3, 4)
    assert differing_span("abc", "abXc", None) == (2, 2)  # `other` only adds text


def test_a_turn_ends_where_the_conversation_through_it_stops_agreeing_with_the_whole():
    full = "<|user|>1<|end|><|assistant|>2<|end|><|user|>3<|end|><|endoftext|>"
    through = "<|user|>1<|end|><|assistant|>2<|end|><|endoftext|>"
    assert turn_end(full, through, "<|endoftext|>") == 37
    assert full[:37].endswith("<|assistant|>2<|end|>")
    assert turn_end(full, through, "") is None  # the final EOS is not in the whole there
    assert turn_end(full, "<|user|>X<|end|>", "") is None
    assert turn_end(full, full, "<|endoftext|>") == len(full) - len("<|endoftext|>")


def test_a_turn_starts_where_its_prompt_ends():
    full = CHATML_PROMPT + "2<|im_end|>\n"
    generation = "<|im_start|>assistant\n"
    assert turn_start(full, CHATML_PROMPT, generation, 0, None, CHATML) == len(CHATML_PROMPT) == 51
    assert turn_start(full, CHATML_PROMPT, generation, 0, 62, CHATML) == 51
    assert turn_start(full, CHATML_PROMPT, generation, 0, 40, CHATML) is None  # past the turn's end
    assert turn_start(full, CHATML_PROMPT, generation, 52, None, CHATML) is None  # before the last span's end
    # A generation prompt the answer does not repeat ("<think>\n"): the turn starts where they part.
    thinking = CHATML_PROMPT + "<think>\n"
    assert turn_start(full, thinking, generation + "<think>\n", 0, None, CHATML) == 51
    # A prompt that renders an earlier turn differently (a system message moved): no start.
    moved = "<|im_start|>system\nS<|im_end|>\n" + CHATML_PROMPT
    assert turn_start(full, moved, generation, 0, None, CHATML) is None


def test_the_opener_is_the_prompt_from_its_last_added_token_on():
    # Mistral v0.3 renders the prompt with the system text moved: only "[/INST]" is shared.
    full = "<s>[INST] q[/INST] answer</s>"
    prompt = "<s>[INST] system\n\nq[/INST]"
    payload = full.index("answer")
    assert opener_end(full, prompt, 0, payload, MISTRAL) == payload - 1 == 18
    assert opener_end(full, prompt, 19, payload, MISTRAL) == payload  # not after the previous span
    assert opener_end(full, prompt, 0, payload, None) == payload
    assert opener_end(full, "no tokens", 0, payload, MISTRAL) == payload


def test_a_turn_closes_with_its_special_token_not_the_separator_after_it():
    full = "<|im_start|>assistant\nhi<|im_end|>\n"
    im_end = token_pattern({"<|im_end|>"})
    assert last_closer_end(full, 22, len(full), im_end) == len(full) - 1 == 34
    assert last_closer_end(full, 22, 24, im_end) == 24  # no special token in the range
    assert last_closer_end(full, 22, len(full), None) == len(full)
    assert next_closer_end(full, 24, im_end) == 34
    assert next_closer_end(full, 34, im_end) == 34
    assert next_closer_end(full, 24, None) == 24


def test_closer_text_runs_to_the_end_of_turn_token():
    text = "<|user|>q<|end|>\n<|assistant|>\ue000\ue001<|end|>\n<|endoftext|>"
    assert closer_text(text, "\ue000\ue001", PHI3, "<|endoftext|>") == "<|end|>"
    assert closer_text(text, "\ue000\ue001", None, "<|endoftext|>") == "<|end|>\n"
    assert closer_text(text, "\ue000\ue001", None, "") == "<|end|>\n<|endoftext|>"


def test_complement():
    assert complement([(2, 4), (6, 8)], 10) == [(0, 2), (4, 6), (8, 10)]
    assert complement([(0, 3), (2, 5)], 5) == []
    assert complement([], 3) == [(0, 3)]
