"""Records as people have them: content parts, reasoning, tool calls and results, tools, loss
flags, LLaMA-Factory's ShareGPT tool format; each read into the one Conversation type, and
rendered with nothing the record carries lost."""

from __future__ import annotations

import json

import pytest

from chat_reference import labelled_runs
from lmforge.data.options import DataFormat
from lmforge.data.records import to_conversation
from lmforge.data.render import MaskingStrategy, Renderer
from lmforge.data.schema import Conversation, Message
from lmforge.errors import RecordError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_content_parts_are_joined_text():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "2+2?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}
    assert to_conversation(record, DataFormat.AUTO) == Conversation((Message("user", "Look:\n2+2?"), Message("assistant", "4")))


def test_llama_factory_v1_parts_and_loss_weights():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Who are you?"}], "loss_weight": 0.0},
                           {"role": "assistant", "content": [{"type": "reasoning", "value": "Be honest."},
                                                             {"type": "text", "value": "An assistant."}],
                            "loss_weight": 1.0}]}
    assert to_conversation(record, DataFormat.AUTO) == Conversation((
        Message("user", "Who are you?", train=False),
        Message("assistant", "An assistant.", reasoning="Be honest.", train=True)))


def test_empty_system_message_is_kept_where_written_and_means_none_in_a_column():
    plain = (Message("user", "q"), Message("assistant", "a"))
    for empty in ("", "   ", "\n"):
        record = {"messages": [{"role": "system", "content": empty}, {"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}]}
        assert to_conversation(record, DataFormat.AUTO) == Conversation((Message("system", empty),) + plain)
        sharegpt = {"conversations": [{"from": "system", "value": empty}, {"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a"}], "system": empty}
        assert to_conversation(sharegpt, DataFormat.AUTO) == Conversation(plain)
        alpaca = {"instruction": "q", "output": "a", "system": empty}
        assert to_conversation(alpaca, DataFormat.AUTO) == Conversation(plain)


def test_openai_tool_calls_and_results():
    record = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."}], "tools": [WEATHER]}
    conv = to_conversation(record, DataFormat.AUTO)
    assert conv.tools == (WEATHER,)
    assert conv.messages[1] == Message("assistant", "", tool_calls=({**CALL, "id": "call_1"},))
    assert conv.messages[2] == Message("tool", '{"temp": 21}', tool_call_id="call_1")
    # A call-only turn has no content key (apply_chat_template drops OpenAI's null); arguments are
    # a mapping, as most templates expect.
    assert conv.as_dicts()[1] == {"role": "assistant", "tool_calls": [{**CALL, "id": "call_1"}]}


def test_sharegpt_function_call_and_observation():
    """LLaMA-Factory's glaive format: `function_call` / `observation` turns, tools as a JSON
    string, the system prompt in a column of its own."""
    record = {"system": "You can call tools.", "tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees."}]}
    conv = to_conversation(record, DataFormat.AUTO)
    assert conv == Conversation((Message("system", "You can call tools."), Message("user", "Weather in Paris?"),
                                 Message("assistant", "", tool_calls=(CALL,)), Message("tool", '{"temp": 21}'),
                                 Message("assistant", "21 degrees.")), (WEATHER,))


def tool_conversation() -> Conversation:
    return to_conversation({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."}], "tools": [WEATHER]}, DataFormat.AUTO)


def test_tools_calls_and_results_render_as_apply_chat_template(qwen_tokenizer):
    """Nothing the record carries is lost: the tools list is rendered (the template's tool
    system prompt), the call is trained with the text before it, the result is not trained."""
    tok = qwen_tokenizer
    conv = tool_conversation()
    out = Renderer(tok, tok.chat_template)(conv)
    assert out.input_ids == tok.apply_chat_template(conv.as_dicts(), tools=conv.tool_list)["input_ids"]
    assert len(out.input_ids) > len(tok.apply_chat_template(conv.as_dicts())["input_ids"]) + 50  # the tool schema
    runs = [tok.decode(r) for r in labelled_runs(out.labels)]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert runs == [f"Let me check.\n{call}<|im_end|>", "21 degrees.<|im_end|>"]
    assert "temp" not in "".join(runs)
    # Under --masking all as well, the tool result carries no loss: all of it but its last
    # token, "}\n", which reaches into the template's text after it (the boundary rule).
    every = Renderer(tok, tok.chat_template, MaskingStrategy.ALL)(conv)
    assert [tok.decode(r) for r in labelled_runs([t if label == -100 else -100 for t, label in
                                                  zip(every.input_ids, every.labels)])] == ['{"temp": 21']


def test_reasoning_a_template_cannot_render_is_an_error(qwen_tokenizer):
    conv = to_conversation({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "reasoning_content": "think"}]},
                           DataFormat.AUTO)
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)(conv)
    assert e.value.kind == "unrendered_reasoning"
    assert e.value.reason == ("the chat template does not render the reasoning of turn 1 (assistant); it renders no "
                              "reasoning at all; pass --reasoning_turns generated to train it as the model generates "
                              "it, or --unrendered drop to train without it")


def test_tools_a_template_cannot_render_are_an_error(qwen_tokenizer):
    plain = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') + '<|im_end|>\n' }}{% endfor %}"
    conv = Conversation((Message("user", "q"), Message("assistant", "a")), (WEATHER,))
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, plain)(conv)
    assert (e.value.kind, e.value.reason) == ("unrendered_tools", "the chat template does not render the record's "
                                              "tools; pass --unrendered drop to train without it")
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, plain)(Conversation(tool_conversation().messages))
    assert e.value.kind == "template_error" and "does not render the tool calls of turn 1" in e.value.reason


def test_llama_factory_dataset_info_columns_and_tags(tmp_path):
    """A data file described in a dataset_info.json beside it is read with its column names and
    role tags (LLaMA-Factory's way of naming them)."""
    from lmforge.data.records import iter_conversations

    (tmp_path / "chat.json").write_text(json.dumps([{"dialog": [
        {"speaker": "person", "text": "Weather?"},
        {"speaker": "bot_call", "text": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"speaker": "result", "text": '{"temp": 21}'},
        {"speaker": "bot", "text": "21 degrees.", "train": False}], "prompt_sys": "Be brief.", "fns": "[]"}]))
    (tmp_path / "qa.json").write_text(json.dumps([{"q": "2+2?", "ctx": "Add.", "a": "4"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "system": "prompt_sys", "tools": "fns"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot",
                          "observation_tag": "result", "function_tag": "bot_call"}},
        "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "query": "ctx", "response": "a"}}}))
    [(_, chat)] = list(iter_conversations(str(tmp_path / "chat.json")))
    assert chat == Conversation((Message("system", "Be brief."), Message("user", "Weather?"),
                                 Message("assistant", "", tool_calls=(CALL,)), Message("tool", '{"temp": 21}'),
                                 Message("assistant", "21 degrees.", train=False)), ())
    [(_, qa)] = list(iter_conversations(str(tmp_path / "qa.json")))
    assert qa == Conversation((Message("user", "2+2?\nAdd."), Message("assistant", "4")))


def test_tools_file_is_offered_to_records_without_tools(tmp_path, qwen_tokenizer):
    from lmforge.data.encode import CHAT, prepare
    from lmforge.data.options import ChatOptions as PrepareOptions
    from lmforge.data.sources import read_tools

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    data = tmp_path / "d.jsonl"
    plain = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]}
    own = {**plain, "tools": []}
    data.write_text("\n".join(json.dumps(r) for r in (plain, own)))
    ds = prepare(CHAT, [str(data)], qwen_tokenizer, PrepareOptions(tools=read_tools(str(tools))),
                 qwen_tokenizer.chat_template, cache_dir=str(tmp_path / "c")).dataset()
    with_tools = Conversation(to_conversation(plain, DataFormat.AUTO).messages, (WEATHER,))
    assert ds[0]["input_ids"] == qwen_tokenizer.apply_chat_template(with_tools.as_dicts(), tools=[WEATHER])["input_ids"]
    # A record's own empty list: no tools, the file's not offered, none reach the template.
    assert ds[1]["input_ids"] == qwen_tokenizer.apply_chat_template(with_tools.as_dicts())["input_ids"]
    tools.write_text('{"name": "x"}')
    with pytest.raises(Exception, match=r"tools.json: --tools: the file must be a list of tool schemas"):
        read_tools(str(tools))


def test_prepare_counts_split_samples_and_dropped_parts(tmp_path, qwen_tokenizer):
    from lmforge.data.render import Unrendered
    from lmforge.data.encode import CHAT, prepare
    from lmforge.data.options import ChatOptions as PrepareOptions
    from lmforge.data.options import ReasoningTurns

    three = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b", "reasoning_content": "Think it over."},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                          {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(three))
    options = PrepareOptions(unrendered=Unrendered.DROP, reasoning_turns=ReasoningTurns.SPLIT)
    cache = prepare(CHAT, [str(data)], qwen_tokenizer, options, qwen_tokenizer.chat_template,
                    cache_dir=str(tmp_path / "c"))
    # Counted once per record, though two of its samples hold the turn whose reasoning was left out.
    assert (cache.stats.kept, cache.stats.samples, cache.stats.dropped) == (1, 3, {"reasoning": 1})
    rows = cache.dataset()
    assert [qwen_tokenizer.decode([t for t in row["labels"] if t != -100]) for row in rows] == [
        "b<|im_end|>", "d<|im_end|>", "f<|im_end|>"]
    assert "samples: 3 (one per assistant turn)" in cache.stats.summary()
    assert "left out (--unrendered drop): reasoning: 1" in cache.stats.summary()
    with pytest.raises(Exception, match="does not render the reasoning of turn 2"):
        prepare(CHAT, [str(data)], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template,
                cache_dir=str(tmp_path / "d"))


def test_a_dropped_system_message_is_found_even_when_its_text_occurs_elsewhere(qwen_tokenizer):
    # A template that writes no system message, and a short system text the user also wrote.
    no_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                 "m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")
    conv = to_conversation({"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Be brief. What is 2+2?"},
                                         {"role": "assistant", "content": "4"}]}, DataFormat.AUTO)
    with pytest.raises(RecordError) as e:
        Renderer(qwen_tokenizer, no_system)(conv)
    assert e.value.kind == "unrendered_system"
