"""Stage 4 of the data chain, the store: the token cache. Data is tokenized once into a memory-mapped Arrow file, keyed by the content
of the data files, the tokenizer, the template and every option that changes the tokens. A
rerun, a resume and every rank open the same file instead of tokenizing again, and the corpus
never sits in Python lists in memory (FastChat and happy-llm hold it all in RAM).

Layout: `<cache_dir>/<kind>/<key>/tokens.arrow` (an Arrow IPC stream, opened with
`datasets.Dataset.from_file`, which memory-maps it), `stats.json` and `entry.json` (the row
count, byte size and CRC-32 checksums of tokens.arrow, one per 64 MiB block). An entry is built
in a temporary directory `.tmp-<key>-*` and renamed into place when complete, so a crash leaves
no entry that looks finished; the next build in the same kind folder removes such leftovers once
no live process owns them (`owner.json`). This module is the generic part; `encode.py` says
what goes into an entry.

Every use of an entry checks the size and row count of tokens.arrow (cheap: only the batch
headers are read). The checksums, which read the whole file, are compared where that costs
little: on build, before the rename; on the first use after the build (then `verified.json`
records it, so later uses skip them until tokens.arrow changes); and under `lmforge prepare
--verify`. A build reads the file back from the page cache; the first use may read it from
disk, on another host or after a copy, where damage happens.

Nothing in the cache is a pickle: an entry is Arrow (columns of int32 lists or float64, checked) and
JSON, read as data only, so whoever can write to a cache directory can change token ids but
cannot make lmforge run code. An entry that does not check out against `entry.json`
(truncated, replaced, edited) is reported and rebuilt.
"""

from __future__ import annotations

import array
import enum
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import pyarrow as pa

from lmforge.data.sources import SUPPORTED_SUFFIXES, require_file
from lmforge.errors import LmforgeError, is_disk_full
from lmforge.logs import say
from lmforge.training.checkpoint import crc_range
from lmforge.training.run_lock import process_alive

CACHE_VERSION = 5  # part of every entry's key: raised when what an entry holds changes
TOKENS, STATS, MANIFEST = "tokens.arrow", "stats.json", "entry.json"
VERIFIED = "verified.json"  # tokens.arrow matched its checksums, at this size and modification time
OWNER = "owner.json"  # in a temporary build directory: the process building it (pid, host)
# The checksums guard against accidental damage (a bad disk, a short copy), not tampering, so
# CRC-32, read by checkpoint.crc_range (several times faster than a cryptographic hash: measured,
# docs/bench_results.md, checkpoint checksums). One per block: a check stops at the first
# damaged block and says which bytes.
CHECKSUM = "crc32"
CRC_BLOCK = 64 << 20
LEFTOVER_AGE = 3600.0  # seconds: a temporary directory with no owner.json this old is a dead build's


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


@dataclass(frozen=True)
class SourceFile:
    """A data file as it was read: its path and the digest of its bytes (what a resumed run
    compares: the same content under another path is the same data)."""

    path: str
    sha256: str
    bytes: int


# Digests already read by this process, by (path, inode, size, modification time in ns): a
# resumed run compares its data with the run record's and then keys the cache on the same
# digests, and a data set of gigabytes is then read once, not twice.
_DIGESTS: dict[tuple, tuple[str, int]] = {}


def source_files(paths: Sequence[str], suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> tuple[SourceFile, ...]:
    """Each data file's digest. `suffixes` are the file types read, named when a path is not a file."""
    out = []
    for path in paths:
        require_file(path, suffixes)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            h, size = hashlib.sha256(), 0
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    size += len(block)
            _DIGESTS[key] = (h.hexdigest(), size)
        digest, size = _DIGESTS[key]
        out.append(SourceFile(path, digest, size))
    return tuple(out)


def cache_key(kind: str, sources: Sequence[SourceFile], tokenizer, options: dict[str, Any]) -> str:
    """Digest of the data files' bytes (in order), the tokenizer, and the options (template included)."""
    h = hashlib.sha256()
    h.update(f"lmforge-{kind}-cache-v{CACHE_VERSION}\n".encode())
    for source in sources:
        h.update(f"file {source.sha256}\n".encode())
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

        return datasets.Dataset.from_file(os.path.join(self.path, TOKENS), in_memory=False)


S = TypeVar("S")


@dataclass
class Cached(Generic[S]):
    """A cache entry with its statistics in their typed form."""

    entry: CacheEntry
    stats: S
    sources: tuple[SourceFile, ...] = ()
    """The data files this entry was found or built for, as read this time."""

    @property
    def path(self) -> str:
        return self.entry.path

    def dataset(self):
        return self.entry.dataset()


class DamagedEntry(Exception):
    """A cache entry whose files do not check out; the message says which file and how."""


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{os.path.basename(path)} does not read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise DamagedEntry(f"{os.path.basename(path)} holds {type(value).__name__}, not an object")
    return value


TOKEN_COLUMN = pa.list_(pa.int32())
# Per-row numbers computed from the tokens (DPO's reference log-probabilities) are float64 columns.
FLOAT_COLUMN = pa.float64()
COLUMN_TYPES = (TOKEN_COLUMN, FLOAT_COLUMN)
INT32 = "i" if array.array("i").itemsize == 4 else "l"  # a C int is 32 bits on every usual platform


def _count_rows(tokens: str) -> int:
    """Rows of an Arrow IPC stream of token columns; anything else (a truncated stream, another
    format, a pickle, a stream with other column types) raises ValueError here. Memory-mapped,
    so only the batch headers are read."""
    with pa.memory_map(tokens) as source:
        reader = pa.ipc.open_stream(source)
        odd = [f"{f.name}: {f.type}" for f in reader.schema if f.type not in COLUMN_TYPES]
        if odd:
            raise ValueError(f"columns that are neither lists of int32 nor float64 ({', '.join(odd)})")
        return sum(batch.num_rows for batch in reader)


def _block_crcs(path: str, block: int) -> Iterator[str]:
    """The CRC-32 of each `block` bytes of the file (8 hex digits), in order, read lazily so
    that a check can stop at the first that differs."""
    for offset in range(0, os.path.getsize(path), block):
        crc, _ = crc_range(path, offset, block)
        yield f"{crc:08x}"


def _manifest(directory: str) -> dict:
    tokens = os.path.join(directory, TOKENS)
    return {"rows": _count_rows(tokens), "bytes": os.path.getsize(tokens), "block_bytes": CRC_BLOCK,
            CHECKSUM: list(_block_crcs(tokens, CRC_BLOCK))}


def _check_sizes(path: str) -> tuple[dict, dict, int]:
    """(stats, manifest, rows) of the entry at `path` after the cheap checks: tokens.arrow is the
    Arrow stream entry.json describes (same size, same row count); raises `DamagedEntry` if not."""
    stats = _read_json_object(os.path.join(path, STATS))
    manifest = _read_json_object(os.path.join(path, MANIFEST))
    tokens = os.path.join(path, TOKENS)
    if not os.path.isfile(tokens):
        raise DamagedEntry(f"{TOKENS} is missing")
    size = os.path.getsize(tokens)
    if size != manifest.get("bytes"):
        raise DamagedEntry(f"{TOKENS} holds {size} bytes, {MANIFEST} records {manifest.get('bytes')}")
    try:
        rows = _count_rows(tokens)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DamagedEntry(f"{TOKENS} is not an Arrow stream of token columns ({e})") from None
    if rows != manifest.get("rows"):
        raise DamagedEntry(f"{TOKENS} holds {rows} rows, {MANIFEST} records {manifest.get('rows')}")
    return stats, manifest, rows


def _check_checksums(path: str, manifest: dict) -> None:
    """Read tokens.arrow whole and compare each block's CRC-32 with entry.json's; raises
    `DamagedEntry` at the first block that differs, naming its bytes. An entry.json without
    checksums counts as damaged: rebuilding the entry is the only way to know its tokens."""
    tokens = os.path.join(path, TOKENS)
    crcs, block = manifest.get(CHECKSUM), manifest.get("block_bytes")
    if not (isinstance(crcs, list) and isinstance(block, int) and block > 0):
        raise DamagedEntry(f"{MANIFEST} holds no {CHECKSUM} checksums of {TOKENS}")
    size = os.path.getsize(tokens)
    blocks = -(-size // block)
    if len(crcs) != blocks:
        raise DamagedEntry(f"{MANIFEST} lists {len(crcs)} {CHECKSUM} checksums for the {blocks} blocks of {TOKENS}")
    for i, actual in enumerate(_block_crcs(tokens, block)):
        if actual != crcs[i]:
            start, end = i * block, min(size, (i + 1) * block) - 1
            raise DamagedEntry(f"{TOKENS} is damaged in bytes {start:,}-{end:,} (block {i + 1} of {blocks}): "
                               f"{CHECKSUM} {actual}, {MANIFEST} records {crcs[i]}")


def _tokens_state(path: str) -> dict:
    """What `verified.json` holds: tokens.arrow as it was checked (any write since changes it)."""
    st = os.stat(os.path.join(path, TOKENS))
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(path: str) -> bool:
    try:
        with open(os.path.join(path, VERIFIED), encoding="utf-8") as f:
            return json.load(f) == _tokens_state(path)
    except (OSError, ValueError):
        return False


def _mark_verified(path: str) -> None:
    """Write `verified.json` atomically (a reader never sees half of it). A cache the user may
    only read stays unmarked: its entries are then checked in full at every use."""
    # One temporary name per process, on a disk several hosts share too.
    tmp = os.path.join(path, f".{VERIFIED}.{socket.gethostname()}.{os.getpid()}")
    try:
        _write_json(tmp, _tokens_state(path))
        os.replace(tmp, os.path.join(path, VERIFIED))
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_entry(path: str) -> dict:
    """The stats of the finished entry at `path`, after checking that tokens.arrow is the Arrow
    stream entry.json describes (same size, same row count) and, on the entry's first use, that
    it matches its checksums; raises `DamagedEntry` if not."""
    stats, manifest, _ = _check_sizes(path)
    if not _is_verified(path):
        _check_checksums(path, manifest)
        _mark_verified(path)
    return stats


def verify_entry(path: str) -> tuple[int, int]:
    """(bytes, rows) of tokens.arrow after checking the entry at `path` in full, whatever
    `verified.json` says (`lmforge prepare --verify`); raises `DamagedEntry` if it does not
    check out."""
    _, manifest, rows = _check_sizes(path)
    _check_checksums(path, manifest)
    _mark_verified(path)
    return manifest["bytes"], rows


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def _newest_change(folder: str) -> float:
    """The latest modification time of the folder or a file in it: a build still writing
    tokens.arrow keeps this recent."""
    times = [os.stat(folder).st_mtime]
    with os.scandir(folder) as entries:
        times += [e.stat().st_mtime for e in entries]
    return max(times)


def _leftover_reason(folder: str) -> str | None:
    """Why the temporary build directory `folder` is a dead build's, or None while a live
    process may own it. Its owner's pid is only looked up on the host that wrote it; a folder
    of another host is never removed."""
    try:
        with open(os.path.join(folder, OWNER), encoding="utf-8") as f:
            owner = json.load(f)
        pid, host = owner["pid"], owner["host"]
        if not (isinstance(pid, int) and pid > 0):  # 0 or -1 would name process groups
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        # No owner.json (its build died before writing it, or it is another lmforge's): only age tells.
        age = time.time() - _newest_change(folder)
        return f"no {OWNER}, unchanged for {age / 3600:.1f} h" if age > LEFTOVER_AGE else None
    if host != socket.gethostname() or process_alive(pid):
        return None
    return f"its process {pid} is gone"


def _remove_leftovers(parent: str) -> None:
    """Remove the temporary directories under `parent` of builds that were killed (a killed
    process runs no cleanup), and say in one line which and why."""
    removed = []
    for name in sorted(os.listdir(parent)):
        folder = os.path.join(parent, name)
        if not name.startswith(".tmp-") or not os.path.isdir(folder):
            continue
        try:
            reason = _leftover_reason(folder)
        except OSError:  # removed meanwhile (by another process cleaning up)
            continue
        if reason:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"{name} ({reason})")
    if removed:
        say(f"lmforge: removed {len(removed)} leftover temporary cache "
            f"{'directory' if len(removed) == 1 else 'directories'} of killed builds under {parent}: "
            + ", ".join(removed))


def _new_build_dir(parent: str, key: str) -> str:
    """A temporary directory for building entry `key`, owned by this process (`owner.json`),
    after removing the leftovers of dead builds beside it."""
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_leftovers(parent)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=parent)
        _write_json(os.path.join(tmp, OWNER), {"pid": os.getpid(), "host": socket.gethostname()})
    except OSError as e:
        raise LmforgeError(f"cannot write the token cache under {parent}: {e.strerror}; "
                           "point --data_cache_dir (or $LMFORGE_CACHE) at a writable directory") from None
    return tmp


def build_or_load(cache_dir: str | None, kind: str, key: str, build: Callable[[str], dict]) -> CacheEntry:
    """Return the entry `key`, building it with `build(tmp_dir) -> stats` when absent or damaged.

    `build` writes `tokens.arrow` into the temporary directory; the entry is checked (checksums
    included) and the directory renamed into place only after it returns, so a failed or killed
    build leaves nothing that looks done. A full disk is reported naming the cache directory,
    with nothing left behind."""
    cache_dir = cache_dir or default_cache_dir()
    final = os.path.join(cache_dir, kind, key)
    parent = os.path.dirname(final)
    if os.path.isdir(final):
        try:
            return CacheEntry(final, load_entry(final))
        except DamagedEntry as e:
            say(f"lmforge: the cache entry {final} is damaged ({e}); rebuilding it")
            shutil.rmtree(final, ignore_errors=True)
    tmp = _new_build_dir(parent, key)
    try:
        stats = build(tmp)
        _write_json(os.path.join(tmp, STATS), stats)
        _write_json(os.path.join(tmp, MANIFEST), _manifest(tmp))
        _, manifest, _ = _check_sizes(tmp)
        _check_checksums(tmp, manifest)
        os.remove(os.path.join(tmp, OWNER))  # a finished entry holds Arrow and its JSON only
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            writing = f" (writing {e.filename})" if e.filename else ""
            raise LmforgeError(
                f"cannot write the token cache under {parent}: no space left on device{writing}; nothing "
                "was kept. Free space, or point --data_cache_dir (or $LMFORGE_CACHE) at a larger disk") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheEntry(final, stats)


class RowWriter:
    """Streams rows (lists of ints per column) into `tokens.arrow`, a batch at a time.

    Each column is gathered in C int32 arrays (values and list offsets) and handed to Arrow as
    buffers: five times faster than converting Python lists of lists."""

    def __init__(self, directory: str, columns: Sequence[str], batch_rows: int = 1024):
        self.schema = pa.schema([(c, TOKEN_COLUMN) for c in columns])
        self.sink = pa.OSFile(os.path.join(directory, TOKENS), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.batch_rows = batch_rows
        self._start_batch()

    def _start_batch(self) -> None:
        self.values = [array.array(INT32) for _ in self.schema]
        self.offsets = [array.array(INT32, [0]) for _ in self.schema]
        self.rows = 0

    def add(self, *values: Sequence[int]) -> None:
        for column, offsets, row in zip(self.values, self.offsets, values):
            column.extend(row)
            offsets.append(len(column))
        self.rows += 1
        if self.rows >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [_int32_lists(o, v) for o, v in zip(self.offsets, self.values)]
            self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
            self._start_batch()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()


def _int32_lists(offsets: array.array, values: array.array) -> pa.Array:
    def int32s(a: array.array) -> pa.Array:
        return pa.Array.from_buffers(pa.int32(), len(a), [None, pa.py_buffer(a)])

    return pa.ListArray.from_arrays(int32s(offsets), int32s(values))


def dump_records(cache: Cached, path: str, n: int) -> int:
    """Write the first `n` cached records, in source order, as JSONL {input_ids, labels}.

    Written to a temporary file renamed into place, so a failed write (a full disk) leaves no
    truncated dump that looks complete."""
    ds = cache.dataset()
    n = min(n, len(ds))
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            for row in ds.select(range(n)):
                f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise LmforgeError(f"--dump {path}: cannot write it: {e.strerror or e}") from None
    return n
