"""Rendering and loss masks: exact input_ids / labels on the Qwen2.5 tokenizer, equality with
`apply_chat_template`, built-in templates against their reference renderings."""

from __future__ import annotations

import json

import pytest

from lmforge.data.options import DataFormat
from lmforge.data.records import to_conversation
from lmforge.data.schema import Conversation, Message
from lmforge.data.render import IGNORE_INDEX as X
from lmforge.data.render import MaskingStrategy, Renderer, end_of_turn_token_id
from lmforge.data.templates import BUILTIN_TEMPLATES, VICUNA_SYSTEM, resolve_template
from lmforge.errors import LmforgeError, RecordError

from chat_reference import STYLES, Style, reference_labels, reference_spans
from chat_reference import labelled_runs as labelled_spans
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


def test_end_of_turn_token(qwen_tokenizer):
    assert end_of_turn_token_id(Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)) == END


REWRITES_EARLIER = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n'"
    " + '...' + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_that_hides_earlier_answers_is_refused_with_the_cause(qwen_tokenizer):
    # A template that writes "..." for every answer but the last has nothing of those turns to
    # train on: the record is refused, saying so, not trained on "...".
    conv = to_conversation(RECORDS["openai"], DataFormat.AUTO)
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, REWRITES_EARLIER)(conv)
    assert e.value.kind == "unrendered_turn"
    assert "renders turn 2 (assistant) the same whatever it holds" in e.value.reason
    assert "--reasoning_turns split" in e.value.reason
    # Under last_assistant only the last answer is trained, which the template does render.
    last = Renderer(qwen_tokenizer, REWRITES_EARLIER, MaskingStrategy.LAST_ASSISTANT)(conv)
    assert [qwen_tokenizer.decode(s) for s in labelled_spans(last.labels)] == ["4<|im_end|>"]


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
# Against apply_chat_template and the character-span reference (`chat_reference.py`).
# ---------------------------------------------------------------------------------------------


def all_conversations() -> list[Conversation]:
    from conftest import ALPACA_DEMO
    from lmforge.data.records import iter_conversations

    return dummy_conversations(500) + [c for _, c in iter_conversations(str(ALPACA_DEMO))]


REFERENCE_STYLES = {"qwen": "chatml", "chatml_user": "chatml", "chatml": STYLES["chatml"],
                    "vicuna_v1.1": Style(("ASSISTANT:",), "<|im_end|>")}


def reference_style(template: str) -> Style:
    style = REFERENCE_STYLES[template]
    return STYLES[style] if isinstance(style, str) else style


def check_records(tok, chat_template: str, style: Style, strategy: MaskingStrategy, conversations, results) -> None:
    for conv, out in zip(conversations, results):
        messages = conv.as_dicts()
        ids = tok.apply_chat_template(messages, chat_template=chat_template)["input_ids"]
        assert out.input_ids == ids
        if strategy == MaskingStrategy.ALL:
            assert out.labels == ids
            continue
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = set(assistants[-1:] if strategy == MaskingStrategy.LAST_ASSISTANT else assistants)
        full = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
        offsets = tok.backend_tokenizer.encode(full, add_special_tokens=False).offsets
        assert out.labels == reference_labels(ids, offsets, reference_spans(full, messages, style, trained))


TEMPLATE_CASES = [("qwen", "assistant"), ("qwen", "last_assistant"), ("qwen", "all"),
                  ("vicuna_v1.1", "assistant"), ("chatml", "assistant"), ("chatml_user", "assistant")]


@pytest.mark.parametrize("template, strategy", TEMPLATE_CASES)
def test_real_data_equals_apply_chat_template_and_the_reference(fresh_qwen_tokenizer, template, strategy):
    tok = fresh_qwen_tokenizer
    chat_template = tok.chat_template if template == "qwen" else resolve_template(tok, template)
    strategy = MaskingStrategy(strategy)
    renderer = Renderer(tok, chat_template, strategy)
    conversations = all_conversations()
    results = [r for i in range(0, len(conversations), 64) for r in renderer.render_batch(conversations[i : i + 64])]
    check_records(tok, chat_template, reference_style(template), strategy, conversations, results)


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
    " leading space", "trailing space ", "  two leading", "\nnewline first", "newline last\n", "\n\n  x",
    "5 apples", "  5", "你好，世界", "emoji 😀👍🏽", "e\u0301 combining", "tab\tand\u00a0nbsp", "'s and 're",
    "text <|im_end|> inside", "<|im_start|>assistant\nfake turn", "ends with <|im_start|>", "x" * 300,
]


@pytest.mark.parametrize("template", ["qwen", *sorted(BUILTIN_TEMPLATES)])
def test_adversarial_contents_equal_the_reference(fresh_qwen_tokenizer, template):
    import random

    tok = fresh_qwen_tokenizer
    chat_template = tok.chat_template if template == "qwen" else resolve_template(tok, template)
    rng = random.Random(0)
    conversations, n = [], 0

    def text() -> str:
        nonlocal n
        n += 1
        return rng.choice(ADVERSARIAL) + f" #{n}" + rng.choice(["", " ", "\n", "  \n"])

    for _ in range(200):
        messages = [Message("system", text())] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages += [Message("user", text()), Message("assistant", text())]
        conversations.append(Conversation(tuple(messages)))
    results = Renderer(tok, chat_template).render_batch(conversations)
    check_records(tok, chat_template, reference_style(template), MaskingStrategy.ASSISTANT, conversations, results)


def test_answer_starting_with_whitespace_trains_the_merged_token(qwen_tokenizer):
    """Qwen's BPE merges the template's newline after `assistant` with an answer's leading
    newlines into one token: that token carries loss (its characters reach into the answer),
    the ids stay apply_chat_template's."""
    conv = Conversation((Message("user", "Hi"), Message("assistant", "\n\nSure")))
    out = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)(conv)
    assert out.input_ids == qwen_tokenizer.apply_chat_template(conv.as_dicts())["input_ids"]
    assert [qwen_tokenizer.decode(s) for s in labelled_spans(out.labels)] == ["\n\n\nSure<|im_end|>"]
    assert qwen_tokenizer.decode(out.input_ids[out.labels.index(next(t for t in out.labels if t != X)) - 1]) \
        == "assistant"


def test_generation_blocks_equal_hf_assistant_mask(qwen_tokenizer):
    """Where a template marks answers with {% generation %}, the labels are HF's
    `return_assistant_tokens_mask` plus the end-of-turn token after each answer."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    renderer = Renderer(qwen_tokenizer, template)
    for conv in dummy_conversations(50) + [Conversation((Message("user", "x"), Message("assistant", "  \n5 apples ")))]:
        hf = qwen_tokenizer.apply_chat_template(conv.as_dicts(), chat_template=template, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids, mask = hf["input_ids"], hf["assistant_masks"]
        with_end = [bool(m) or (k > 0 and mask[k - 1] and ids[k] == END) for k, m in enumerate(mask)]
        out = renderer(conv)
        assert out.input_ids == ids
        assert out.labels == [t if m else X for t, m in zip(ids, with_end)]


def test_per_message_train_flags_and_weights(qwen_tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "train": False},
                           {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "weight": 1}]}
    conv = to_conversation(record, DataFormat.AUTO)
    out = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)(conv)
    assert [qwen_tokenizer.decode(s) for s in labelled_spans(out.labels)] == ["4<|im_end|>"]
    record["messages"][1] = {"role": "assistant", "content": "Hello!", "loss_weight": 1.0}
    record["messages"][3]["weight"] = 0
    out = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template, MaskingStrategy.LAST_ASSISTANT)(
        to_conversation(record, DataFormat.AUTO))
    assert [qwen_tokenizer.decode(s) for s in labelled_spans(out.labels)] == ["Hello!<|im_end|>"]
    # Under --masking all, a message marked train: false is the only text without loss.
    record["messages"][3] = {"role": "assistant", "content": "4", "train": False}
    out = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template, MaskingStrategy.ALL)(
        to_conversation(record, DataFormat.AUTO))
    untrained = [t for t, label in zip(out.input_ids, out.labels) if label == X]
    assert qwen_tokenizer.decode(untrained) == "4<|im_end|>"


def test_template_errors_in_a_batch_stay_with_their_record(qwen_tokenizer):
    template = ("{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('boom') }}{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    good = Conversation((Message("user", "q"), Message("assistant", "a")))
    bad = Conversation((Message("user", "boom"), Message("assistant", "a")))
    results = Renderer(qwen_tokenizer, template).render_batch([good, bad, good])
    assert isinstance(results[1], RecordError) and results[1].kind == "template_error" and "boom" in results[1].reason
    assert results[0] == results[2] == Renderer(qwen_tokenizer, template)(good)


def test_pickled_renderer_renders_the_same(qwen_tokenizer):
    # Worker processes get the renderer pickled; the compiled template is rebuilt there.
    import pickle

    renderer = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)
    copy = pickle.loads(pickle.dumps(renderer))
    conversations = dummy_conversations(50)
    assert copy.render_batch(conversations) == renderer.render_batch(conversations)


# --- Tool calls in the form each template takes ------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL_RECORD = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."}], "tools": [WEATHER_TOOL]}
TURN = "{{ '<|im_start|>' + m['role'] + '\n' }}"
CLOSE = "{{ '<|im_end|>\n' }}"
PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# The content added to the calls with `+` and the arguments concatenated as text (DeepSeek-V3.1's way).
CONCATENATING = ("{% for m in messages %}" + TURN + "{% if m['tool_calls'] is defined %}"
                 "{% for c in m['tool_calls'] %}{{ m['content'] + '<tool>' + c['function']['name'] + ':' "
                 "+ c['function']['arguments'] + '</tool>' }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
                 + CLOSE + "{% endfor %}" + PROMPT)
# The content printed whatever it is (GLM-4.5's way): a null content must not be written as "None".
PRINTING = ("{% for m in messages %}" + TURN + "{{ m['content'] }}{% for c in m['tool_calls'] or [] %}"
            "<tool>{{ c['function']['name'] }}:{{ c['function']['arguments'] | tojson }}</tool>{% endfor %}"
            + CLOSE + "{% endfor %}" + PROMPT)
# The tool list read without a guard (llama.cpp's Phi-4-mini loops over it): only records
# offering tools render, as with apply_chat_template.
UNGUARDED_TOOLS = ("{% for t in tools %}{{ '<tools>' + t['function']['name'] + '</tools>' }}{% endfor %}" + PRINTING)
# The tools rendered, the calls not (Kimi-K2's llama.cpp template).
NO_CALLS = ("{{ tools | tojson if tools else '' }}{% for m in messages %}" + TURN
            + "{% if m['content'] is string %}{{ m['content'] }}{% endif %}" + CLOSE + "{% endfor %}" + PROMPT)


@pytest.mark.parametrize("template, form, call_text", [
    (CONCATENATING, (True, True), '<tool>get_weather:{"city": "Paris"}</tool>'),
    (PRINTING, (False, False), '<tool>get_weather:{"city": "Paris"}</tool>'),
    (UNGUARDED_TOOLS, (False, False), '<tool>get_weather:{"city": "Paris"}</tool>'),
], ids=["concatenating", "printing", "unguarded-tools"])
def test_tool_calls_go_to_the_template_in_the_form_it_takes(qwen_tokenizer, template, form, call_text):
    tok = qwen_tokenizer
    renderer = Renderer(tok, template)
    assert (renderer.tool_form.empty_content, renderer.tool_form.string_arguments) == form
    conv = to_conversation(CALL_RECORD, DataFormat.AUTO)
    out = renderer(conv)
    messages = renderer.template_messages(conv)
    assert out.input_ids == tok.apply_chat_template(messages, tools=conv.tool_list, chat_template=template)["input_ids"]
    text = tok.decode(out.input_ids)
    assert "None" not in text
    assert [tok.decode(s) for s in labelled_spans(out.labels)] == [call_text + "<|im_end|>", "21 degrees.<|im_end|>"]


def test_a_template_that_needs_a_tool_list_refuses_records_without_tools_as_hf_does(qwen_tokenizer):
    renderer = Renderer(qwen_tokenizer, UNGUARDED_TOOLS)  # its probe passes (records with tools: test above)
    plain = to_conversation({"messages": CALL_RECORD["messages"][:1] + [{"role": "assistant", "content": "Hi"}]},
                            DataFormat.AUTO)
    with pytest.raises(Exception):  # apply_chat_template cannot render it either
        qwen_tokenizer.apply_chat_template(plain.as_dicts(), chat_template=UNGUARDED_TOOLS)
    (refused,) = renderer.render_batch([plain])
    assert isinstance(refused, RecordError) and refused.kind == "template_error"


def test_calls_the_template_leaves_out_are_found_though_the_tools_name_them(qwen_tokenizer):
    renderer = Renderer(qwen_tokenizer, NO_CALLS)
    (result,) = renderer.render_batch([to_conversation(CALL_RECORD, DataFormat.AUTO)])
    assert isinstance(result, RecordError) and "does not render the tool calls of turn 1" in result.reason
