"""Property over the real data in ../shared/data: the labelled tokens of every record decode to
exactly the assistant contents, each followed by the end-of-turn token, in order — so no
labelled token lies in a system or user turn, and no answer token is left unlabelled."""

from __future__ import annotations

import pytest

from lmforge.data.records import iter_conversations
from lmforge.data.render import Renderer
from lmforge.data.templates import resolve_template

from conftest import ALPACA_DEMO, DUMMY_CONVERSATIONS, KTO_DEMO
from tests.data.test_render import labelled_spans

FILES = {"fastchat_dummy": DUMMY_CONVERSATIONS, "alpaca_demo": ALPACA_DEMO, "kto_demo": KTO_DEMO}


def check_file(tokenizer, template: str, path, answer_prefix: str = "") -> int:
    renderer = Renderer(tokenizer, template)
    end = tokenizer.decode([tokenizer.convert_tokens_to_ids("<|im_end|>")])
    checked = 0
    for location, conv in iter_conversations(str(path)):
        out = renderer(conv)
        answers = [answer_prefix + m.content + end for m in conv.messages if m.role == "assistant"]
        got = [tokenizer.decode(span) for span in labelled_spans(out.labels)]
        assert got == answers, f"{path}, {location}"
        # Labels are the input ids where set: the model is asked for exactly the rendered tokens.
        assert all(l in (-100, i) for l, i in zip(out.labels, out.input_ids)), f"{path}, {location}"
        checked += 1
    return checked


@pytest.mark.parametrize("name", sorted(FILES))
def test_qwen_template_masks_exactly_the_answers(qwen_tokenizer, name):
    assert check_file(qwen_tokenizer, qwen_tokenizer.chat_template, FILES[name]) > 0


@pytest.mark.parametrize("template, prefix", [("chatml", ""), ("vicuna_v1.1", " ")])
def test_builtin_templates_mask_exactly_the_answers(fresh_qwen_tokenizer, template, prefix):
    chat_template = resolve_template(fresh_qwen_tokenizer, template)
    assert check_file(fresh_qwen_tokenizer, chat_template, DUMMY_CONVERSATIONS, prefix) == 500
