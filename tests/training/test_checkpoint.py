"""Checkpoint integrity on tiny checkpoints built by hand (no training):

  - the manifest records each file's size and CRC-32, equal to zlib's over the whole file, also
    when a file is checksummed in parallel ranges; each byte is read once;
  - a flipped byte (same size) passes the cheap size check but not the resume check, which names
    the file; resume then falls back to the older good checkpoint and says why;
  - a manifest of another format, or without checksums, does not count as complete;
  - rotation keeps to the cheap check: it never reads a file's contents.
"""

from __future__ import annotations

import json
import os
import random
import zlib

import pytest

from lmforge.training import checkpoint
from lmforge.training.checkpoint import (
    MANIFEST_NAME,
    checkpoint_problem,
    last_complete_checkpoint,
    rotate,
    write_manifest,
)


def make_checkpoint(run_dir, step: int, seed: int = 0) -> str:
    """checkpoint-`step` with a few files of the usual names (one in a shard subdirectory, one
    empty), random contents, and its manifest."""
    rng = random.Random(seed * 1000 + step)
    path = run_dir / f"checkpoint-{step}"
    (path / "global_step").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(rng.randbytes(5000))
    (path / "optimizer.pt").write_bytes(rng.randbytes(12345))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "global_step" / "shard_0.pt").write_bytes(rng.randbytes(777))
    (path / "global_step" / "empty").write_bytes(b"")
    write_manifest(str(path), step)
    return str(path)


def crc32_of(path: str) -> str:
    with open(path, "rb") as f:
        return f"{zlib.crc32(f.read()):08x}"


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)


@pytest.fixture(params=["one range per file", "many small ranges"])
def chunking(request, monkeypatch):
    """The real sizes, and ranges and reads small enough that every test file is cut into many
    ranges (the CRCs of the ranges are then combined)."""
    if request.param == "many small ranges":
        monkeypatch.setattr(checkpoint, "CHUNK", 1000)
        monkeypatch.setattr(checkpoint, "BLOCK", 300)


def test_manifest_lists_sizes_and_checksums_equal_to_zlibs(tmp_path, chunking):
    path = make_checkpoint(tmp_path, 3)
    manifest = read_manifest(path)
    on_disk = {}
    for root, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                on_disk[rel] = os.path.join(root, name)
    assert manifest["format"] == 2 and manifest["step"] == 3
    assert manifest["files"] == {rel: os.path.getsize(full) for rel, full in on_disk.items()}
    assert manifest["crc32"] == {rel: crc32_of(full) for rel, full in on_disk.items()}
    assert manifest["crc32"]["global_step/empty"] == "00000000"
    assert checkpoint_problem(path, verify=True) is None


def test_write_manifest_reads_each_byte_once(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK", 1000)
    read = []
    real = checkpoint.crc_range

    def recording(full, offset, length):
        read.append((os.path.basename(full), offset, length))
        return real(full, offset, length)

    monkeypatch.setattr(checkpoint, "crc_range", recording)
    path = make_checkpoint(tmp_path, 1)
    files = read_manifest(path)["files"]
    for rel, size in files.items():
        ranges = sorted((offset, length) for name, offset, length in read if name == os.path.basename(rel))
        # The ranges of a file tile it exactly: no byte is read twice, none is skipped.
        assert [offset for offset, _ in ranges] == list(range(0, size, 1000))
        assert sum(length for _, length in ranges) == size


def test_combined_crc_equals_the_crc_of_the_concatenation():
    rng = random.Random(7)
    for _ in range(200):
        a, b = rng.randbytes(rng.randrange(0, 2000)), rng.randbytes(rng.randrange(0, 2000))
        assert checkpoint._crc32_shift(zlib.crc32(a), len(b)) ^ zlib.crc32(b) == zlib.crc32(a + b)


@pytest.mark.parametrize("name, offset", [("model.safetensors", 0), ("model.safetensors", 4999),
                                          ("global_step/shard_0.pt", 400), ("optimizer.pt", 6000)])
def test_a_flipped_byte_is_caught_on_resume_with_the_file_named(tmp_path, chunking, name, offset):
    path = make_checkpoint(tmp_path, 4)
    expected = read_manifest(path)["crc32"][name]
    flip_byte(os.path.join(path, name), offset)
    # The size check (rotation, messages) cannot see it: same size.
    assert checkpoint_problem(path) is None
    actual = crc32_of(os.path.join(path, name))
    assert actual != expected
    assert checkpoint_problem(path, verify=True) == \
        f"{name} is damaged: its crc32 is {actual}, its manifest says {expected}"


def test_sizes_are_checked_before_any_file_is_read(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path, 4)
    flip_byte(os.path.join(path, "model.safetensors"), 10)
    with open(os.path.join(path, "optimizer.pt"), "r+b") as f:
        f.truncate(100)

    def no_reads(*_):
        raise AssertionError("a file was read")

    monkeypatch.setattr(checkpoint, "_checksums", no_reads)
    assert checkpoint_problem(path, verify=True) == "optimizer.pt has 100 bytes, its manifest says 12345"


def test_resume_falls_back_to_the_older_good_checkpoint_and_says_why(tmp_path, capsys):
    older = make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    expected = read_manifest(newest)["crc32"]["model.safetensors"]
    flip_byte(os.path.join(newest, "model.safetensors"), 1234)
    actual = crc32_of(os.path.join(newest, "model.safetensors"))

    capsys.readouterr()
    assert last_complete_checkpoint(str(tmp_path), verify=True) == older
    assert capsys.readouterr().out.splitlines() == [
        f"lmforge: ignoring incomplete checkpoint {newest}: model.safetensors is damaged: "
        f"its crc32 is {actual}, its manifest says {expected}"]
    # Without verify (the other callers: messages, reports) the size check alone decides.
    assert last_complete_checkpoint(str(tmp_path)) == newest
    assert capsys.readouterr().out == ""


def test_rotation_never_reads_file_contents(tmp_path, monkeypatch):
    paths = [make_checkpoint(tmp_path, step) for step in (1, 2, 3)]

    def no_reads(*_):
        raise AssertionError("rotation read a file")

    monkeypatch.setattr(checkpoint, "_checksums", no_reads)
    assert rotate(str(tmp_path), 2, [paths[-1]]) == [paths[0]]


@pytest.mark.parametrize("edit", [lambda m: m.update(format=1), lambda m: m.pop("crc32")])
def test_a_manifest_of_another_format_or_without_checksums_is_not_complete(tmp_path, edit):
    path = make_checkpoint(tmp_path, 6)
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(os.path.join(path, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    assert checkpoint_problem(path).startswith(f"unreadable {MANIFEST_NAME}")


@pytest.mark.parametrize("change, reason", [
    (lambda m: m.pop("crc32"), f"unreadable {MANIFEST_NAME} (KeyError)"),
    (lambda m: m.update(crc32=["not", "a", "map"]), f"unreadable {MANIFEST_NAME} (TypeError)"),
    (lambda m: m["crc32"].pop("optimizer.pt"), "its manifest has no crc32 for optimizer.pt"),
])
def test_a_format_2_manifest_without_its_checksums_is_not_trusted(tmp_path, change, reason):
    path = make_checkpoint(tmp_path, 5)
    manifest = read_manifest(path)
    change(manifest)
    with open(os.path.join(path, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    assert checkpoint_problem(path, verify=True) == reason


def test_the_run_resumes_from_a_verified_checkpoint(tmp_path, capsys):
    """`resolve_resume`, which every method calls before training, checks the checksums: a flipped
    byte in the newest checkpoint sends the run to the older one."""
    from lmforge.training.resume import resolve_resume

    older = make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    flip_byte(os.path.join(newest, "optimizer.pt"), 10)
    assert resolve_resume(str(tmp_path), resume=True, overwrite=False) == older
    assert f"ignoring incomplete checkpoint {newest}: optimizer.pt is damaged" in capsys.readouterr().out
