"""Every published chat template × records people's data holds: ids equal to
`apply_chat_template`, labels equal to an independent character-span reference
(`chat_reference.py`), no valid record refused.

The templates are the published texts in `tests/templates/` (sources in SOURCES.md), each
installed on a tokenizer directory built from the shared Qwen2.5 tokenizer with the model's
own special tokens added (`tests/templates/tokens.json`). Records are built here to be nasty:
whitespace at both ends of answers and prompts, 2-8 turns, empty system messages, tool calls,
reasoning, CJK / emoji / RTL / combining marks, template markers inside user content.
"""

from __future__ import annotations

import json
import pathlib
import random
import unicodedata

import pytest

from chat_reference import STYLES, X, labelled_runs, reference_labels, reference_spans
from conftest import DUMMY_CONVERSATIONS, QWEN_TOKENIZER
from lmforge.data.encode import render_pairs
from lmforge.data.options import DataFormat
from lmforge.data.records import to_conversation, to_pair
from lmforge.data.render import MaskingStrategy, Renderer, Unrendered, end_of_turn_token_id, split_turns
from lmforge.data.schema import Conversation
from lmforge.errors import RecordError

TEMPLATES = pathlib.Path(__file__).parents[1] / "templates"  # tests/templates
TOKENS = json.loads((TEMPLATES / "tokens.json").read_text())
ZOO = sorted(TOKENS)
STYLE_OF = {"qwen2.5": "chatml", "gemma-2": "gemma", "gemma-3": "gemma"}
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "deepseek-r1-distill": "<｜end▁of▁sentence｜>",
               "llama-3.1": "<|eot_id|>", "mistral-7b-v0.3": "</s>", "gemma-2": "<end_of_turn>",
               "gemma-3": "<end_of_turn>", "phi-3-mini": "<|end|>", "phi-4": "<|im_end|>", "vicuna": "</s>"}

# What each template can express besides plain user / assistant turns.
TAKES_SYSTEM = set(ZOO) - {"gemma-2", "mistral-7b-v0.3"}  # Gemma-2 raises; Mistral writes it only before a final user turn
TAKES_TOOLS = {"qwen2.5", "qwen3", "llama-3.1", "mistral-7b-v0.3"}
TAKES_REASONING = {"qwen3"}
RAISES_ON_SYSTEM = {"gemma-2"}


def template_text(name: str) -> str:
    text = (TEMPLATES / f"{name}.jinja").read_text()
    if name == "vicuna":  # published indented for reading; its README strips it before use
        text = text.replace("    ", "").replace("\n", "")
    return text


@pytest.fixture(scope="session")
def zoo_tokenizers(tmp_path_factory):
    """A tokenizer directory per template: Qwen2.5's vocabulary, the model's special tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    out = {}
    for name in ZOO:
        spec = TOKENS[name]
        tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
        vocab = tok.get_vocab()
        roles = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if spec[k]}
        specials = [t for t in list(roles.values()) + spec["added_special_tokens"] if t not in vocab]
        strips = set(spec["rstrip_tokens"])  # as the model's tokenizer has them (Phi-3's role tokens)
        tok.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in strips)
                        for t in dict.fromkeys(specials)], special_tokens=True)
        plain = [t for t in spec["added_plain_tokens"] if t not in vocab and t not in specials]
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
        for key, value in roles.items():
            setattr(tok, key, value)
        if not spec["bos_token"]:
            tok.bos_token = None
        tok.chat_template = template_text(name)
        path = tmp_path_factory.mktemp(name)
        tok.save_pretrained(path)
        out[name] = AutoTokenizer.from_pretrained(str(path))
    return out


# ---------------------------------------------------------------------------------------------
# Nasty records
# ---------------------------------------------------------------------------------------------

EDGES = ["", " ", "  ", "\n", "\n\n", "\t", " \n ", "\n\t"]
BODIES = ["Sure, here it is.", "你好，世界。这是中文。", "emoji 😀👍🏽 done", "مرحبا بالعالم", "e\u0301 combining n\u0303",
          "5 apples", "'s and 're", "x" * 120, "line one\nline two\n\nline four", "tabs\tand\u00a0nbsp"]
MARKERS = ["<|im_start|>assistant\nfake", "<start_of_turn>model\nfake", "[INST] fake [/INST]", "ASSISTANT: fake",
           "<|start_header_id|>assistant<|end_header_id|>", "<|assistant|>\nfake", "<｜Assistant｜>fake", "</s> fake",
           "<|eot_id|> fake", "<end_of_turn> fake", "<|im_end|> fake", "<think>fake</think>"]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class Tagger:
    """Distinct message texts: every message carries its own number."""

    def __init__(self, rng: random.Random):
        self.rng, self.n = rng, 0

    def text(self, markers: bool = False) -> str:
        self.n += 1
        body = self.rng.choice(MARKERS if markers and self.rng.random() < 0.5 else BODIES)
        return self.rng.choice(EDGES) + f"{body} #{self.n}" + self.rng.choice(EDGES)


def plain_record(rng: random.Random, tag: Tagger) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(["", "  ", "\n"])})  # empty: no system prompt
    for _ in range(rng.randint(1, 4)):
        messages += [{"role": "user", "content": tag.text(markers=True)}, {"role": "assistant", "content": tag.text()}]
    return {"messages": messages}


def system_record(rng: random.Random, tag: Tagger) -> dict:
    record = plain_record(rng, tag)
    record["messages"] = [{"role": "system", "content": tag.text()}] + [
        m for m in record["messages"] if m["role"] != "system"]
    return record


def reasoning_record(rng: random.Random, tag: Tagger) -> dict:
    record = plain_record(rng, tag)
    for m in record["messages"]:
        if m["role"] == "assistant":
            if rng.random() < 0.5:
                m["reasoning_content"] = f"Let me think. #{tag.n + 1}"
                tag.n += 1
            else:
                m["content"] = f"<think>\nthinking #{tag.n + 1}\n</think>\n\n" + m["content"].lstrip()
                tag.n += 1
    return record


def tool_record(rng: random.Random, tag: Tagger) -> dict:
    city = rng.choice(["Paris", "東京", "Zürich"])
    messages = [{"role": "user", "content": tag.text()},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "call00001", "type": "function",
                                 "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
                {"role": "tool", "tool_call_id": "call00001", "content": f"{{\"temp\": {rng.randint(-5, 30)}}}"},
                {"role": "assistant", "content": tag.text()}]
    if rng.random() < 0.5:
        messages += [{"role": "user", "content": tag.text(markers=True)}, {"role": "assistant", "content": tag.text()}]
    return {"messages": messages, "tools": [WEATHER]}


KINDS = {"plain": plain_record, "system": system_record, "reasoning": reasoning_record, "tools": tool_record}


def records(kind: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{kind}{seed}")
    tag = Tagger(rng)
    return [KINDS[kind](rng, tag) for _ in range(n)]


def expected_refusal(name: str, kind: str, record: dict) -> set[str] | None:
    """The error kinds a record of this kind may get under this template (None: it must render).
    A <think> block inside the content is content to a template that knows no reasoning, except
    to DeepSeek-R1's, which cuts it out."""
    if kind == "system" and name not in TAKES_SYSTEM:
        return {"unrendered_system"}
    in_fields = any("reasoning_content" in m for m in record["messages"])
    if kind == "reasoning" and name not in TAKES_REASONING and (in_fields or name == "deepseek-r1-distill"):
        return {"unrendered_reasoning"}
    if kind == "tools" and name not in TAKES_TOOLS:
        return {"template_error", "unrendered_tools", "unrendered_tool_calls", "unrendered_tool_results"}
    return None


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


_RENDERERS: dict[str, Renderer] = {}


def template_renderer(name: str, tok) -> Renderer:
    """One renderer per template (it probes its template once)."""
    if name not in _RENDERERS:
        _RENDERERS[name] = Renderer(tok, tok.chat_template)
    return _RENDERERS[name]


def check_against_reference(name: str, tok, conv: Conversation, rendered, trained: set[int]) -> None:
    if name in RAISES_ON_SYSTEM:  # a blank system message is rendered as written, or left out where refused
        kept = [i for i, m in enumerate(conv.messages) if not (m.role == "system" and not m.content.strip())]
        trained = {kept.index(i) for i in trained}
        conv = Conversation(tuple(conv.messages[i] for i in kept), conv.tools)
    messages = template_renderer(name, tok).template_messages(conv)  # tool calls in the form the template takes
    expected_ids = tok.apply_chat_template(messages, tools=conv.tool_list)["input_ids"]
    assert rendered.input_ids == expected_ids
    full = tok.apply_chat_template(messages, tools=conv.tool_list, tokenize=False)
    spans = reference_spans(full, messages, STYLES[STYLE_OF.get(name, name)], trained)
    offsets = tok.backend_tokenizer.encode(full, add_special_tokens=False).offsets
    added = frozenset(tok.added_tokens_decoder)
    assert rendered.labels == reference_labels(expected_ids, offsets, spans, added)
    # The labelled text is each answer and its end-of-turn text, plus, where BPE merged the
    # template's text before an answer into the answer's first token, that whitespace; minus,
    # where a header token took the answer's leading whitespace in (Phi-3), that whitespace:
    # the header itself is never trained.
    # (Qwen's tokenizer NFC-normalizes text: decoded text is compared in that form.)
    runs = [tok.decode(run) for run in labelled_runs(rendered.labels)]
    assert len(runs) == len(spans)
    for run, (start, end) in zip(runs, spans):
        header_end = max((e for (s, e), t in zip(offsets, expected_ids) if t in added and s < start < e), default=start)
        text = unicodedata.normalize("NFC", full[header_end:end])
        assert run.endswith(text) and not run[: len(run) - len(text)].strip()
        assert text.endswith(END_OF_TURN[name])


def assistant_turns(conv: Conversation) -> set[int]:
    return {i for i, m in enumerate(conv.messages) if m.role == "assistant"}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", ZOO)
def test_zoo_ids_and_labels_equal_the_references(zoo_tokenizers, name, kind):
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template)
    raw = records(kind, 40)
    convs = [to_conversation(r, DataFormat.AUTO) for r in raw]
    results = renderer.render_batch(convs)
    for record, conv, result in zip(raw, convs, results):
        refused = expected_refusal(name, kind, record)
        if isinstance(result, RecordError):
            assert refused is not None and result.kind in refused, (name, kind, result.kind, result.reason)
            continue
        assert refused is None or kind == "tools", (name, kind)  # a template without tools may take a tools-free turn
        check_against_reference(name, tok, conv, result, assistant_turns(conv))


@pytest.mark.parametrize("name", ZOO)
def test_plain_records_are_never_refused(zoo_tokenizers, name):
    tok = zoo_tokenizers[name]
    convs = [to_conversation(r, DataFormat.AUTO) for r in records("plain", 200, seed=1)]
    results = Renderer(tok, tok.chat_template).render_batch(convs)
    assert [r for r in results if isinstance(r, RecordError)] == []


@pytest.mark.parametrize("name", ZOO)
def test_empty_system_message_renders_as_written(zoo_tokenizers, name):
    """An OpenAI-messages record's empty system message is a message: the ids are
    apply_chat_template(messages)'s (Qwen2.5 then writes an empty system turn, not its default
    prompt); a template that refuses any system message (Gemma-2) renders the record without
    it, as it holds nothing. An empty `system` column, or an empty ShareGPT system turn, means
    no system prompt, as LLaMA-Factory reads them."""
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    for empty in ("", "  ", "\n"):
        messages = [{"role": "system", "content": empty}] + turns
        out = renderer(to_conversation({"messages": messages}, DataFormat.AUTO))
        expected = messages if name not in RAISES_ON_SYSTEM else turns
        assert out.input_ids == tok.apply_chat_template(expected)["input_ids"]
        sharegpt = {"conversations": [{"from": "system", "value": empty}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Yo"}]}
        for record in (sharegpt, {"conversations": sharegpt["conversations"][1:], "system": empty},
                       {"instruction": "Hi", "output": "Yo", "system": empty}):
            assert renderer(to_conversation(record, DataFormat.AUTO)).input_ids == \
                tok.apply_chat_template(turns)["input_ids"]
    if name == "qwen2.5":  # the default system prompt is not put in place of an empty one
        out = renderer(to_conversation({"messages": [{"role": "system", "content": ""}] + turns}, DataFormat.AUTO))
        assert "You are Qwen" not in tok.decode(out.input_ids)


@pytest.mark.parametrize("name", ZOO)
def test_empty_tool_list_means_no_tools(zoo_tokenizers, name):
    """`"tools": "[]"`, `[]` or `""` (LLaMA-Factory's glaive data writes "[]" on a record without
    tools) is no tools: Llama-3.1's template, which tests `tools is not none`, would otherwise
    write its tool preamble into the record."""
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    expected = tok.apply_chat_template(turns)["input_ids"]
    for tools in ("[]", [], "", " "):
        for record in ({"messages": turns, "tools": tools},
                       {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
                        "tools": tools}):
            conv = to_conversation(record, DataFormat.AUTO)
            assert conv.tools == () and conv.tool_list is None
            out = renderer(conv)
            assert out.input_ids == expected
            assert "Environment: ipython" not in tok.decode(out.input_ids)


@pytest.mark.parametrize("kind", ["system", "reasoning"])
@pytest.mark.parametrize("name", ZOO)
def test_unrendered_parts_dropped_when_asked(zoo_tokenizers, name, kind):
    """--unrendered drop: the record is trained without the part the template cannot render,
    the part named; the result is what the reduced record renders to."""
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template, unrendered=Unrendered.DROP)
    for record in records(kind, 15):
        refused = expected_refusal(name, kind, record)
        conv = to_conversation(record, DataFormat.AUTO)
        result = renderer(conv)
        if refused is None:
            assert result.dropped == ()
            continue
        assert result.dropped == (kind,)
        reduced = [m for m in record["messages"] if not (kind == "system" and m["role"] == "system")]
        for m in reduced if kind == "reasoning" else []:
            m.pop("reasoning_content", None)
            if m["role"] == "assistant" and "</think>" in m["content"]:
                m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
        reduced_conv = to_conversation({"messages": reduced}, DataFormat.AUTO)
        check_against_reference(name, tok, reduced_conv, result, assistant_turns(reduced_conv))


@pytest.mark.parametrize("name", ZOO)
def test_last_assistant_and_per_message_flags(zoo_tokenizers, name):
    tok = zoo_tokenizers[name]
    rng = random.Random(3)
    for record in records("plain", 20, seed=2):
        assistants = [m for m in record["messages"] if m["role"] == "assistant"]
        for m in assistants:
            if rng.random() < 0.5:
                m["train"] = False
        conv = to_conversation(record, DataFormat.AUTO)
        flagged = {i for i, m in enumerate(conv.messages) if m.role == "assistant" and m.train is not False}
        if flagged:
            check_against_reference(name, tok, conv, Renderer(tok, tok.chat_template)(conv), flagged)
        last = max(assistant_turns(conv))
        if conv.messages[last].train is not False:
            check_against_reference(name, tok, conv, Renderer(tok, tok.chat_template, MaskingStrategy.LAST_ASSISTANT)(conv),
                                    {last})


@pytest.mark.parametrize("name", ZOO)
def test_end_of_turn_token(zoo_tokenizers, name):
    tok = zoo_tokenizers[name]
    assert end_of_turn_token_id(Renderer(tok, tok.chat_template)) == tok.convert_tokens_to_ids(END_OF_TURN[name])


def test_reasoning_turns_split_trains_every_turns_thinking(zoo_tokenizers):
    """Qwen3 drops the thinking of turns before the last user query: by default those turns
    are trained as rendered (without it); split gives one sample per turn, each rendered as
    the last, so every turn's thinking is in a trained span."""
    tok = zoo_tokenizers["qwen3"]
    renderer = Renderer(tok, tok.chat_template)
    record = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
                           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "R2"}]}
    conv = to_conversation(record, DataFormat.AUTO)
    whole = renderer(conv)
    assert [tok.decode(r) for r in labelled_runs(whole.labels)] == [
        "A1<|im_end|>", "<think>\nR2\n</think>\n\nA2<|im_end|>"]
    samples = [renderer(c) for c in split_turns(conv, renderer)]
    assert [[tok.decode(r) for r in labelled_runs(s.labels)] for s in samples] == [
        ["<think>\nR1\n</think>\n\nA1<|im_end|>"], ["<think>\nR2\n</think>\n\nA2<|im_end|>"]]
    for sample, sub in zip(samples, split_turns(conv, renderer)):
        assert sample.input_ids == tok.apply_chat_template(sub.as_dicts())["input_ids"]


@pytest.mark.parametrize("name", sorted(TAKES_REASONING | {"deepseek-r1-distill"}))
def test_reasoning_turns_generated_writes_the_thinking_the_model_emits(zoo_tokenizers, name):
    """--reasoning_turns generated: one sample per assistant turn; where the template drops the
    trained turn's thinking (DeepSeek-R1-Distill cuts every <think> block), the sample is the
    prompt with its generation prompt, then "<think>\\n{reasoning}\\n</think>\\n\\n{answer}" less
    what that prompt already opens, then the end-of-turn token; that text is what is trained.
    Where the template renders it (Qwen3), the samples are --reasoning_turns split's."""
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template)
    eot = END_OF_TURN[name]
    written = 0
    for record in records("reasoning", 20, seed=6):
        conv = to_conversation(record, DataFormat.AUTO)
        split, generated = split_turns(conv, renderer), split_turns(conv, renderer, generated=True)
        for plain, sample, result in zip(split, generated, renderer.render_batch(generated)):
            assert not isinstance(result, RecordError), result
            turn = record["messages"][len(sample.messages) - 1]
            thought = turn.get("reasoning_content") or turn["content"].split("</think>")[0].split("<think>")[-1]
            if name in TAKES_REASONING:
                assert result == renderer(plain)
                continue
            head = [{"role": m["role"], "content": m["content"].split("</think>")[-1].lstrip("\n")}  # the answer alone
                    if m["role"] == "assistant" and "</think>" in m["content"] else {"role": m["role"], "content": m["content"]}
                    for m in record["messages"][: len(sample.messages) - 1]]
            prompt = tok.apply_chat_template(head, add_generation_prompt=True, tokenize=False)
            assert prompt.endswith("<｜Assistant｜><think>\n")
            answer = turn["content"].split("</think>")[-1].lstrip("\n")
            completion = thought.strip("\n") + "\n</think>\n\n" + answer + eot
            assert result.input_ids == tok(prompt + completion, add_special_tokens=False)["input_ids"]
            [run] = [tok.decode(r) for r in labelled_runs(result.labels)]
            completion = unicodedata.normalize("NFC", completion)
            assert run.endswith(completion) and not run[: len(run) - len(completion)].strip()
            written += 1
    assert written >= 20 or name in TAKES_REASONING


def two_turns() -> Conversation:
    return to_conversation({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
                           DataFormat.AUTO)


def test_deepseek_generation_prompt_is_not_trained_twice(zoo_tokenizers):
    # DeepSeek-R1-Distill's generation prompt opens "<think>\n", which its rendered answers
    # do not hold: the span starts after "<｜Assistant｜>", where prompt and answer agree.
    tok = zoo_tokenizers["deepseek-r1-distill"]
    out = Renderer(tok, tok.chat_template)(two_turns())
    assert [tok.decode(r) for r in labelled_runs(out.labels)] == ["Yo<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"]


def test_phi3_header_that_takes_an_answers_whitespace_is_not_trained(zoo_tokenizers):
    """Phi-3's `<|assistant|>` strips the whitespace after it, so for an answer that starts with
    newlines or spaces the header token holds the answer's first characters: it stays untrained
    (the model would learn to emit its own header), the answer's text after it is trained."""
    tok = zoo_tokenizers["phi-3-mini"]
    header = tok.convert_tokens_to_ids("<|assistant|>")
    for answer in ("\n\nYo", "  Yo", "\n Yo \n"):
        record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]}
        out = Renderer(tok, tok.chat_template)(to_conversation(record, DataFormat.AUTO))
        assert out.input_ids == tok.apply_chat_template(record["messages"])["input_ids"]
        at = out.input_ids.index(header)
        assert out.labels[at] == X and out.labels[at + 1] != X
        assert [tok.decode(r) for r in labelled_runs(out.labels)] == [answer.lstrip() + "<|end|>"]


def test_phi3_final_eos_is_not_trained(zoo_tokenizers):
    tok = zoo_tokenizers["phi-3-mini"]
    out = Renderer(tok, tok.chat_template)(two_turns())
    # Rendered "4<|end|>\n<|endoftext|>"; `<|end|>` takes the newline after it into itself.
    assert tok.decode(out.input_ids).endswith("4<|end|><|endoftext|>")
    assert [tok.decode(r) for r in labelled_runs(out.labels)] == ["Yo<|end|>", "4<|end|>"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_preference_pairs(zoo_tokenizers, name):
    """DPO pairs under every template: the tokens before both answers identical, each side's
    scored tokens its answer and end-of-turn (the reference's last span)."""
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template, MaskingStrategy.LAST_ASSISTANT)
    rng = random.Random(5)
    tag = Tagger(rng)
    pairs = []
    for record in records("plain", 30, seed=4):
        messages = [m for m in record["messages"] if m["role"] != "system"][:-1]
        pairs.append(to_pair({"prompt": messages, "chosen": [{"role": "assistant", "content": tag.text()}],
                              "rejected": [{"role": "assistant", "content": tag.text()}]}, "auto"))
    for pair, result in zip(pairs, render_pairs(renderer, pairs)):
        assert not isinstance(result, RecordError), result
        for conv, side in zip(pair.conversations(), result):
            check_against_reference(name, tok, conv, side, {len(conv.messages) - 1})


def v1_message(m: dict, weight: float) -> dict:
    """A message as LLaMA-Factory v1 writes it: content parts with `value`, a `loss_weight`."""
    return {"role": m["role"], "content": [{"type": "text", "value": m["content"]}], "loss_weight": weight}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_llama_factory_v1_preference_pairs(zoo_tokenizers, name):
    """LLaMA-Factory v1's preference records (`chosen_messages` / `rejected_messages`, content
    parts with `value`, `loss_weight` on every message) are the same pairs as the OpenAI form:
    same tokens, each side scored on its last answer only (an earlier answer's loss_weight 1.0
    does not make it scored)."""
    tok = zoo_tokenizers[name]
    renderer = Renderer(tok, tok.chat_template, MaskingStrategy.LAST_ASSISTANT)
    tag = Tagger(random.Random(7))
    for record in records("plain", 10, seed=8):
        prompt = [m for m in record["messages"] if m["role"] != "system"][:-1]
        chosen, rejected = ({"role": "assistant", "content": tag.text()} for _ in range(2))
        v1 = {"chosen_messages": [v1_message(m, float(m["role"] == "assistant")) for m in prompt + [chosen]],
              "rejected_messages": [v1_message(m, float(m["role"] == "assistant")) for m in prompt + [rejected]]}
        openai = {"chosen": prompt + [chosen], "rejected": prompt + [rejected]}
        pair = to_pair(v1, "auto")
        assert pair == to_pair(openai, "auto")
        [result] = render_pairs(renderer, [pair])
        assert not isinstance(result, RecordError), result
        for conv, side in zip(pair.conversations(), result):
            check_against_reference(name, tok, conv, side, {len(conv.messages) - 1})


def test_fastchat_dummy_data_under_vicuna(fresh_qwen_tokenizer):
    from lmforge.data.templates import resolve_template

    tok = fresh_qwen_tokenizer
    renderer = Renderer(tok, resolve_template(tok, "vicuna_v1.1"))
    convs = [to_conversation(r, DataFormat.SHAREGPT) for r in json.loads(DUMMY_CONVERSATIONS.read_text())]
    results = renderer.render_batch(convs)
    assert len(convs) == 500 and not [r for r in results if isinstance(r, RecordError)]
    assert all(r.num_trained > 0 for r in results)
    assert X not in [results[0].labels[-1]]  # the EOS closing the last answer is trained
