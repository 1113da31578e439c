"""What the data chain and the run file say to the user: where a record is (numbered as the
user counts: a JSONL file's own line, a 1-based record of a JSON list or Parquet file), what
a top-level JSON object is read as, a null field called null, a run file's errors naming the
file, and a progress line that is true for pretraining text."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.config import yaml_to_argv
from lmforge.data import encode
from lmforge.data.encode import TEXT, PrepareProgress, prepare
from lmforge.data.options import DataFormat, OnBadRecord, TextOptions, TextSplit
from lmforge.data.records import iter_conversations, iter_pairs
from lmforge.data.schema import Conversation, Message
from lmforge.data.sources import SkipCounter, iter_documents, read_records
from lmforge.errors import DataError, LmforgeError

TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
OPENAI = {"messages": TURNS}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
EXPECTED = Conversation((Message("user", "Hi"), Message("assistant", "Hello!")))
NO_ANSWER = {"messages": [{"role": "user", "content": "q"}]}


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def error_of(call) -> str:
    with pytest.raises(DataError) as e:
        call()
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# 1, 2: a JSON object at the top of a .json file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [SHAREGPT, OPENAI, {"id": "a", **OPENAI}], ids=["sharegpt", "openai", "with-id"])
def test_a_json_file_holding_one_conversation_is_one_record(tmp_path, record):
    path = write(tmp_path, "one.json", record)
    assert list(iter_conversations(path)) == [("record 1", EXPECTED)]


def test_a_json_file_holding_one_preference_pair_is_one_record(tmp_path):
    path = write(tmp_path, "pair.json", {"prompt": "Q?", "chosen": "A.", "rejected": "B."})
    assert [location for location, _ in iter_pairs(path)] == ["record 1"]


def test_a_json_file_holding_one_document_is_one_record(tmp_path):
    path = write(tmp_path, "doc.json", {"text": "one document", "url": "x"})
    assert list(iter_documents(path)) == [("record 1", "one document")]


def test_one_conversation_under_an_unknown_key_is_read_as_one_record(tmp_path):
    # Its list holds turns, not records: read as one record, whose keys then say what is wrong.
    path = write(tmp_path, "one.json", {"dialog": TURNS})
    assert error_of(lambda: list(iter_conversations(path))) == (
        f"{path}, record 1: cannot tell the format from the keys ['dialog']: expected 'conversations' (ShareGPT), "
        "'messages' (OpenAI) or 'instruction'/'output' (Alpaca); or pass --data_format")


@pytest.mark.parametrize("content", [{"version": "1.1", "data": [OPENAI, OPENAI]}, {"data": ["a", "b"]},
                                     {"data": {"x": OPENAI}}, {}])
def test_an_object_that_is_neither_a_record_nor_one_list_is_refused(tmp_path, content):
    path = write(tmp_path, "d.json", content)
    message = error_of(lambda: list(read_records(path)))
    assert message.startswith(f"{path}: the file holds one JSON object (keys: {sorted(content)}), not a list of "
                              "records"), message


def test_an_object_whose_only_key_holds_the_list_is_read_and_said_once(tmp_path, capsys):
    path = write(tmp_path, "d.json", {"data": [OPENAI, NO_ANSWER, OPENAI]})
    skips = SkipCounter.new()
    got = list(iter_conversations(path, DataFormat.AUTO, OnBadRecord.SKIP, skips))
    assert got == [("record 1", EXPECTED), ("record 3", EXPECTED)]
    assert skips.examples["no_assistant_turn"].startswith(f"{path}, record 2: ")
    assert capsys.readouterr().out.splitlines() == [f'lmforge: {path}: records read from its "data" list']


# ---------------------------------------------------------------------------------------------
# 3: locations as the user counts them
# ---------------------------------------------------------------------------------------------


def test_json_records_are_numbered_from_one(tmp_path):
    path = write(tmp_path, "d.json", [OPENAI, NO_ANSWER])
    assert error_of(lambda: list(iter_conversations(path))).startswith(f"{path}, record 2: ")
    assert [location for location, _ in read_records(path)] == ["record 1", "record 2"]
    first_bad = write(tmp_path, "first.json", [NO_ANSWER])
    assert error_of(lambda: list(iter_conversations(first_bad))).startswith(f"{first_bad}, record 1: ")


def test_jsonl_records_are_named_by_their_line_in_the_file(tmp_path):
    path = write(tmp_path, "d.jsonl", json.dumps(OPENAI) + "\n\n" + json.dumps(NO_ANSWER) + "\n")
    assert [location for location, _ in read_records(path)] == ["line 1", "line 3"]
    assert error_of(lambda: list(iter_conversations(path))).startswith(f"{path}, line 3: ")


def test_parquet_rows_are_numbered_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), path)
    assert [location for location, _ in read_records(path)] == ["record 1", "record 2"]
    assert error_of(lambda: list(iter_documents(path))).startswith(f"{path}, record 2: ")


def test_text_documents_are_numbered_from_one(tmp_path):
    path = write(tmp_path, "d.txt", "one\n\ntwo\n")
    assert list(iter_documents(path, split=TextSplit.BLANK_LINE)) == [("document 1", "one"), ("document 2", "two")]


# ---------------------------------------------------------------------------------------------
# 4: null is null, not missing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "messages[1].content is null (only an assistant turn that calls tools may have no content)"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
     "conversations[0].value is null (only an assistant turn that calls tools may have no content)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": None}]},
     "conversations[1].value is null"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}, TURNS[1]]},
     "messages[0].content[0] text is null"),
    ({"instruction": "q", "output": None}, "field 'output' is null"),
    ({"instruction": None, "output": "a"}, "field 'instruction' is null"),
])
def test_a_null_field_is_called_null(tmp_path, record, reason):
    path = write(tmp_path, "d.json", [record])
    assert error_of(lambda: list(iter_conversations(path))) == f"{path}, record 1: {reason}"


def test_a_missing_field_is_still_called_missing(tmp_path):
    path = write(tmp_path, "d.json", [{"instruction": "q"}])
    assert error_of(lambda: list(iter_conversations(path))) == f"{path}, record 1: field 'output' is missing"
    path = write(tmp_path, "e.json", [{"messages": [{"role": "user"}, TURNS[1]]}])
    assert error_of(lambda: list(iter_conversations(path))) == f"{path}, record 1: messages[0] has no 'content'"


def test_null_text_and_null_answers_are_called_null(tmp_path):
    text = write(tmp_path, "t.jsonl", json.dumps({"text": None}) + "\n")
    assert error_of(lambda: list(iter_documents(text))) == f"{text}, line 1: field 'text' is null"
    pair = write(tmp_path, "p.jsonl", json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": None}) + "\n")
    assert error_of(lambda: list(iter_pairs(pair))) == f"{pair}, line 1: field 'rejected' is null"


# ---------------------------------------------------------------------------------------------
# 5: run-file errors name the file (and the key)
# ---------------------------------------------------------------------------------------------


def run_file_error(tmp_path, content: str | bytes) -> tuple[str, str]:
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LmforgeError) as e:
        yaml_to_argv(str(path))
    return str(path), str(e.value)


@pytest.mark.parametrize("content, says", [
    ("data_path: a.json\nmodel_max_length:\n", "'model_max_length' is null (no value)"),
    ("data_path: ~\n", "'data_path' is null (no value)"),
    ("data_path:\n  file: a.json\n", "'data_path' is a mapping"),
    ("data_path: [a.json, {file: b.json}]\n", "'data_path' is a list holding a mapping"),
    ("data_path: []\n", "'data_path' is an empty list"),
    ("1: a.json\n", "the key 1 is not a flag name"),
    ("data_path: [a.json\n", "not valid YAML"),
    ("- data_path\n", "a run file must map flag names to values"),
    (b"data_path: caf\xe9.json\n", ": not valid UTF-8 (byte 14: invalid continuation byte)"),
    ("data_path: a\x07.json\n", ", character 12: not valid YAML: special characters are not allowed"),
])
def test_run_file_errors_name_the_file(tmp_path, content, says):
    path, message = run_file_error(tmp_path, content)
    assert message.startswith(f"{path}") and says in message, message
    assert "\n" not in message


def test_run_file_that_is_a_directory(tmp_path):
    with pytest.raises(LmforgeError, match=re.escape(f"{tmp_path}: is a directory, not a run file")):
        yaml_to_argv(str(tmp_path))


def test_run_file_mapping_for_a_dict_flag_is_still_passed_as_json(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fsdp_config:\n  min_num_params: 100\nlearning_rate: 1.0e-5\nreport_to: [none]\nbf16: true\n")
    assert yaml_to_argv(str(path)) == ["--fsdp_config", '{"min_num_params": 100}', "--learning_rate", "1e-05",
                                       "--report_to", "none", "--bf16", "True"]


# ---------------------------------------------------------------------------------------------
# 6: the progress line for pretraining text
# ---------------------------------------------------------------------------------------------


def test_progress_line_shows_a_rate_that_is_not_rounded_to_zero(monkeypatch):
    now = [0.0]
    lines: list[str] = []
    monkeypatch.setattr(encode, "say", lines.append)  # what the progress says
    progress = PrepareProgress("tokenizing", every=10, clock=lambda: now[0], unit="document")
    now[0] = 3.0
    progress.update(1, 5000)
    progress.done()
    assert lines == ["lmforge: tokenizing: done, 1 document, 5,000 tokens in 3.0 s (0.333 documents/s, "
                     "1,667 tokens/s)"]


def test_progress_line_under_a_second_has_no_rate(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(encode, "say", lines.append)  # what the progress says
    progress = PrepareProgress("tokenizing", clock=lambda: 0.0, unit="document")
    progress.update(2, 40)
    progress.done()
    assert lines == ["lmforge: tokenizing: done, 2 documents, 40 tokens in 0.0 s"]


def test_a_text_file_reports_documents_and_tokens(tmp_path, qwen_tokenizer, capsys):
    path = write(tmp_path, "corpus.txt", "the quick brown fox jumps over the lazy dog\n" * 20)
    entry = prepare(TEXT, [path], qwen_tokenizer, TextOptions(block_size=16))
    out = capsys.readouterr().out
    done = [line for line in out.splitlines() if line.startswith("lmforge: tokenizing: done")]
    assert done and done[0].startswith(f"lmforge: tokenizing: done, 1 document, {entry.stats.tokens:,} tokens in "), out
    assert "records" not in done[0] and "(0 " not in done[0], done[0]
