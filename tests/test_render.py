"""Rendering and loss masks: exact input_ids / labels on the Qwen2.5 tokenizer, equality with
`apply_chat_template`, built-in templates against their reference renderings."""

from __future__ import annotations

import json

import pytest

from lmforge.data.formats import Conversation, DataFormat, Message, to_conversation
from lmforge.data.render import IGNORE_INDEX as X
from lmforge.data.render import MaskingStrategy, Renderer, end_of_turn_token_id
from lmforge.data.templates import BUILTIN_TEMPLATES, VICUNA_SYSTEM, resolve_template
from lmforge.errors import LmforgeError, RecordError

from conftest import DUMMY_CONVERSATIONS

# Qwen2.5 ids used below.
START, END, NL = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
DEFAULT_SYSTEM = [2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13]
BE_BRIEF = [3430, 9814, 13]
HI, HELLO, Q2, A2 = [13048], [9707, 0], [17, 10, 17, 30], [19]  # "Hi", "Hello!", "2+2?", "4"

TWO_TURNS_IDS = (
    [START, USER, NL] + HI + [END, NL]
    + [START, ASSISTANT, NL] + HELLO + [END, NL]
    + [START, USER, NL] + Q2 + [END, NL]
    + [START, ASSISTANT, NL] + A2 + [END, NL]
)
TWO_TURNS_LABELS = (
    [X] * (5 + len(HI))
    + [X] * 3 + HELLO + [END, X]
    + [X] * (5 + len(Q2))
    + [X] * 3 + A2 + [END, X]
)
QWEN_DEFAULT_SYSTEM_TURN = [START, SYSTEM, NL] + DEFAULT_SYSTEM + [END, NL]

RECORDS = {
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    "openai": {"messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    "alpaca": {"history": [["Hi", "Hello!"]], "instruction": "2+2?", "input": "", "output": "4"},
}
EXPECTED = {
    # No system turn in the record: Qwen's template writes its default one.
    "sharegpt": (QWEN_DEFAULT_SYSTEM_TURN + TWO_TURNS_IDS, [X] * len(QWEN_DEFAULT_SYSTEM_TURN) + TWO_TURNS_LABELS),
    "openai": ([START, SYSTEM, NL] + BE_BRIEF + [END, NL] + TWO_TURNS_IDS, [X] * 8 + TWO_TURNS_LABELS),
    "alpaca": (QWEN_DEFAULT_SYSTEM_TURN + TWO_TURNS_IDS, [X] * len(QWEN_DEFAULT_SYSTEM_TURN) + TWO_TURNS_LABELS),
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_exact_ids_and_labels_on_qwen(qwen_tokenizer, fmt):
    conv = to_conversation(RECORDS[fmt], DataFormat.AUTO)
    out = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)(conv)
    ids, labels = EXPECTED[fmt]
    assert out.input_ids == ids
    assert out.labels == labels
    assert out.input_ids == qwen_tokenizer.apply_chat_template(conv.as_dicts())["input_ids"]


def test_masking_strategies(qwen_tokenizer):
    conv = to_conversation(RECORDS["openai"], DataFormat.AUTO)
    head = [X] * 8
    last = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template, MaskingStrategy.LAST_ASSISTANT)(conv)
    assert last.labels == head + [X] * (len(TWO_TURNS_IDS) - 3) + A2 + [END, X]
    every = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template, MaskingStrategy.ALL)(conv)
    assert every.labels == every.input_ids


def fastchat_vicuna_prompt(conv: Conversation, system: str = VICUNA_SYSTEM) -> str:
    """Reference: FastChat's `Conversation.get_prompt` for vicuna_v1.1 (sep_style
    ADD_COLON_TWO, roles USER / ASSISTANT, sep " ", sep2 "</s>")."""
    messages = list(conv.messages)
    if messages and messages[0].role == "system":
        system = messages.pop(0).content
    roles = {"user": "USER", "assistant": "ASSISTANT"}
    seps = [" ", "</s>"]
    text = system + seps[0]
    for i, m in enumerate(messages):
        text += roles[m.role] + ": " + m.content + seps[i % 2]
    return text


def happy_llm_ids(tokenizer, conv: Conversation) -> list[int]:
    """Reference: happy-llm's Qwen SFT `preprocess` (chapter 6.2): pieces tokenized one by one
    and concatenated, system "You are a helpful assistant.", user turns as "human"."""
    im_start = tokenizer("<|im_start|>").input_ids
    im_end = tokenizer("<|im_end|>").input_ids
    nl = tokenizer("\n").input_ids
    system_message = "You are a helpful assistant."
    ids = im_start + tokenizer("system").input_ids + nl + tokenizer(system_message).input_ids + im_end + nl
    roles = {"user": "<|im_start|>human", "assistant": "<|im_start|>assistant"}
    for m in conv.messages:
        ids += tokenizer(roles[m.role]).input_ids + nl + tokenizer(m.content).input_ids + im_end + nl
    return ids


def dummy_conversations(n: int) -> list[Conversation]:
    records = json.loads(DUMMY_CONVERSATIONS.read_text())[:n]
    return [to_conversation(r, DataFormat.SHAREGPT) for r in records]


def test_vicuna_renders_as_fastchat(fresh_qwen_tokenizer):
    tok = fresh_qwen_tokenizer
    template = resolve_template(tok, "vicuna_v1.1")
    for conv in dummy_conversations(30):
        text = tok.apply_chat_template(conv.as_dicts(), chat_template=template, tokenize=False, eos_token="</s>")
        assert text == fastchat_vicuna_prompt(conv)
    # With a system turn and the generation prompt.
    conv = Conversation((Message("system", "Sys."), Message("user", "Hi"), Message("assistant", "Yo")))
    text = tok.apply_chat_template(conv.as_dicts()[:2], chat_template=template, tokenize=False,
                                   add_generation_prompt=True)
    assert text == "Sys. USER: Hi ASSISTANT:"
    # A tokenizer with a BOS token gets it first, as the Llama tokenizer adds it in FastChat.
    assert tok.apply_chat_template(conv.as_dicts(), chat_template=template, tokenize=False, bos_token="<s>",
                                   eos_token="</s>") == "<s>Sys. USER: Hi ASSISTANT: Yo</s>"


def test_vicuna_labels_are_the_answers_and_eos(fresh_qwen_tokenizer):
    tok = fresh_qwen_tokenizer
    renderer = Renderer(tok, resolve_template(tok, "vicuna_v1.1"))
    conv = dummy_conversations(1)[0]
    out = renderer(conv)
    spans = labelled_spans(out.labels)
    # "ASSISTANT:" ends the prompt, so each answer starts with its space.
    assert [tok.decode(s) for s in spans] == [" " + m.content + "<|im_end|>" for m in conv.messages
                                               if m.role == "assistant"]


def test_chatml_matches_happy_llm_token_for_token(fresh_qwen_tokenizer):
    tok = fresh_qwen_tokenizer
    renderer = Renderer(tok, resolve_template(tok, "chatml"))
    for conv in dummy_conversations(50):
        out = renderer(conv)
        assert out.input_ids == happy_llm_ids(tok, conv)
        assert [tok.decode(s) for s in labelled_spans(out.labels)] == [
            m.content + "<|im_end|>" for m in conv.messages if m.role == "assistant"]


def test_chatml_user_text():
    from jinja2 import Template

    text = Template(BUILTIN_TEMPLATES["chatml_user"]).render(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], add_generation_prompt=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def labelled_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for t in labels:
        if t == X:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(t)
    if current:
        spans.append(current)
    return spans


def test_end_of_turn_token(qwen_tokenizer):
    assert end_of_turn_token_id(Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)) == END


def test_template_that_rewrites_earlier_turns_is_refused(qwen_tokenizer):
    # A template that only shows the last assistant answer (as reasoning templates drop old
    # thoughts): prefixes no longer match, and the record is refused, not mis-masked.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n'"
        " + '...' + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    conv = to_conversation(RECORDS["openai"], DataFormat.AUTO)
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, template)(conv)
    assert e.value.kind == "template_mismatch"
    assert "assistant turn 2 does not tokenize to a prefix" in str(e.value)


def test_template_errors_are_record_errors(qwen_tokenizer):
    conv = Conversation((Message("user", "q"), Message("assistant", "a")))
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, "{{ raise_exception('no users here') }}")(conv)
    assert e.value.kind == "template_error" and "no users here" in str(e.value)


def test_template_resolution_errors(fresh_qwen_tokenizer):
    tok = fresh_qwen_tokenizer
    with pytest.raises(LmforgeError, match="unknown --template 'llama9'"):
        resolve_template(tok, "llama9")
    tok.chat_template = None
    with pytest.raises(LmforgeError, match="the tokenizer has no chat template; pass --template"):
        resolve_template(tok, "auto")


# Template shapes other families use, written with tokens the Qwen vocabulary has as specials:
# a header / end-of-turn family (end token, no separator), an [INST] family (answer closed by
# EOS, next turn opened by BOS), a family that writes a newline after its end-of-turn token.
SHAPES = {
    "header_eot": (
        "{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content']"
        " + '<|quad_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}",
        "<|quad_end|>",
    ),
    "inst": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|endoftext|>[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}",
        "<|im_end|>",
    ),
    "end_then_newline": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|quad_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "<|quad_end|>",
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_other_template_shapes(qwen_tokenizer, shape):
    template, end = SHAPES[shape]
    renderer = Renderer(qwen_tokenizer, template)
    conv = to_conversation(RECORDS["sharegpt"], DataFormat.AUTO)
    out = renderer(conv)
    assert out.input_ids == qwen_tokenizer.apply_chat_template(conv.as_dicts(), chat_template=template)["input_ids"]
    spans = [qwen_tokenizer.decode(s) for s in labelled_spans(out.labels)]
    # [INST] templates have no generation prompt: the answer's leading space is trained.
    space = " " if shape == "inst" else ""
    assert spans == [space + "Hello!" + end, space + "4" + end]
    assert end_of_turn_token_id(renderer) == qwen_tokenizer.convert_tokens_to_ids(end)


# ---------------------------------------------------------------------------------------------
# The fast path (`render_batch`, what `prepare` uses) against the exact path (`render_exact`,
# every prefix tokenized) and apply_chat_template: identical records, or identical errors.
# ---------------------------------------------------------------------------------------------


def all_conversations() -> list[Conversation]:
    from conftest import ALPACA_DEMO
    from lmforge.data.formats import iter_conversations

    return dummy_conversations(500) + [c for _, c in iter_conversations(str(ALPACA_DEMO))]


def exact_results(renderer: Renderer, conversations) -> list:
    out = []
    for conv in conversations:
        try:
            out.append(renderer.render_exact(conv))
        except RecordError as e:
            out.append(("error", e.kind, e.reason))
    return out


def fast_results(renderer: Renderer, conversations, batch: int = 64) -> tuple[list, int]:
    """render_batch's results (errors as tuples, to compare) and how many records it handed to
    the exact path."""
    calls = []
    exact = renderer.render_exact

    def counted(conv):
        calls.append(conv)
        return exact(conv)

    renderer.render_exact = counted
    try:
        results = [r for i in range(0, len(conversations), batch)
                   for r in renderer.render_batch(conversations[i : i + batch])]
    finally:
        del renderer.render_exact
    return [("error", r.kind, r.reason) if isinstance(r, RecordError) else r for r in results], len(calls)


TEMPLATE_CASES = [("qwen", "assistant"), ("qwen", "last_assistant"), ("qwen", "all"),
                  ("vicuna_v1.1", "assistant"), ("chatml", "assistant"), ("chatml_user", "assistant")]


@pytest.mark.parametrize("template, strategy", TEMPLATE_CASES)
def test_fast_path_equals_exact_path_and_apply_chat_template(fresh_qwen_tokenizer, template, strategy):
    tok = fresh_qwen_tokenizer
    chat_template = tok.chat_template if template == "qwen" else resolve_template(tok, template)
    renderer = Renderer(tok, chat_template, MaskingStrategy(strategy))
    conversations = all_conversations()
    fast, handed_over = fast_results(renderer, conversations)
    assert fast == exact_results(renderer, conversations)
    assert handed_over == 0  # every record was settled by the fast path itself
    assert [r.input_ids for r in fast] == [
        tok.apply_chat_template(c.as_dicts(), chat_template=chat_template)["input_ids"] for c in conversations]


@pytest.mark.parametrize("template", ["qwen", *sorted(BUILTIN_TEMPLATES), *sorted(SHAPES)])
def test_rendered_text_equals_apply_chat_template(fresh_qwen_tokenizer, template):
    tok = fresh_qwen_tokenizer
    if template == "qwen":
        chat_template = tok.chat_template
    elif template in SHAPES:
        chat_template = SHAPES[template][0]
    else:
        chat_template = resolve_template(tok, template)
    renderer = Renderer(tok, chat_template)
    conversations = dummy_conversations(60) + [to_conversation(r, DataFormat.AUTO) for r in RECORDS.values()]
    for conv in conversations:
        messages = conv.as_dicts()
        for k in range(1, len(messages) + 1):
            for generation_prompt in (False, True):
                assert renderer.text(messages[:k], generation_prompt) == tok.apply_chat_template(
                    messages[:k], chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt)


# Contents chosen to stress the boundaries: leading / trailing spaces and newlines that merge
# with the template's text, non-ASCII and combining characters, digits after spaces, and a
# special token's text inside a message (which the tokenizer turns into the special token).
ADVERSARIAL = [
    " leading space", "trailing space ", "  two leading", "\nnewline first", "newline last\n", "\n\n",
    "5 apples", "  5", "你好，世界", "emoji 😀👍🏽", "e\u0301 combining", "tab\tand\u00a0nbsp", "'s and 're",
    "text <|im_end|> inside", "<|im_start|>assistant\nfake turn", "ends with <|im_start|>", "x" * 300,
]


@pytest.mark.parametrize("template", ["qwen", *sorted(BUILTIN_TEMPLATES), *sorted(SHAPES)])
def test_fast_path_equals_exact_path_on_adversarial_contents(fresh_qwen_tokenizer, template):
    import random

    tok = fresh_qwen_tokenizer
    if template == "qwen":
        chat_template = tok.chat_template
    elif template in SHAPES:
        chat_template = SHAPES[template][0]
    else:
        chat_template = resolve_template(tok, template)
    rng = random.Random(0)
    conversations = []
    for _ in range(200):
        turns = rng.randint(1, 3)
        messages = [Message("system", rng.choice(ADVERSARIAL))] if rng.random() < 0.3 else []
        for _ in range(turns):
            messages += [Message("user", rng.choice(ADVERSARIAL)), Message("assistant", rng.choice(ADVERSARIAL))]
        conversations.append(Conversation(tuple(messages)))
    renderer = Renderer(tok, chat_template)
    fast, _ = fast_results(renderer, conversations)
    assert fast == exact_results(renderer, conversations)


# A template whose generation prompt ends in two spaces, so that an answer starting with a
# digit follows them. In the conversation the spaces are two tokens (" ", " "), and the
# prompt's end falls on a token boundary; yet the prompt alone ends in the single token "  ".
# The prompt is therefore not a token prefix, and a check on character offsets alone would
# have accepted it. Both paths must refuse the record, with the same message.
TWO_SPACES = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant  ' + m['content'] + "
    "'<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant  ' }}{% endif %}"
)


def test_prompt_on_a_token_boundary_that_is_not_a_token_prefix_is_refused(qwen_tokenizer):
    tok = qwen_tokenizer
    conv = Conversation((Message("user", "How many?"), Message("assistant", "5 apples")))
    renderer = Renderer(tok, TWO_SPACES)
    messages = conv.as_dicts()
    prompt, full = renderer.text(messages[:1], True), renderer.text(messages, False)
    assert full.startswith(prompt)
    encoding = tok.backend_tokenizer.encode(full, add_special_tokens=False)
    assert len(prompt) in [start for start, _ in encoding.offsets]  # the offsets would have said yes
    fast, handed_over = fast_results(renderer, [conv])
    assert fast == exact_results(renderer, [conv])
    assert fast[0][:2] == ("error", "template_mismatch") and handed_over == 1


def test_prefix_that_is_not_a_string_prefix_goes_to_the_exact_path(qwen_tokenizer):
    # The template of test_template_that_rewrites_earlier_turns_is_refused: the fast path
    # cannot place the prompt, hands the record over, and the exact path refuses it.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n'"
        " + '...' + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    renderer = Renderer(qwen_tokenizer, template)
    conv = to_conversation(RECORDS["openai"], DataFormat.AUTO)
    fast, handed_over = fast_results(renderer, [conv])
    assert handed_over == 1
    assert fast == exact_results(renderer, [conv])
    assert fast[0][1] == "template_mismatch" and "assistant turn 2 does not tokenize to a prefix" in fast[0][2]


def test_template_errors_in_a_batch_stay_with_their_record(qwen_tokenizer):
    template = ("{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('boom') }}{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    good = Conversation((Message("user", "q"), Message("assistant", "a")))
    bad = Conversation((Message("user", "boom"), Message("assistant", "a")))
    results = Renderer(qwen_tokenizer, template).render_batch([good, bad, good])
    assert isinstance(results[1], RecordError) and results[1].kind == "template_error" and "boom" in results[1].reason
    assert results[0] == results[2] == Renderer(qwen_tokenizer, template).render_exact(good)


def test_pickled_renderer_renders_the_same(qwen_tokenizer):
    # Worker processes get the renderer pickled; the compiled template is rebuilt there.
    import pickle

    renderer = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)
    copy = pickle.loads(pickle.dumps(renderer))
    conversations = dummy_conversations(50)
    assert copy.render_batch(conversations) == renderer.render_batch(conversations)
