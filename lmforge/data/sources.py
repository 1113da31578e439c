"""Stage 1 of the data chain, sources: data files → raw records (or text documents), each with
its location for messages (`line 12` of a JSONL file, `record 3` of a JSON list or Parquet
file), before any record is interpreted.

Files are streamed (a JSONL file line by line, a JSON list value by value), checked as UTF-8
and JSON with the position of the first fault named. A LLaMA-Factory `dataset_info.json`
beside a file renames its columns and role tags. The bad-record policy lives here too: a
`RecordError` of any later stage becomes a `DataError` naming the file and the record, or a
counted skip when the user asked for skipping (`SkipCounter`).

Records are numbered as the user counts them, from 1: a JSONL record by its line in the file
(blank lines counted), a JSON list's or Parquet file's record by its place in the file, a
text file's document by its place among the documents.

A `.json` file holds a list of records. A JSON object at the top instead is read as:
  - one record, when it is itself a record: it has a key of a known chat, preference or text
    format (`conversations`, `messages`, `instruction` / `output`, `prompt` / `question`,
    `chosen` / `rejected`, `text`), or its only key holds a list of message turns (objects
    with a `role` or `from`), as a file saved from one conversation does;
  - the records of its list, when its only key holds a list of objects (`{"data": [...]}`,
    as some exports write; what the `field=` of the Hugging Face `datasets` JSON loader picks,
    here only where no other key could be meant), said once on the console
    (`lmforge: FILE: records read from its "data" list`);
  - anything else (several keys, such as `{"version": ..., "data": [...]}`, or one key that
    holds no list of objects) is refused: the file holds one object, not a list of records.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from lmforge.data.options import OnBadRecord, TextSplit
from lmforge.data.schema import parse_tools, require_str
from lmforge.errors import DataError, RecordError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".parquet")


# ---------------------------------------------------------------------------------------------
# Files → raw records
# ---------------------------------------------------------------------------------------------


def require_file(path: str, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> None:
    """Raise a `DataError` unless `path` is an existing regular file; one place for the wording
    so the cache key, the readers and the text reader all say the same thing."""
    if os.path.isdir(path):
        raise DataError(path, None, f"is a directory, expected a {', '.join(suffixes)} file")
    if not os.path.exists(path):
        raise DataError(path, None, "file does not exist")
    if not os.path.isfile(path):
        raise DataError(path, None, "is not a regular file")


def read_records(path: str, on_bad_record: OnBadRecord = OnBadRecord.ERROR,
                 skips: SkipCounter | None = None) -> Iterator[tuple[str, Any]]:
    """Yield `(location, record)` from one file, in file order. `location` names the record in
    messages ("record 3" for JSON lists and Parquet rows, "line 12" for JSONL).

    A JSONL line that is not JSON is a bad record like any other: under `--on_bad_record skip`
    (with `skips`) it is counted as `malformed_json` and the lines after it are read; otherwise
    it is an error naming the line. A syntax error in a .json file is always an error: the file
    is one JSON value, which cannot be read past it."""
    require_file(path)
    if os.path.getsize(path) == 0:
        raise DataError(path, None, "file is empty")
    skipping = skips if on_bad_record == OnBadRecord.SKIP else None
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, skipping)
    elif suffix == ".json":
        yield from _read_json(path, skipping is not None)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(path, None, f"unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}")


# Byte-order marks of the encodings a text editor or PowerShell's `>` writes instead of UTF-8.
# Without this check a UTF-16 file is reported as "invalid start byte" at byte 0, which does not
# tell the user what to do.
WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    for bom, encoding in WIDE_BOMS:
        if raw.startswith(bom):
            raise DataError(path, None, f"is {encoding}-encoded (it starts with a {encoding} byte-order mark); "
                                        "lmforge reads UTF-8: convert the file to UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, f"line {line}", f"not valid UTF-8 (byte {e.start}: {e.reason})") from None


# JSON and JSONL files are read as a stream, a record at a time, so that preparing a file of
# any size keeps a bounded amount of it in memory. Errors must come in the order the whole-file
# readers below give them (an encoding error anywhere first, then for JSON a syntax error
# anywhere, before any record is checked), so a first pass over the file checks what those
# readers check up front, keeping nothing. At anything the stream readers do not handle (a wide
# or invalid encoding, malformed JSON, an empty list, an object holding the list) the
# whole-file reader takes over, and decides the message or reads the object form; records
# already yielded are not yielded again.
READ_BYTES = 1 << 20
JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _NotStreamed(Exception):
    """The stream reader stops here; the whole-file reader takes over."""


def _read_json(path: str, skipping: bool) -> Iterator[tuple[str, Any]]:
    yield from _streamed(path, _stream_json_list, lambda p: _read_json_whole(p, skipping), _check_json)


def _read_jsonl(path: str, skips: SkipCounter | None) -> Iterator[tuple[str, Any]]:
    # With `skips`, the stream reader counts a malformed line and reads on: it gives up (for the
    # whole-file reader) only at an encoding error, which the first pass has ruled out, or on a
    # file of blank lines, so no line is counted twice.
    yield from _streamed(path, lambda p: _stream_jsonl(p, skips), lambda p: _read_jsonl_whole(p, skips), _check_utf8)


def _streamed(path: str, stream: Callable, whole: Callable, check: Callable) -> Iterator[tuple[str, Any]]:
    try:
        check(path)
    except _NotStreamed:
        yield from whole(path)
        return
    done = 0
    try:
        for item in stream(path):
            yield item
            done += 1
        return
    except _NotStreamed:
        pass
    for i, item in enumerate(whole(path)):
        if i >= done:
            yield item


def _check_utf8(path: str) -> None:
    with _open_utf8(path) as f:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for block in iter(lambda: f.read(READ_BYTES), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _NotStreamed from None


def _check_json(path: str) -> None:
    for _ in _stream_json_list(path):
        pass


def _open_utf8(path: str):
    """The file in binary, after checking that it does not start with a UTF-16/32 mark."""
    f = open(path, "rb")
    if any(f.peek(4)[:4].startswith(bom) for bom, _ in WIDE_BOMS):
        f.close()
        raise _NotStreamed
    return f


def _stream_jsonl(path: str, skips: SkipCounter | None = None) -> Iterator[tuple[str, Any]]:
    with _open_utf8(path) as f:
        seen = False
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise _NotStreamed from None
            if not line.strip():
                continue
            seen = True
            try:
                # Without its "\n", as the whole-file reader parses it: an error at the line's end
                # is then in the line's last column, not in column 1 of the next.
                record = json.loads(line.removesuffix("\n"))
            except json.JSONDecodeError as e:
                if skips is None:
                    raise _NotStreamed from None  # the whole-file reader words the error
                skips.add(MALFORMED_JSON, f"{path}, line {lineno}: {_malformed_line(e)}")
                continue
            yield f"line {lineno}", record
        if not seen:
            raise _NotStreamed


class _JsonText:
    """A UTF-8 file decoded a block at a time: `buf` holds the text not yet consumed."""

    def __init__(self, f):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        """Read another block (at least as much as is buffered, so a long record costs linear
        time); False at the end of the file."""
        if self.eof:
            return False
        block = self.f.read(max(READ_BYTES, len(self.buf) - self.pos))
        self.eof = not block
        try:
            text = self.decoder.decode(block, final=self.eof)
        except UnicodeDecodeError:
            raise _NotStreamed from None
        self.buf = self.buf[self.pos :] + text
        self.pos = 0
        return True

    def next_char(self) -> str:
        """The next character that is not JSON whitespace, not consumed ("" at the end)."""
        while True:
            self.pos = JSON_SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def value(self, decoder: json.JSONDecoder) -> Any:
        self.next_char()  # raw_decode takes no leading whitespace
        while True:
            try:
                value, self.pos = decoder.raw_decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError as e:
                # A value cut by the end of the block fails near that end (or as a string
                # left open); anything else is malformed.
                cut = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if not (cut and self.more()):
                    raise _NotStreamed from None


def _stream_json_list(path: str) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    with _open_utf8(path) as f:
        text = _JsonText(f)
        if text.next_char() != "[":
            raise _NotStreamed
        text.pos += 1
        if text.next_char() == "]":
            raise _NotStreamed  # an empty list: the whole-file reader says so
        index = 1
        while True:
            value = text.value(decoder)
            yield f"record {index}", value
            index += 1
            after = text.next_char()
            text.pos += 1
            if after == "]":
                break
            if after != ",":
                raise _NotStreamed
        if text.next_char() != "":
            raise _NotStreamed  # text after the list


def _read_json_whole(path: str, skipping: bool = False) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, None, "file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        why = ("; --on_bad_record skip skips bad records, not this: a .json file is one JSON list, which cannot be "
               "read past a syntax error. Fix the file, or write it as JSONL, where a malformed line is skipped"
               if skipping else "")
        raise DataError(path, f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}{why}") from None
    if isinstance(data, dict):
        data = _object_records(path, data)
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise DataError(path, None, "the JSON list holds no records")
    for i, record in enumerate(data, start=1):
        yield f"record {i}", record


# The keys that make a top-level JSON object a record of its own (chat, preference, text).
RECORD_KEYS = frozenset({"conversations", "messages", "instruction", "output", "prompt", "question", "chosen",
                         "rejected", "text"})
TURN_KEYS = ("role", "from")


def _list_of_objects(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _object_records(path: str, data: dict) -> list:
    """The records of a `.json` file that holds one JSON object, as the module docstring says:
    `[data]` when the object is a record, the list its only key holds when that is a list of
    objects (or empty); anything else is refused."""
    if RECORD_KEYS.intersection(data):
        return [data]
    if len(data) == 1:
        key, value = next(iter(data.items()))
        if _list_of_objects(value) and any(k in value[0] for k in TURN_KEYS):
            return [data]  # one conversation's turns under a key of its own (a dataset_info.json column)
        if _list_of_objects(value) or value == []:
            print(f"lmforge: {path}: records read from its {json.dumps(key, ensure_ascii=False)} list")
            return value
    lists = [k for k, v in data.items() if _list_of_objects(v)]
    hint = (f"; to train on the records of its {lists[0]!r} list, write that list alone to the file"
            if len(lists) == 1 else "")
    raise DataError(path, None, f"the file holds one JSON object (keys: {sorted(data)}), not a list of records: "
                                "expected a JSON list of records, one record, or an object whose only key holds "
                                f"the list of records{hint}")


MALFORMED_JSON = "malformed_json"  # the skip reason of a JSONL line that is not JSON


def _malformed_line(e: json.JSONDecodeError) -> str:
    return f"malformed JSON: {e.msg} (column {e.colno})"


def _read_jsonl_whole(path: str, skips: SkipCounter | None = None) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, None, "file is empty")
    # Lines end at \n only (JSON Lines; \r\n works too): str.splitlines would also cut at
    # U+2028 and the like, which JSON allows unescaped inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if skips is None:
                raise DataError(path, f"line {lineno}", _malformed_line(e)) from None
            skips.add(MALFORMED_JSON, f"{path}, line {lineno}: {_malformed_line(e)}")
            continue
        yield f"line {lineno}", record


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, f"not a readable Parquet file: {e}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            index += 1
            yield f"record {index}", record
    if index == 0:
        raise DataError(path, None, "the Parquet file holds no rows")


# ---------------------------------------------------------------------------------------------
# The bad-record policy: errors or counted skips
# ---------------------------------------------------------------------------------------------


@dataclass
class SkipCounter:
    """Records skipped, by reason; the first example of each reason is kept for the report."""

    counts: Counter
    examples: dict[str, str]

    @classmethod
    def new(cls) -> "SkipCounter":
        return cls(Counter(), {})

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def skip_summary(skipped: dict[str, int], examples: dict[str, str]) -> list[str]:
    """Report lines: the number skipped, then each reason with its count and first example."""
    lines = [f"skipped: {sum(skipped.values())}"]
    for kind, n in sorted(skipped.items()):
        lines.append(f"  {kind}: {n}  (e.g. {examples.get(kind, '')})")
    return lines


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json: column names and role tags of a data file
# ---------------------------------------------------------------------------------------------

DATASET_INFO = "dataset_info.json"
# LLaMA-Factory's default tags, and the lmforge ShareGPT role each becomes.
SHAREGPT_TAGS = {"user_tag": ("human", "human"), "assistant_tag": ("gpt", "gpt"),
                 "observation_tag": ("observation", "observation"), "function_tag": ("function_call", "function_call"),
                 "system_tag": ("system", "system")}


def llama_factory_columns(path: str) -> dict | None:
    """The entry of `dataset_info.json` (in the data file's folder) whose `file_name` is this
    file, or None. The entry says the formatting (alpaca / sharegpt), the column names and, for
    sharegpt, the role and content keys and the role names."""
    info_path = os.path.join(os.path.dirname(os.path.abspath(path)), DATASET_INFO)
    if not os.path.isfile(info_path):
        return None
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(info_path, None, f"cannot read it as JSON: {e}") from None
    name = os.path.basename(path)
    entries = [e for e in info.values() if isinstance(e, dict) and e.get("file_name") == name] \
        if isinstance(info, dict) else []
    if not entries or entries[0].get("ranking"):
        return None  # not described there, or preference data (read by lmforge dpo's own formats)
    return {"formatting": entries[0].get("formatting", "alpaca"), "columns": entries[0].get("columns") or {},
            "tags": entries[0].get("tags") or {}}


def remap_record(record: Any, spec: dict) -> Any:
    """A record in LLaMA-Factory's described columns, as the ShareGPT or Alpaca record lmforge
    reads; a record that is not an object is left for the reader to refuse."""
    if not isinstance(record, dict):
        return record
    columns, tags = spec["columns"], spec["tags"]
    if spec["formatting"] != "sharegpt":
        names = {"instruction": "prompt", "input": "query", "output": "response", "system": "system",
                 "history": "history"}
        return {ours: record.get(columns.get(theirs, ours)) for ours, theirs in names.items()
                if record.get(columns.get(theirs, ours)) is not None}
    role_key, content_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    roles = {tags.get(tag, default): ours for tag, (default, ours) in SHAREGPT_TAGS.items()}
    turns = record.get(columns.get("messages", "conversations"))
    if isinstance(turns, list):
        turns = [{**{k: v for k, v in t.items() if k not in (role_key, content_key)},
                  "from": roles.get(t.get(role_key), t.get(role_key)), "value": t.get(content_key)}
                 if isinstance(t, dict) else t for t in turns]
    out = {"conversations": turns}
    for ours in ("system", "tools"):
        if columns.get(ours) and record.get(columns[ours]) is not None:
            out[ours] = record[columns[ours]]
    return out


def records_with_format(path: str, fmt: Any, detect: Callable[[Any], Any], on_bad_record: OnBadRecord,
                        skips: SkipCounter | None) -> Iterator[tuple[str, Any, Any]]:
    """`(location, raw record, format)` for each record of `path`: `fmt`, or while it is `auto`,
    what `detect` makes of the record (the first it can tell fixes the file's format; one it
    cannot is a bad record). Shared by the SFT and the preference formats."""
    for location, record in read_records(path, on_bad_record, skips):
        if fmt == "auto":
            try:
                fmt = detect(record)
            except RecordError as e:
                bad_record(path, location, e, on_bad_record, skips)
                continue
        yield location, record, fmt


def bad_record(path: str, location: str, error: RecordError, on_bad_record: OnBadRecord,
               skips: SkipCounter | None) -> None:
    """Count the record under its reason when skipping, else raise the error naming it."""
    if on_bad_record == OnBadRecord.SKIP and skips is not None:
        skips.add(error.kind, f"{path}, {location}: {error.reason}")
        return
    raise DataError(path, location, error.reason) from None


# ---------------------------------------------------------------------------------------------
# Plain-text documents for pretraining
# ---------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


def _split_text(text: str, split: TextSplit) -> list[str]:
    if split == TextSplit.FILE:
        return [text]
    if split == TextSplit.LINE:
        return [line for line in text.splitlines() if line.strip()]
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def iter_documents(
    path: str,
    text_field: str = "text",
    split: TextSplit = TextSplit.FILE,
    on_bad_record: OnBadRecord = OnBadRecord.ERROR,
    skips: SkipCounter | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield `(location, text)` documents from .txt, or from .json / .jsonl / .parquet records
    holding a `text_field` string."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        require_file(path, TEXT_SUFFIXES)
        text = _read_text(path)
        if not text.strip():
            raise DataError(path, None, "file is empty")
        for i, doc in enumerate(_split_text(text, TextSplit(split)), start=1):
            yield f"document {i}", doc
        return
    if suffix not in TEXT_SUFFIXES:
        raise DataError(path, None, f"unsupported file type {suffix!r}; use one of {TEXT_SUFFIXES}")
    for location, record in read_records(path, on_bad_record, skips):
        try:
            if not isinstance(record, dict):
                raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise RecordError("missing_field", f"field '{text_field}' is missing (keys: {sorted(record)}); "
                                                   "see --text_field")
            text = require_str(record[text_field], f"field '{text_field}'")
            if not text.strip():
                raise RecordError("empty_content", f"field '{text_field}' is empty")
        except RecordError as e:
            if on_bad_record == OnBadRecord.SKIP and skips is not None:
                skips.add(e.kind, f"{path}, {location}: {e.reason}")
                continue
            raise DataError(path, location, e.reason) from None
        yield location, text


def read_tools(path: str) -> tuple[dict, ...]:
    """`--tools FILE`: a JSON list of tool schemas (OpenAI's, or LLaMA-Factory's flat ones)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DataError(path, None, "file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, None, f"--tools: cannot read it as JSON: {e}") from None
    try:
        return parse_tools(value, "the file")
    except RecordError as e:
        raise DataError(path, None, f"--tools: {e.reason}") from None
