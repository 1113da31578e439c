"""The token cache: conversations are rendered once into a memory-mapped Arrow file, keyed by the
content of the data files, the tokenizer, the chat template and every option that changes the
tokens. A rerun, a resume and every rank open the same file instead of tokenizing again, and
the corpus never sits in Python lists in memory (FastChat and happy-llm hold it all in RAM).

Layout: `<cache_dir>/sft/<key>/tokens.arrow` (Arrow IPC stream, opened with
`datasets.Dataset.from_file`, which memory-maps it) and `stats.json`. A cache entry is built
in a temporary directory and renamed into place when complete, so a crash leaves no entry that
looks finished.
"""

from __future__ import annotations

import enum
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Sequence

import pyarrow as pa

from lmforge.data.formats import Conversation, DataFormat, OnBadRecord, SkipCounter, iter_conversations
from lmforge.data.render import MaskingStrategy, Rendered, Renderer
from lmforge.errors import DataError, LmforgeError, RecordError

CACHE_VERSION = 1
CHUNK = 256
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


class LongRecords(str, enum.Enum):
    """What to do with a record longer than `model_max_length`."""

    TRUNCATE = "truncate"
    """Keep its first `model_max_length` tokens (skipped if no trained token remains)."""
    DROP = "drop"
    """Leave it out, counted as a skip."""


@dataclass(frozen=True)
class PrepareOptions:
    """Everything besides the files and the tokenizer that changes the cached tokens."""

    data_format: DataFormat = DataFormat.AUTO
    masking: MaskingStrategy = MaskingStrategy.ASSISTANT
    model_max_length: int = 2048
    long_records: LongRecords = LongRecords.TRUNCATE
    on_bad_record: OnBadRecord = OnBadRecord.ERROR


@dataclass
class PrepareStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"records: {self.records}  kept: {self.kept}  truncated: {self.truncated}",
            f"tokens: {self.tokens}  trained tokens: {self.trained_tokens}",
        ]
        if self.skipped:
            lines.append(f"skipped: {sum(self.skipped.values())}")
            for kind, n in sorted(self.skipped.items()):
                lines.append(f"  {kind}: {n}  (e.g. {self.skip_examples.get(kind, '')})")
        else:
            lines.append("skipped: 0")
        return "\n".join(lines)


@dataclass
class TokenCache:
    path: str
    stats: PrepareStats

    def dataset(self):
        """The cached records as a memory-mapped `datasets.Dataset` (input_ids, labels)."""
        import datasets

        return datasets.Dataset.from_file(os.path.join(self.path, "tokens.arrow"), in_memory=False)


def default_cache_dir() -> str:
    return os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")


def _hash_file(path: str, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


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


def cache_key(paths: Sequence[str], tokenizer, chat_template: str, options: PrepareOptions) -> str:
    h = hashlib.sha256()
    h.update(f"lmforge-sft-cache-v{CACHE_VERSION}\n".encode())
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(path, None, "file does not exist")
        h.update(b"file\n")
        _hash_file(path, h)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(chat_template.encode())
    h.update(json.dumps({k: str(v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(options).items()},
                        sort_keys=True).encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# Rendering, in worker processes when asked
# ---------------------------------------------------------------------------------------------

_WORKER_RENDERER: Renderer | None = None


def _init_worker(renderer: Renderer) -> None:
    global _WORKER_RENDERER
    _WORKER_RENDERER = renderer


def _render_chunk(chunk: list[tuple[str, str, Conversation]]) -> list[tuple[str, str, Rendered | RecordError]]:
    assert _WORKER_RENDERER is not None
    out: list[tuple[str, str, Rendered | RecordError]] = []
    for path, location, conversation in chunk:
        try:
            out.append((path, location, _WORKER_RENDERER(conversation)))
        except RecordError as e:
            out.append((path, location, e))
    return out


def _chunks(paths: Sequence[str], options: PrepareOptions, skips: SkipCounter):
    """Yield lists of (path, location, Conversation); bad records are raised or counted."""
    chunk: list[tuple[str, str, Conversation]] = []
    for path in paths:
        for location, conversation in iter_conversations(path, options.data_format, options.on_bad_record, skips):
            chunk.append((path, location, conversation))
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _rendered_records(paths, renderer: Renderer, options: PrepareOptions, skips: SkipCounter, num_workers: int):
    """Yield (path, location, Rendered | RecordError) in source order."""
    chunks = _chunks(paths, options, skips)
    if num_workers <= 1:
        _init_worker(renderer)
        for chunk in chunks:
            yield from _render_chunk(chunk)
        return
    # spawn, not fork: forking a process that already runs torch / tokenizers threads can
    # deadlock. The renderer (tokenizer + template) is pickled once per worker; imap keeps
    # source order.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(renderer,)) as pool:
        for results in pool.imap(_render_chunk, chunks):
            yield from results


def _apply_length_policy(r: Rendered, options: PrepareOptions) -> Rendered | RecordError:
    limit = options.model_max_length
    if len(r.input_ids) <= limit:
        if r.num_trained == 0:
            return RecordError("no_trained_tokens", "no token carries loss under this masking strategy")
        return r
    if options.long_records == LongRecords.DROP:
        return RecordError("too_long", f"{len(r.input_ids)} tokens, longer than model_max_length={limit}")
    cut = Rendered(r.input_ids[:limit], r.labels[:limit])
    if cut.num_trained == 0:
        return RecordError(
            "no_trained_tokens_after_truncation",
            f"{len(r.input_ids)} tokens; truncated to model_max_length={limit}, no trained token is left",
        )
    return cut


def _write_entry(tmp: str, records, options: PrepareOptions, skips: SkipCounter, stats: PrepareStats) -> None:
    """Stream rendered records into `tmp/tokens.arrow`, applying the length policy."""
    with pa.OSFile(os.path.join(tmp, "tokens.arrow"), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        batch_ids: list[list[int]] = []
        batch_labels: list[list[int]] = []
        for path, location, result in records:
            truncated = False
            if isinstance(result, Rendered):
                truncated = len(result.input_ids) > options.model_max_length
                result = _apply_length_policy(result, options)
            if isinstance(result, RecordError):
                if options.on_bad_record == OnBadRecord.SKIP or result.kind.startswith(("too_long", "no_trained")):
                    skips.add(result.kind, f"{path}, {location}: {result.reason}")
                    continue
                raise DataError(path, location, result.reason)
            stats.truncated += int(truncated)
            stats.kept += 1
            stats.tokens += len(result.input_ids)
            stats.trained_tokens += result.num_trained
            batch_ids.append(result.input_ids)
            batch_labels.append(result.labels)
            if len(batch_ids) == 1024:
                writer.write_batch(pa.record_batch([batch_ids, batch_labels], schema=SCHEMA))
                batch_ids, batch_labels = [], []
        if batch_ids:
            writer.write_batch(pa.record_batch([batch_ids, batch_labels], schema=SCHEMA))
    # Every record read is either kept or counted under a skip reason.
    stats.records = stats.kept + skips.total
    stats.skipped = dict(skips.counts)
    stats.skip_examples = dict(skips.examples)


def prepare(
    paths: Sequence[str],
    tokenizer,
    chat_template: str,
    options: PrepareOptions,
    cache_dir: str | None = None,
    num_workers: int = 1,
) -> TokenCache:
    """Render `paths` into the cache (or find them there) and return the entry."""
    if not paths:
        raise LmforgeError("no data file given (--data_path)")
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(paths, tokenizer, chat_template, options)
    final = os.path.join(cache_dir, "sft", key)
    if os.path.isfile(os.path.join(final, "stats.json")):
        with open(os.path.join(final, "stats.json")) as f:
            return TokenCache(final, PrepareStats(**json.load(f)))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=os.path.dirname(final))
    try:
        stats = PrepareStats()
        skips = SkipCounter.new()
        renderer = Renderer(tokenizer, chat_template, options.masking)
        records = _rendered_records(paths, renderer, options, skips, num_workers)
        _write_entry(tmp, records, options, skips, stats)
        if stats.kept == 0:
            raise LmforgeError(f"no usable record in {', '.join(paths)}:\n{stats.summary()}")
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(asdict(stats), f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCache(final, stats)


def dump_records(cache: TokenCache, path: str, n: int) -> int:
    """Write the first `n` cached records, in source order, as JSONL {input_ids, labels}."""
    ds = cache.dataset()
    n = min(n, len(ds))
    with open(path, "w") as f:
        for row in ds.select(range(n)):
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    return n

