"""The token cache: data is tokenized once into a memory-mapped Arrow file, keyed by the content
of the data files, the tokenizer, the template and every option that changes the tokens. A
rerun, a resume and every rank open the same file instead of tokenizing again, and the corpus
never sits in Python lists in memory (FastChat and happy-llm hold it all in RAM).

Layout: `<cache_dir>/<kind>/<key>/tokens.arrow` (an Arrow IPC stream, opened with
`datasets.Dataset.from_file`, which memory-maps it) and `stats.json`. An entry is built in a
temporary directory and renamed into place when complete, so a crash leaves no entry that
looks finished. This module is the generic part; `data/sft.py` and `data/pretrain.py` say what
goes into an entry.
"""

from __future__ import annotations

import enum
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa

from lmforge.errors import DataError, LmforgeError

CACHE_VERSION = 2


def default_cache_dir() -> str:
    return os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything in the tokenizer that decides the ids: its serialised model,
    normaliser, pre-tokeniser and added tokens (the content of its files, whatever form they
    were loaded from)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmforgeError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; lmforge needs one")
    h.update(backend.to_str().encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def cache_key(kind: str, paths: Sequence[str], tokenizer, options: dict[str, Any]) -> str:
    """Digest of the data files' bytes, the tokenizer, and the options (template included)."""
    h = hashlib.sha256()
    h.update(f"lmforge-{kind}-cache-v{CACHE_VERSION}\n".encode())
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(path, None, "file does not exist")
        h.update(b"file\n")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps({k: _plain(v) for k, v in options.items()}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


@dataclass
class CacheEntry:
    path: str
    stats: dict

    def dataset(self):
        """The cached rows as a memory-mapped `datasets.Dataset`."""
        import datasets

        return datasets.Dataset.from_file(os.path.join(self.path, "tokens.arrow"), in_memory=False)


S = TypeVar("S")


@dataclass
class Cached(Generic[S]):
    """A cache entry with its statistics in their typed form."""

    entry: CacheEntry
    stats: S

    @property
    def path(self) -> str:
        return self.entry.path

    def dataset(self):
        return self.entry.dataset()


def build_or_load(cache_dir: str | None, kind: str, key: str, build: Callable[[str], dict]) -> CacheEntry:
    """Return the entry `key`, building it with `build(tmp_dir) -> stats` when absent.

    `build` writes `tokens.arrow` into the temporary directory; the directory is renamed into
    place only after it returns, so a failed or killed build leaves nothing that looks done."""
    cache_dir = cache_dir or default_cache_dir()
    final = os.path.join(cache_dir, kind, key)
    stats_path = os.path.join(final, "stats.json")
    if os.path.isfile(stats_path):
        with open(stats_path) as f:
            return CacheEntry(final, json.load(f))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=os.path.dirname(final))
    try:
        stats = build(tmp)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheEntry(final, stats)


class RowWriter:
    """Streams rows (lists of ints per column) into `tokens.arrow`, a batch at a time."""

    def __init__(self, directory: str, columns: Sequence[str], batch_rows: int = 1024):
        self.schema = pa.schema([(c, pa.list_(pa.int32())) for c in columns])
        self.sink = pa.OSFile(os.path.join(directory, "tokens.arrow"), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.rows: list[Sequence[list[int]]] = []
        self.batch_rows = batch_rows

    def add(self, *values: list[int]) -> None:
        self.rows.append(values)
        if len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [list(col) for col in zip(*self.rows)]
            self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
            self.rows = []

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()


def ordered_map(fn: Callable, chunks: Iterable, num_workers: int, initializer: Callable, initargs: tuple) -> Iterator:
    """`fn` over `chunks` in `num_workers` processes (in this one when ≤ 1), results in order.

    spawn, not fork: forking a process that already runs torch / tokenizers threads can
    deadlock. `initargs` (the tokenizer, the template) is pickled once per worker."""
    if num_workers <= 1:
        initializer(*initargs)
        for chunk in chunks:
            yield fn(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(fn, chunks)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
