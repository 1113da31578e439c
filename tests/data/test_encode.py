"""The token cache and `lmforge prepare`: built once, reused, keyed by content and options;
length policy counted; --dump writes aligned JSONL in source order."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.cli import main as cli
from lmforge.data import encode
from lmforge.data.encode import CHAT, PAIRS, PairKind, prepare
from lmforge.data.options import ChatOptions as PrepareOptions
from lmforge.data.options import LongRecords, OnBadRecord
from lmforge.data.render import Renderer
from lmforge.data.templates import BUILTIN_TEMPLATES
from lmforge.errors import DataError, LmforgeError

from conftest import DUMMY_CONVERSATIONS, QWEN_TOKENIZER


def records(n: int, answer_words: int = 1) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": " ".join(["answer"] * answer_words) + f" {i}"}]}
            for i in range(n)]


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_cache_is_reused_and_keyed_by_content(tmp_path, qwen_tokenizer, monkeypatch):
    data = write_json(tmp_path / "d.json", records(5))
    template = qwen_tokenizer.chat_template
    first = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), template)
    assert first.stats.kept == 5 and len(first.dataset()) == 5

    # Same inputs: found in the cache, nothing is rendered again.
    def no_render(*a, **k):
        raise AssertionError("rendered again")

    monkeypatch.setattr(encode, "ordered_map", no_render)
    again = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), template)
    assert again.path == first.path and again.stats == first.stats
    monkeypatch.undo()

    # Changed content, options or template: a new entry.
    write_json(tmp_path / "d.json", records(6))
    changed = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), template)
    assert changed.path != first.path and changed.stats.kept == 6
    shorter = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(model_max_length=64), template)
    assert shorter.path != changed.path
    other_template = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), BUILTIN_TEMPLATES["chatml"])
    assert other_template.path != changed.path
    # No temporary directories are left behind.
    assert not [d for d in os.listdir(os.path.dirname(first.path)) if d.startswith(".tmp")]


def test_cached_rows_equal_the_renderer(tmp_path, qwen_tokenizer):
    data = write_json(tmp_path / "d.json", records(4))
    entry = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template)
    from lmforge.data.records import iter_conversations

    renderer = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)
    expected = [renderer(c) for _, c in iter_conversations(data)]
    got = entry.dataset()
    assert [r["input_ids"] for r in got] == [e.input_ids for e in expected]
    assert [r["labels"] for r in got] == [e.labels for e in expected]
    assert entry.stats.tokens == sum(len(e.input_ids) for e in expected)
    assert entry.stats.trained_tokens == sum(e.num_trained for e in expected)


def test_worker_processes_give_the_same_cache(tmp_path, qwen_tokenizer):
    single = prepare(CHAT, [str(DUMMY_CONVERSATIONS)], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template,
                     cache_dir=str(tmp_path / "a"))
    multi = prepare(CHAT, [str(DUMMY_CONVERSATIONS)], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template,
                    cache_dir=str(tmp_path / "b"), num_workers=2)
    assert single.dataset()["input_ids"] == multi.dataset()["input_ids"]
    assert single.dataset()["labels"] == multi.dataset()["labels"]
    assert single.stats == multi.stats


def test_long_records_truncated_or_dropped_and_counted(tmp_path, qwen_tokenizer):
    long_question = {"messages": [{"role": "user", "content": "why " * 200},
                                  {"role": "assistant", "content": "because"}]}
    data = records(3) + records(2, answer_words=200) + [long_question]
    path = write_json(tmp_path / "d.json", data)
    t = qwen_tokenizer.chat_template
    cut = prepare(CHAT, [path], qwen_tokenizer, PrepareOptions(model_max_length=64), t)
    assert (cut.stats.records, cut.stats.kept, cut.stats.truncated) == (6, 5, 2)
    assert max(len(r) for r in cut.dataset()["input_ids"]) == 64
    # Truncation that leaves no answer token is a counted skip, not a record with no loss.
    assert cut.stats.skipped == {"no_trained_tokens_after_truncation": 1}
    assert "d.json, record 6:" in cut.stats.skip_examples["no_trained_tokens_after_truncation"]
    drop = PrepareOptions(model_max_length=64, long_records=LongRecords.DROP)
    dropped = prepare(CHAT, [path], qwen_tokenizer, drop, t)
    assert (dropped.stats.records, dropped.stats.kept, dropped.stats.skipped) == (6, 3, {"too_long": 3})


def test_long_preference_pairs_are_cut_not_dropped(tmp_path, qwen_tokenizer):
    """A pair longer than model_max_length keeps the end of its prompt (both sides the same
    tokens; at least half the window) and its answers whole where they fit after it, else cut at
    their end; counted. `--long_records drop` drops it, counted."""
    from lmforge.data.encode import answer_start, render_pairs
    from lmforge.data.records import to_pair

    def pair(prompt_words: int, answer_words: int, i: int) -> dict:
        return {"prompt": " ".join(f"p{k}" for k in range(prompt_words)),
                "chosen": " ".join(f"c{k}" for k in range(answer_words)) + f" {i}",
                "rejected": " ".join(f"r{k}" for k in range(answer_words)) + f" {i}"}

    data = [pair(3, 3, 0), pair(200, 10, 1), pair(3, 200, 2), pair(200, 200, 3)]
    path = write_json(tmp_path / "pairs.json", data)
    t, limit = qwen_tokenizer.chat_template, 128
    cached = prepare(PAIRS, [path], qwen_tokenizer, PairKind.fixed(PrepareOptions(model_max_length=limit)), t)
    assert (cached.stats.records, cached.stats.kept, cached.stats.skipped) == (4, 4, {})
    assert (cached.stats.truncated, cached.stats.prompts_cut, cached.stats.answers_cut) == (3, 2, 2)
    renderer = Renderer(qwen_tokenizer, t, "last_assistant")
    whole = render_pairs(renderer, [to_pair(r, "auto") for r in data])
    for row, sides in zip(cached.dataset(), whole):
        prompt = min(answer_start(s) for s in sides)
        longest = max(len(s.input_ids) for s in sides)
        keep = prompt if longest <= limit else max(limit - (longest - prompt), min(prompt, limit // 2))
        for side, name in zip(sides, ("chosen", "rejected")):
            drop = prompt - keep
            assert row[f"{name}_input_ids"] == side.input_ids[drop:drop + limit]
            assert row[f"{name}_labels"] == side.labels[drop:drop + limit]
        assert row["chosen_input_ids"][:keep] == row["rejected_input_ids"][:keep]
    rows = cached.dataset()
    for name, side in zip(("chosen", "rejected"), whole[1]):  # a long prompt: the answers are whole
        assert rows[1][f"{name}_labels"] == side.labels[len(side.labels) - len(rows[1][f"{name}_labels"]):]
    assert len(rows[3]["chosen_input_ids"]) == limit and rows[3]["chosen_labels"][: limit // 2] == [-100] * (limit // 2)
    dropped = prepare(PAIRS, [path], qwen_tokenizer,
                      PairKind.fixed(PrepareOptions(model_max_length=limit, long_records=LongRecords.DROP)), t)
    assert (dropped.stats.kept, dropped.stats.skipped) == (1, {"too_long": 3})
    assert "pairs cut to model_max_length: 2 prompts at their start, 2 with answers cut at their end" \
        in cached.stats.summary()


def test_bad_record_error_or_skip(tmp_path, qwen_tokenizer):
    data = records(2) + [{"messages": [{"role": "user", "content": "only a question"}]}]
    path = write_json(tmp_path / "d.json", data)
    with pytest.raises(DataError, match=r"d.json, record 3: the conversation has no assistant turn"):
        prepare(CHAT, [path], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template)
    skipped = prepare(CHAT, [path], qwen_tokenizer, PrepareOptions(on_bad_record=OnBadRecord.SKIP),
                      qwen_tokenizer.chat_template)
    assert (skipped.stats.records, skipped.stats.kept, skipped.stats.skipped) == (3, 2, {"no_assistant_turn": 1})


def test_nothing_usable_is_an_error(tmp_path, qwen_tokenizer):
    path = write_json(tmp_path / "d.json", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(LmforgeError, match="no usable record"):
        prepare(CHAT, [path], qwen_tokenizer, PrepareOptions(on_bad_record=OnBadRecord.SKIP),
                qwen_tokenizer.chat_template)


def test_prepare_command_counts_and_dumps(tmp_path, capsys):
    dump = tmp_path / "first.jsonl"
    code = cli(["prepare", "--data_path", str(DUMMY_CONVERSATIONS), "--tokenizer_name", str(QWEN_TOKENIZER),
                "--template", "chatml", "--output_dir", str(tmp_path / "out"), "--dump", str(dump), "--dump_n", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "records: 500  kept: 500  truncated: 0" in out
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    source = json.loads(DUMMY_CONVERSATIONS.read_text())
    for row, record in zip(rows, source):
        assert len(row["input_ids"]) == len(row["labels"])
        # Source order: the first dumped record is the first conversation of the file.
        assert record["conversations"][0]["value"] in tok.decode(row["input_ids"])
        first_answer = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
        assert tok.decode(first_answer).startswith(record["conversations"][1]["value"])


def test_prepare_command_reports_bad_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code = cli(["prepare", "--data_path", str(missing), "--tokenizer_name", str(QWEN_TOKENIZER)])
    assert code == 2
    assert f"lmforge prepare: error: {missing}: file does not exist" in capsys.readouterr().err


def test_several_files_in_order_with_mixed_formats(tmp_path, qwen_tokenizer):
    first = write_json(tmp_path / "a.json", records(2))
    second = tmp_path / "b.jsonl"
    second.write_text("\n".join(json.dumps({"instruction": f"alpaca {i}", "output": f"out {i}"}) for i in range(3)))
    entry = prepare(CHAT, [first, str(second)], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template)
    assert (entry.stats.records, entry.stats.kept) == (5, 5)
    texts = [qwen_tokenizer.decode(ids) for ids in entry.dataset()["input_ids"]]
    assert ["question 0" in texts[0], "question 1" in texts[1]] == [True, True]
    assert all(f"alpaca {i}" in texts[2 + i] for i in range(3))


def _double(chunk: list[int]) -> list[int]:
    return [2 * x for x in chunk]


def _no_setup() -> None:
    pass


def test_workers_read_at_most_two_chunks_ahead_each():
    # Bounded memory with workers: the input is read as results are taken, not all at once
    # (multiprocessing's imap would queue every chunk of the data).
    from lmforge.data.encode import ordered_map

    pulled = []

    def chunks():
        for i in range(10_000):
            pulled.append(i)
            yield [i]

    results = ordered_map(_double, chunks(), 2, _no_setup, ())
    assert [next(results) for _ in range(3)] == [[0], [2], [4]]
    assert len(pulled) <= 2 * 2 + 3
    results.close()


def test_bad_records_are_counted_or_raised_the_same_with_workers(tmp_path, qwen_tokenizer):
    # Records are checked and rendered in the workers; their errors come back pickled and
    # get the same policy, wording and order as in one process.
    bad_roles = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"},
                              {"role": "assistant", "content": "a"}]}
    data = write_json(tmp_path / "d.json", records(3) + [bad_roles] + records(2, answer_words=400))
    template = qwen_tokenizer.chat_template
    skip = PrepareOptions(on_bad_record=OnBadRecord.SKIP, long_records=LongRecords.DROP, model_max_length=256)
    one = prepare(CHAT, [data], qwen_tokenizer, skip, template, cache_dir=str(tmp_path / "a"))
    two = prepare(CHAT, [data], qwen_tokenizer, skip, template, cache_dir=str(tmp_path / "b"), num_workers=2)
    assert one.stats == two.stats
    assert one.stats.skipped == {"roles_out_of_order": 1, "too_long": 2}
    errors = []
    for workers, cache in ((1, "c"), (2, "d")):
        with pytest.raises(DataError) as e:
            prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), template, cache_dir=str(tmp_path / cache),
                    num_workers=workers)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{data}, record 4: turn 1 is a tool result")


def test_the_default_worker_count_is_one_per_4_mib_up_to_the_usable_cores():
    mib = 2**20
    assert encode.worker_count(None, 3 * mib, cores=16)[0] == 1  # small data: no process is spawned
    assert encode.worker_count(None, 9 * mib, cores=16)[0] == 2
    assert encode.worker_count(None, 1000 * mib, cores=16) == (
        16, "by default one per 4 MiB of data (1000.0 MiB), at most the 16 cores this process may use")
    assert encode.worker_count(3, 1000 * mib, cores=16) == (3, "--preprocessing_num_workers 3")
    assert encode.worker_count(0, 0)[0] == 1
    assert 1 <= encode.usable_cores() <= (os.cpu_count() or 1)


def test_the_default_worker_count_builds_the_entry_a_fixed_count_does(tmp_path, qwen_tokenizer, monkeypatch, capsys):
    """A fifth of the data per process (the threshold lowered): 2 processes here, the same cache
    entry (files byte for byte) as one process."""
    data = write_json(tmp_path / "d.json", records(40, answer_words=30))
    monkeypatch.setattr(encode, "BYTES_PER_WORKER", os.path.getsize(data) // 5)
    monkeypatch.setattr(encode, "usable_cores", lambda: 2)
    template = qwen_tokenizer.chat_template
    auto = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), template, cache_dir=str(tmp_path / "a"),
                   num_workers=None)
    assert f"lmforge: tokenizing {data} in 2 processes (by default one per " in capsys.readouterr().out
    one = prepare(CHAT, [data], qwen_tokenizer, PrepareOptions(), template, cache_dir=str(tmp_path / "b"),
                  num_workers=1)
    assert "in 1 process (--preprocessing_num_workers 1)" in capsys.readouterr().out
    for name in sorted(os.listdir(one.entry.path)):
        if name.endswith(".arrow"):
            with open(os.path.join(auto.entry.path, name), "rb") as a, open(os.path.join(one.entry.path, name), "rb") as b:
                assert a.read() == b.read(), name


def test_preparation_progress_lines_and_totals(monkeypatch):
    from lmforge.data.encode import PrepareProgress

    now = [0.0]
    lines: list[str] = []
    monkeypatch.setattr(encode, "say", lines.append)  # what the progress says
    progress = PrepareProgress("tokenizing", every=10, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 4  # a line once 10 s have passed since the last one, not at every record
        progress.update(1, 100)
    assert lines == ["lmforge: tokenizing: 3 records, 300 tokens in 12 s (0.25 records/s, 25 tokens/s)"]
    now[0] = 20
    progress.done()
    assert lines[-1] == "lmforge: tokenizing: done, 3 records, 300 tokens in 20 s (0.15 records/s, 15 tokens/s)"
