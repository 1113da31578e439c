"""The token cache's integrity: checksums of tokens.arrow (written on build, compared on build, on
the first use and under `lmforge prepare --verify`), the leftovers of killed builds removed, a
build stopped by SIGTERM that says so and leaves nothing behind."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import pytest

from lmforge.cli import main as cli
from lmforge.data import store
from lmforge.data.store import RowWriter, build_or_load

from conftest import QWEN_TOKENIZER, ROOT

BLOCK = 4096  # small blocks, so an entry of a few rows has several


def row(i: int) -> list[int]:
    return list(range(1000 * i, 1000 * i + 50))


def build_rows(n: int = 200):
    def build(tmp: str) -> dict:
        with RowWriter(tmp, ("input_ids",), batch_rows=16) as writer:
            for i in range(n):
                writer.add(row(i))
        return {"rows": n}

    return build


def must_not_build(tmp: str) -> dict:
    raise AssertionError("built again")


def block_crcs(path: pathlib.Path, block: int) -> list[str]:
    data = path.read_bytes()
    return [f"{zlib.crc32(data[i:i + block]):08x}" for i in range(0, len(data), block)]


def overwrite_row(tokens: pathlib.Path, i: int, keep_mtime: bool = False) -> int:
    """Overwrite the 64 bytes in the middle of row `i`'s int32 values (the same size, the Arrow
    headers untouched), as a bad disk or a bad copy would; returns their offset."""
    st = tokens.stat()
    data = bytearray(tokens.read_bytes())
    offset = data.index(b"".join(v.to_bytes(4, "little") for v in row(i))) + 40
    data[offset:offset + 64] = bytes(b ^ 0xFF for b in data[offset:offset + 64])
    tokens.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns))
    return offset


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(store, "CRC_BLOCK", BLOCK)


def test_entry_json_holds_a_crc32_per_block_of_tokens_arrow(tmp_path, small_blocks):
    entry = build_or_load(str(tmp_path), "sft", "k", build_rows())
    tokens = pathlib.Path(entry.path, "tokens.arrow")
    size = tokens.stat().st_size
    assert size > 3 * BLOCK
    assert json.loads(pathlib.Path(entry.path, "entry.json").read_text()) == {
        "rows": 200, "bytes": size, "block_bytes": BLOCK, "crc32": block_crcs(tokens, BLOCK)}
    # A finished entry holds no owner.json and, until its first use, no verified.json.
    assert sorted(os.listdir(entry.path)) == ["entry.json", "stats.json", "tokens.arrow"]


def test_overwritten_bytes_are_found_on_first_use_and_the_entry_rebuilt(tmp_path, small_blocks, monkeypatch):
    entry = build_or_load(str(tmp_path), "sft", "k", build_rows())
    tokens = pathlib.Path(entry.path, "tokens.arrow")
    recorded = json.loads(pathlib.Path(entry.path, "entry.json").read_text())["crc32"]
    original = tokens.read_bytes()
    offset = overwrite_row(tokens, 100)
    assert offset // BLOCK == (offset + 63) // BLOCK  # one block damaged
    block = offset // BLOCK
    start, end, blocks = block * BLOCK, (block + 1) * BLOCK - 1, len(recorded)
    actual = block_crcs(tokens, BLOCK)[block]

    lines: list[str] = []
    monkeypatch.setattr(store, "say", lines.append)  # what build_or_load says
    again = build_or_load(str(tmp_path), "sft", "k", build_rows())
    assert lines == [f"lmforge: the cache entry {entry.path} is damaged (tokens.arrow is damaged in bytes "
                     f"{start:,}-{end:,} (block {block + 1} of {blocks}): crc32 {actual}, entry.json records "
                     f"{recorded[block]}); rebuilding it"]
    assert again.path == entry.path and tokens.read_bytes() == original


def test_checksums_are_read_on_build_on_first_use_and_when_tokens_arrow_changes(tmp_path, small_blocks, monkeypatch):
    reads: list[str] = []
    real = store._block_crcs

    def counted(path: str, block: int):
        reads.append(os.path.basename(os.path.dirname(path)))
        return real(path, block)

    monkeypatch.setattr(store, "_block_crcs", counted)
    entry = build_or_load(str(tmp_path), "sft", "k", build_rows())
    assert len(reads) == 2  # written, then compared before the rename
    build_or_load(str(tmp_path), "sft", "k", must_not_build)
    assert len(reads) == 3  # the first use
    marker = json.loads(pathlib.Path(entry.path, "verified.json").read_text())
    tokens = pathlib.Path(entry.path, "tokens.arrow")
    assert marker == {"bytes": tokens.stat().st_size, "mtime_ns": tokens.stat().st_mtime_ns}
    build_or_load(str(tmp_path), "sft", "k", must_not_build)
    assert len(reads) == 3  # later uses: sizes and rows only
    assert store.verify_entry(entry.path) == (tokens.stat().st_size, 200)
    assert len(reads) == 4  # --verify reads it whatever verified.json says
    os.utime(tokens, ns=(0, tokens.stat().st_mtime_ns + 1))  # written since it was checked
    build_or_load(str(tmp_path), "sft", "k", must_not_build)
    assert len(reads) == 5


def test_an_entry_json_without_checksums_is_rebuilt(tmp_path, monkeypatch):
    entry = build_or_load(str(tmp_path), "sft", "k", build_rows())
    manifest = pathlib.Path(entry.path, "entry.json")
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                    if k in ("rows", "bytes")}))
    lines: list[str] = []
    monkeypatch.setattr(store, "say", lines.append)  # what build_or_load says
    build_or_load(str(tmp_path), "sft", "k", build_rows())
    assert lines == [f"lmforge: the cache entry {entry.path} is damaged (entry.json holds no crc32 checksums of "
                     "tokens.arrow); rebuilding it"]
    assert "crc32" in json.loads(manifest.read_text())


def test_prepare_verify_reads_the_entry_whole_and_rebuilds_a_damaged_one(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": f"question {i}"},
                                              {"role": "assistant", "content": f"answer {i}"}]} for i in range(5)]))
    argv = ["prepare", "--data_path", str(data), "--tokenizer_name", str(QWEN_TOKENIZER), "--template", "chatml"]
    assert cli(argv + ["--verify"]) == 0
    [entry] = (tmp_path / "lmforge-cache" / "sft").iterdir()  # conftest's $LMFORGE_CACHE
    tokens = entry / "tokens.arrow"
    size, original = tokens.stat().st_size, tokens.read_bytes()
    out = capsys.readouterr().out
    assert f"lmforge: verified {entry}: {size:,} bytes, 5 rows\n" in out

    # 64 bytes changed, the file's size and time kept: verified.json still vouches for it, so a
    # plain run checks sizes and rows only; --verify reads every byte.
    st = tokens.stat()
    data_bytes = bytearray(original)
    data_bytes[size // 2:size // 2 + 64] = bytes(b ^ 0xFF for b in data_bytes[size // 2:size // 2 + 64])
    tokens.write_bytes(bytes(data_bytes))
    os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cli(argv) == 0
    assert "damaged" not in capsys.readouterr().out
    actual = f"{zlib.crc32(bytes(data_bytes)):08x}"
    assert cli(argv + ["--verify"]) == 0
    # The damage, then (after the rebuild's progress line, timed) the rebuilt entry verified.
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("lmforge: tokenizing")]
    assert lines[:2] == [
        f"lmforge: the cache entry {entry} is damaged (tokens.arrow is damaged in bytes 0-{size - 1:,} (block 1 of "
        f"1): crc32 {actual}, entry.json records {zlib.crc32(original):08x}); rebuilding it",
        f"lmforge: verified {entry}: {size:,} bytes, 5 rows"]
    assert tokens.read_bytes() == original


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def leftover(parent: pathlib.Path, name: str, owner: dict | None = None, age: float = 0.0) -> None:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "tokens.arrow").write_bytes(b"\0" * 10)
    if owner is not None:
        (folder / "owner.json").write_text(json.dumps(owner))
    then = time.time() - age
    for path in (folder / "tokens.arrow", *([folder / "owner.json"] if owner else []), folder):
        os.utime(path, (then, then))


def test_leftovers_of_dead_builds_are_removed_and_no_others(tmp_path, monkeypatch):
    parent = tmp_path / "sft"
    host, gone = socket.gethostname(), dead_pid()
    leftover(parent, ".tmp-a-dead", {"pid": gone, "host": host})
    leftover(parent, ".tmp-b-live", {"pid": os.getpid(), "host": host})
    leftover(parent, ".tmp-c-other-host", {"pid": gone, "host": "another-host.invalid"})
    leftover(parent, ".tmp-d-no-owner-old", age=7200)
    leftover(parent, ".tmp-e-no-owner-recent", age=600)
    owners: list[dict] = []

    def build(tmp: str) -> dict:
        owners.append(json.loads(pathlib.Path(tmp, "owner.json").read_text()))
        return build_rows(3)(tmp)

    lines: list[str] = []
    monkeypatch.setattr(store, "say", lines.append)  # what build_or_load says
    entry = build_or_load(str(tmp_path), "sft", "k", build)
    assert lines == [f"lmforge: removed 2 leftover temporary cache directories of killed builds under {parent}: "
                     f".tmp-a-dead (its process {gone} is gone), .tmp-d-no-owner-old (no owner.json, unchanged "
                     "for 2.0 h)"]
    assert sorted(os.listdir(parent)) == [".tmp-b-live", ".tmp-c-other-host", ".tmp-e-no-owner-recent", "k"]
    assert owners == [{"pid": os.getpid(), "host": host}]
    assert "owner.json" not in os.listdir(entry.path)


def test_sigterm_stops_the_build_at_the_next_record_and_the_handler_is_restored():
    from lmforge.data.encode import Reading, Terminated

    def before(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, before)
    try:
        reading = Reading("record", "a.jsonl")
        records = reading.track(["a.jsonl"], lambda path: iter([{"n": 1}, {"n": 2}]))
        with pytest.raises(Terminated):
            with reading.stopped_by_sigterm():
                assert next(records) == {"n": 1}
                os.kill(os.getpid(), signal.SIGTERM)
                next(records)
                raise AssertionError("read on")
        assert signal.getsignal(signal.SIGTERM) is before
        assert reading.where() == "a.jsonl (1 record read)"

        # A SIGTERM once all was read still stops the build, when the body ends.
        reading = Reading("document", "a.txt")
        with pytest.raises(Terminated):
            with reading.stopped_by_sigterm():
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is before

        # Another thread: Python delivers signals to the main thread only; nothing is installed.
        seen = []

        def in_a_thread() -> None:
            with Reading("record", "a.jsonl").stopped_by_sigterm():
                seen.append(signal.getsignal(signal.SIGTERM))

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        assert seen == [before]
    finally:
        signal.signal(signal.SIGTERM, previous)


def spawned_workers(pid: int) -> list[int]:
    """The pool's worker processes among `pid`'s children."""
    children = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in pathlib.Path(f"/proc/{c}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_while_tokenizing_says_so_removes_the_build_and_its_workers(tmp_path):
    data = tmp_path / "big.jsonl"
    with data.open("w") as f:
        for i in range(200_000):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 8},
                                             {"role": "assistant", "content": f"answer {i} " * 8}]}) + "\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "prepare", "--data_path", str(data), "--tokenizer_name",
                             str(QWEN_TOKENIZER), "--template", "chatml", "--data_cache_dir", str(cache),
                             "--preprocessing_num_workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = spawned_workers(proc.pid)
        assert len(workers) == 2, proc.poll()
        assert [p.name for p in (cache / "sft").iterdir()][0].startswith(".tmp-")
        time.sleep(1)  # the workers are tokenizing
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, (out, err)
    assert re.fullmatch(rf"lmforge prepare: error: stopped by SIGTERM while tokenizing {re.escape(str(data))} "
                        r"\(\d{1,3}(,\d{3})* records read\); nothing was cached: the next run tokenizes again\n",
                        err), err
    assert os.listdir(cache / "sft") == []
    time.sleep(0.5)
    assert [w for w in workers if running(w)] == []


def test_a_data_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """A resumed run compares its data with the record and then keys the cache on the same
    digests: one read of each file, and a new one once the file changes."""
    import hashlib

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    made, sha256 = [], hashlib.sha256
    monkeypatch.setattr(store.hashlib, "sha256", lambda: made.append(1) or sha256())
    first = store.source_files([str(path)])
    assert store.source_files([str(path)]) == first and len(made) == 1
    path.write_text('{"text": "b"}\n')
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    changed = store.source_files([str(path)])
    assert len(made) == 2 and changed[0].sha256 == sha256(b'{"text": "b"}\n').hexdigest()
