"""Readers and normalisation: every format gives the same Conversation; bad input names the
file and the record."""

from __future__ import annotations

import json

import pytest

from lmforge.data.options import DataFormat, OnBadRecord
from lmforge.data.records import iter_conversations, to_conversation
from lmforge.data.schema import Conversation, Message
from lmforge.data.sources import SkipCounter
from lmforge.errors import DataError

EXPECTED = Conversation((
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "2+2?"),
    Message("assistant", "4"),
))

SHAREGPT = {"id": "a", "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
    {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
]}
OPENAI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
]}
ALPACA = {"system": "Be brief.", "history": [["Hi", "Hello!"]], "instruction": "2+2?", "input": "", "output": "4"}


@pytest.mark.parametrize("record", [SHAREGPT, OPENAI, ALPACA], ids=["sharegpt", "openai", "alpaca"])
def test_every_format_normalises_to_the_same_conversation(record):
    assert to_conversation(record, DataFormat.AUTO) == EXPECTED


def test_alpaca_input_is_joined_to_the_instruction_by_a_newline():
    conv = to_conversation({"instruction": "Translate", "input": "bonjour", "output": "hello"}, DataFormat.AUTO)
    assert conv.messages == (Message("user", "Translate\nbonjour"), Message("assistant", "hello"))


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_file_types_read_the_same_records(tmp_path, suffix):
    records = [OPENAI, OPENAI]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    got = list(iter_conversations(str(path)))
    assert [c for _, c in got] == [EXPECTED, EXPECTED]
    assert got[1][0] == ("line 2" if suffix == ".jsonl" else "record 2")


def error_of(path, fmt=DataFormat.AUTO) -> str:
    with pytest.raises(DataError) as e:
        list(iter_conversations(path, fmt))
    return str(e.value)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = write(tmp_path, "d.jsonl", json.dumps(OPENAI) + "\n{\"messages\": [\n")
    assert error_of(path) == f"{path}, line 2: malformed JSON: Expecting value (column 15)"


def test_malformed_json_is_located(tmp_path):
    path = write(tmp_path, "d.json", '[\n {"messages": []},\n {"messages": ]\n]')
    msg = error_of(path)
    assert msg.startswith(f"{path}, line 3 column 15: malformed JSON")


MALFORMED_LINES = [json.dumps(OPENAI), "{not json", "", json.dumps(OPENAI), '{"messages": [', json.dumps(OPENAI)]


@pytest.mark.parametrize("block", [7, 1 << 20])
def test_malformed_jsonl_lines_are_skipped_and_counted_under_skip(tmp_path, monkeypatch, block):
    from lmforge.data import sources

    monkeypatch.setattr(sources, "READ_BYTES", block)
    path = write(tmp_path, "d.jsonl", "\n".join(MALFORMED_LINES) + "\n")
    skips = SkipCounter.new()
    got = list(iter_conversations(path, DataFormat.AUTO, OnBadRecord.SKIP, skips))
    assert got == [("line 1", EXPECTED), ("line 4", EXPECTED), ("line 6", EXPECTED)]
    assert dict(skips.counts) == {"malformed_json": 2}
    assert skips.examples == {"malformed_json": f"{path}, line 2: malformed JSON: Expecting property name enclosed "
                                                "in double quotes (column 2)"}
    # Under error, the first malformed line stops the read, as it always did.
    assert error_of(path) == f"{path}, line 2: malformed JSON: Expecting property name enclosed in double quotes " \
                             "(column 2)"


def test_malformed_jsonl_lines_of_text_are_skipped_and_counted(tmp_path):
    from lmforge.data.sources import iter_documents

    path = write(tmp_path, "t.jsonl", '{"text": "one"}\n{"text": \n{"text": "two"}\n')
    skips = SkipCounter.new()
    assert list(iter_documents(path, on_bad_record=OnBadRecord.SKIP, skips=skips)) == [("line 1", "one"),
                                                                                       ("line 3", "two")]
    assert dict(skips.counts) == {"malformed_json": 1}
    assert skips.examples["malformed_json"] == f"{path}, line 2: malformed JSON: Expecting value (column 10)"


def test_malformed_jsonl_line_is_counted_in_the_prepared_stats(tmp_path, qwen_tokenizer):
    from lmforge.data.encode import CHAT, prepare
    from lmforge.data.options import ChatOptions

    path = write(tmp_path, "d.jsonl", "\n".join(MALFORMED_LINES) + "\n")
    entry = prepare(CHAT, [path], qwen_tokenizer, ChatOptions(on_bad_record=OnBadRecord.SKIP),
                    qwen_tokenizer.chat_template)
    assert (entry.stats.records, entry.stats.kept, entry.stats.skipped) == (5, 3, {"malformed_json": 2})
    assert entry.stats.skip_examples["malformed_json"] == (
        f"{path}, line 2: malformed JSON: Expecting property name enclosed in double quotes (column 2)")


def test_a_json_syntax_error_stops_the_read_under_skip_too_and_says_why(tmp_path):
    path = write(tmp_path, "d.json", '[\n {"messages": []},\n {"messages": ]\n]')
    with pytest.raises(DataError) as e:
        list(iter_conversations(path, DataFormat.AUTO, OnBadRecord.SKIP, SkipCounter.new()))
    assert str(e.value) == (
        f"{path}, line 3 column 15: malformed JSON: Expecting value; --on_bad_record skip skips bad records, not "
        "this: a .json file is one JSON list, which cannot be read past a syntax error. Fix the file, or write it as "
        "JSONL, where a malformed line is skipped")
    assert error_of(path) == f"{path}, line 3 column 15: malformed JSON: Expecting value"


def test_unknown_role(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}
    path = write(tmp_path, "d.json", json.dumps([SHAREGPT, bad]))
    assert error_of(path) == f"{path}, record 2: conversations[1] has unknown role 'robot'; known roles: " \
        "['assistant', 'bard', 'bing', 'chatgpt', 'function_call', 'gpt', 'human', 'observation', 'system', 'tool', 'user']"


def test_empty_turn(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}
    path = write(tmp_path, "d.json", json.dumps([bad]))
    assert error_of(path) == f"{path}, record 1: turn 1 (assistant) is empty"


def test_conversation_without_assistant_turn(tmp_path):
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    path = write(tmp_path, "d.jsonl", json.dumps(bad))
    assert error_of(path) == f"{path}, line 1: the conversation has no assistant turn to train on"


def test_roles_out_of_order(tmp_path):
    # The order of user and assistant turns is the template's business; a tool result that
    # answers no call is wrong in any template.
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "a"}]}
    path = write(tmp_path, "d.json", json.dumps([bad]))
    assert error_of(path) == f"{path}, record 1: turn 1 is a tool result that follows no assistant tool call"


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0] has no 'content'"),
    ({"messages": [{"content": "q"}]}, "messages[0] has no 'role'"),
    ({"instruction": "q"}, "field 'output' is missing"),
    ({"conversations": "hello"}, "field 'conversations' must be a list of turns, got str"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "messages[0].content must be a string or a list of content parts, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]},
                   {"role": "assistant", "content": "a"}]},
     "messages[0].content[0] is a 'image_url' part; lmforge trains text models and reads 'text', 'reasoning' "
     "and 'tool_call' parts only"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "messages[1].weight is 0.5: a message is trained fully (1) or not at all (0)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
     "conversations[1].value is a string that is not JSON (Expecting value at column 1)"),
])
def test_missing_fields_and_wrong_types(tmp_path, record, reason):
    path = write(tmp_path, "d.json", json.dumps([record]))
    assert error_of(path) == f"{path}, record 1: {reason}"


def test_unrecognised_format_names_the_keys(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([{"prompt": "q", "completion": "a"}]))
    assert "record 1: cannot tell the format from the keys ['completion', 'prompt']" in error_of(path)


def test_file_problems(tmp_path):
    missing = str(tmp_path / "nope.json")
    assert error_of(missing) == f"{missing}: file does not exist"
    empty = write(tmp_path, "e.jsonl", "")
    assert error_of(empty) == f"{empty}: file is empty"
    latin = write(tmp_path, "l.jsonl", b'{"messages": "caf\xe9"}\n')
    assert error_of(latin).startswith(f"{latin}, line 1: not valid UTF-8 (byte 17")
    txt = write(tmp_path, "d.txt", "hello")
    assert error_of(txt) == f"{txt}: unsupported file type '.txt'; use one of ('.json', '.jsonl', '.parquet')"


def test_skip_counts_bad_records_by_reason(tmp_path):
    records = [OPENAI, {"messages": [{"role": "user", "content": "q"}]}, {"messages": [{"role": "bot", "content": "q"}]},
               OPENAI, {"messages": [{"role": "user", "content": "q"}]}]
    path = write(tmp_path, "d.json", json.dumps(records))
    skips = SkipCounter.new()
    got = list(iter_conversations(path, DataFormat.AUTO, OnBadRecord.SKIP, skips))
    assert [loc for loc, _ in got] == ["record 1", "record 4"]
    assert dict(skips.counts) == {"no_assistant_turn": 2, "unknown_role": 1}
    assert skips.examples["unknown_role"].startswith(f"{path}, record 3: messages[0] has unknown role 'bot'")


def test_forced_format_reports_missing_key(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([OPENAI]))
    assert error_of(path, DataFormat.SHAREGPT) == \
        f"{path}, record 1: field 'conversations' is missing (keys: ['messages'])"


# JSON and JSONL are read as a stream (bounded memory); the whole-file readers stay the
# reference for the records and for every error.
STREAM_RECORDS = [SHAREGPT, OPENAI, ALPACA,
                  {"conversations": [{"from": "human", "value": "é€😀\u2028 \\\" x [1, 2] {}"}, {"from": "gpt", "value": "ok"}]}]


def stream_files(tmp_path) -> list[str]:
    return [
        write(tmp_path, "d.json", json.dumps(STREAM_RECORDS, ensure_ascii=False, indent=1)),
        write(tmp_path, "compact.json", json.dumps(STREAM_RECORDS)),
        write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps(STREAM_RECORDS, ensure_ascii=False).encode()),
        write(tmp_path, "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in STREAM_RECORDS) + "\n\n"),
        write(tmp_path, "crlf.jsonl", "\r\n".join(json.dumps(r) for r in STREAM_RECORDS)),
    ]


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
def test_json_and_jsonl_stream_the_same_records(tmp_path, monkeypatch, block):
    from lmforge.data import sources as formats

    monkeypatch.setattr(formats, "READ_BYTES", block)  # records cut by block ends everywhere
    for path in stream_files(tmp_path):
        jsonl = path.endswith(".jsonl")
        whole = list((formats._read_jsonl_whole if jsonl else formats._read_json_whole)(path))
        assert list((formats._stream_jsonl if jsonl else formats._stream_json_list)(path)) == whole, path
        assert list(formats.read_records(path)) == whole, path


def test_well_formed_files_are_never_read_whole(tmp_path, monkeypatch):
    from lmforge.data import sources as formats

    def whole(path):
        raise AssertionError("read whole")

    monkeypatch.setattr(formats, "_read_text", whole)
    for path in stream_files(tmp_path):
        assert len(list(formats.read_records(path))) == len(STREAM_RECORDS)


def test_object_holding_the_list_is_still_read(tmp_path):
    path = write(tmp_path, "d.json", json.dumps({"data": [OPENAI, OPENAI]}))
    assert [c for _, c in iter_conversations(path)] == [EXPECTED, EXPECTED]


def test_errors_come_before_records_as_when_read_whole(tmp_path):
    # A bad record first, malformed JSON later: the syntax error is reported (the file is
    # checked as a whole before any record), as the whole-file reader did.
    path = write(tmp_path, "d.json", json.dumps([{"messages": []}, OPENAI])[:-1] + ", oops]")
    assert "malformed JSON" in error_of(path)
    # The same for an encoding error after good and bad JSONL lines.
    path = write(tmp_path, "d.jsonl", (json.dumps({"messages": []}) + "\n").encode() + b'{"messages": "caf\xe9"}\n')
    assert "line 2: not valid UTF-8" in error_of(path)
