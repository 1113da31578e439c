"""Checkpoints that are complete or absent.

The HF Trainer writes `checkpoint-N` in place, file after file, so a run killed mid-save leaves
a directory that looks like a checkpoint and is not one; it also rotates checkpoints by age
without looking inside them, so with `save_total_limit` it can delete the only good one. Here:

  - a checkpoint is written under `OUTPUT_DIR/.lmforge-staging/checkpoint-N`; when every file is
    there (all ranks done), `lmforge_manifest.json` lists each file (recursively: DeepSpeed and
    FSDP shards are directories) with its size and CRC-32, everything is fsynced, and the
    directory is renamed to `OUTPUT_DIR/checkpoint-N` - a rename within one file system is atomic;
  - a checkpoint is complete when its manifest reads and every listed file has its size (cheap:
    rotation, messages); the checkpoint resume picks is also read whole and each file's CRC-32
    compared (`verify=True`), so a flipped byte of the same size is caught too. Resume takes the
    newest complete (and, verified, undamaged) one and names each one it skips and why;
  - rotation counts complete checkpoints only, keeps the one just written and the best one, and
    never touches an incomplete one, so a corrupt newest checkpoint cannot push out a good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from lmforge.logs import say

MANIFEST_NAME = "lmforge_manifest.json"
# "files" (relative path -> size) and "crc32" (relative path -> 8 hex digits), with "step".
MANIFEST_FORMAT = 2
# The checksum guards against accidental damage (bit rot, a bad copy, a short or garbled sync),
# not against tampering, so it is chosen for speed: zlib.crc32 is several times as fast as
# hashlib.blake2b and small next to a save (measured: docs/bench_results.md, 2026-12-02,
# checkpoint checksums). CRC-32 detects every burst error of up to 32 bits and misses random
# damage with probability 2^-32.
CHECKSUM = "crc32"
BLOCK = 4 << 20  # read size: 1, 4 and 8 MiB measured the same
CHUNK = 64 << 20  # a large file is checksummed in ranges of this size, in parallel
STAGING_DIR = ".lmforge-staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

def print_flushed(message: str) -> None:
    """stdout, flushed: a supervisor (or a test) watching the log sees it before a kill."""
    print(message, flush=True)


def checkpoint_files(path: str) -> dict[str, int]:
    """Size of every file under `path` (relative, '/'-separated), the manifest itself left out."""
    files: dict[str, int] = {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                files[rel] = os.path.getsize(full)
    return files


def _fsync(path: str) -> None:
    """Flush a file or a directory entry to disk: after a power cut, a renamed checkpoint then
    holds the data its manifest describes (a killed process loses nothing already written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data is still written
        pass
    finally:
        os.close(fd)


def _crc32_shift(crc: int, length: int) -> int:
    """`crc` multiplied by x^(8 * length) modulo the CRC-32 polynomial (zlib's crc32_combine
    core, which Python's zlib does not expose): crc32(a + b) is
    _crc32_shift(crc32(a), len(b)) ^ crc32(b)."""
    def multiply(a: int, b: int) -> int:  # a * b modulo the polynomial, bit-reflected as zlib's
        product, bit = 0, 1 << 31
        while a:
            if a & bit:
                product ^= b
                a ^= bit
            bit >>= 1
            b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
        return product

    power = 1 << 30  # x^1; squared k times it is x^(2^k)
    bits, result = length * 8, 1 << 31  # x^0
    while bits:
        if bits & 1:
            result = multiply(power, result)
        bits >>= 1
        power = multiply(power, power)
    return multiply(result, crc)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or a job
    scheduler's share, not the whole machine): what parallel checksums and tokenizing use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def crc_range(full: str, offset: int, length: int) -> tuple[int, int]:
    """(CRC-32, bytes read) of `length` bytes of a file from `offset`, read in BLOCK pieces (fewer
    where the file ends first). The one CRC reader of lmforge's files: checkpoints and token cache
    entries."""
    buf = bytearray(min(BLOCK, length))
    view = memoryview(buf)
    crc = done = 0
    with open(full, "rb", buffering=0) as f:
        f.seek(offset)
        while done < length:
            n = f.readinto(view[:min(BLOCK, length - done)])
            if not n:  # the file shrank meanwhile: the size check reports it
                break
            crc = zlib.crc32(view[:n], crc)  # releases the GIL: the ranges are read in parallel
            done += n
    return crc, done


def _checksums(path: str, rels: Iterable[str], fsync: bool = False) -> list[tuple[int, str]]:
    """(bytes read, CRC-32 as 8 hex digits) of each file, each read once. A checkpoint's time
    goes to a few large files (weights, optimizer state) and CRC-32 is CPU-bound, so files are
    cut into CHUNK ranges checksummed by several threads and their CRCs combined. With `fsync`,
    the files are flushed to disk meanwhile, from one more thread."""
    rels = list(rels)
    fulls = [os.path.join(path, rel) for rel in rels]
    ranges = [(i, offset, min(CHUNK, size - offset))
              for i, size in enumerate(os.path.getsize(full) for full in fulls)
              for offset in range(0, size, CHUNK)]
    with ThreadPoolExecutor(1) as flusher, ThreadPoolExecutor(max(1, min(8, usable_cores(), len(ranges)))) as pool:
        flushed = [flusher.submit(_fsync, full) for full in fulls] if fsync else []
        parts = list(pool.map(lambda r: crc_range(fulls[r[0]], r[1], r[2]), ranges))
        for future in flushed:
            future.result()
    crcs, sizes = [0] * len(rels), [0] * len(rels)
    for (i, _, _), (crc, done) in zip(ranges, parts):  # in file order, then offset order
        crcs[i] = _crc32_shift(crcs[i], done) ^ crc
        sizes[i] += done
    return [(size, f"{crc:08x}") for size, crc in zip(sizes, crcs)]


def write_manifest(path: str, step: int) -> dict[str, int]:
    """List the checkpoint's files, sizes and CRC-32s in `path`/lmforge_manifest.json, after
    flushing them (each file is read once, just after it was written, so mostly from the page
    cache); the manifest is the last file written into a checkpoint. Returns the sizes."""
    rels = list(checkpoint_files(path))
    read = _checksums(path, rels, fsync=True)
    files = {rel: size for rel, (size, _) in zip(rels, read)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files,
                CHECKSUM: {rel: crc for rel, (_, crc) in zip(rels, read)}}
    target = os.path.join(path, MANIFEST_NAME)
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for root, _, _ in os.walk(path):  # the directory entries of those files
        _fsync(root)
    return files


def checkpoint_problem(path: str, verify: bool = False) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is complete: the
    manifest reads and every listed file is there with its size. With `verify`, every file is
    also read whole and its CRC-32 compared with the manifest's."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST_NAME} (its save did not finish)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        step = manifest["step"]
        checksums = manifest[CHECKSUM]
        if manifest["format"] != MANIFEST_FORMAT or not isinstance(files, dict) or not isinstance(checksums, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST_NAME} ({e.__class__.__name__})"
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != step:
        return f"its manifest is for step {step}"
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{rel} has {actual} bytes, its manifest says {size}"
    if verify:
        # Sizes first (above, cheap for every file), then the reads.
        for rel in files:
            if rel not in checksums:
                return f"its manifest has no {CHECKSUM} for {rel}"
        for rel, (_, actual_crc) in zip(files, _checksums(path, files)):
            if actual_crc != checksums[rel]:
                return f"{rel} is damaged: its {CHECKSUM} is {actual_crc}, its manifest says {checksums[rel]}"
    return None


def checkpoint_is_complete(path: str) -> bool:
    """The cheap check (sizes): for rotation and messages, which must not read whole checkpoints."""
    return checkpoint_problem(path) is None


def find_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N directory, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str, verify: bool = False, quiet: bool = False) -> str | None:
    """The newest complete checkpoint; each newer one is reported with why it is skipped (not
    when `quiet`: a look that decides nothing, as the report's or chat's). With
    `verify` (resume: the checkpoint about to be loaded) the one returned has also had every
    file's checksum verified - a whole read of one checkpoint, plus of each damaged one skipped."""
    for _, path in reversed(find_checkpoints(output_dir)):
        problem = checkpoint_problem(path, verify=verify)
        if problem is None:
            return path
        if not quiet:
            say(f"lmforge: ignoring incomplete checkpoint {path}: {problem}")
    return None


def remove_staging_leftovers(output_dir: str) -> None:
    """Delete what a killed save (or a killed rotation) left in the staging directory."""
    staging = os.path.join(output_dir, STAGING_DIR)
    if not os.path.isdir(staging):
        return
    for name in sorted(os.listdir(staging)):
        # `remove_checkpoint` renames a checkpoint to deleting-NAME before it deletes it.
        why = ("a checkpoint that rotation (or a replacement) was deleting when the run stopped"
               if name.startswith("deleting-") else "left by a save that did not finish")
        say(f"lmforge: removing {os.path.join(staging, name)}, {why}")
    shutil.rmtree(staging, ignore_errors=True)


def staging_root(run_dir: str) -> str:
    return os.path.join(run_dir, STAGING_DIR)


def clear_staged(run_dir: str, name: str) -> str:
    """An empty staging place for checkpoint `name` (a leftover of a killed save is removed, so
    none of its files can end up in the new checkpoint's manifest)."""
    staged = os.path.join(staging_root(run_dir), name)
    if os.path.exists(staged):
        shutil.rmtree(staged)
    os.makedirs(staging_root(run_dir), exist_ok=True)
    return staged


def tidy_staging(run_dir: str) -> None:
    """Remove the staging directory once nothing is in it, so a finished save leaves no trace."""
    try:
        os.rmdir(staging_root(run_dir))
    except OSError:  # absent, or holding another rank's or an interrupted save
        pass


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint so that no half-deleted one stays under its name: it is renamed into
    the staging directory first (atomic), then deleted there."""
    run_dir = os.path.dirname(os.path.normpath(path))
    trash = os.path.join(staging_root(run_dir), "deleting-" + os.path.basename(os.path.normpath(path)))
    os.makedirs(staging_root(run_dir), exist_ok=True)
    if os.path.exists(trash):
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish(staged: str, final: str) -> None:
    """Rename a finished staged checkpoint to its final name. A directory already there under
    that name is one resume passed over: incomplete, or damaged (its checksums did not verify),
    and is replaced, saying which. Its files are read whole only where their sizes are right."""
    if os.path.exists(final):
        problem = checkpoint_problem(final)
        if problem is None:
            damage = checkpoint_problem(final, verify=True)
            problem = (f"damaged, passed over when this run resumed: {damage}" if damage
                       else "complete and undamaged, written by an earlier attempt at this step")
        say(f"lmforge: replacing {final} ({problem})")
        remove_checkpoint(final)
    os.rename(staged, final)
    _fsync(os.path.dirname(os.path.normpath(final)))


def rotate(run_dir: str, limit: int | None, protected: Iterable[str | None]) -> list[str]:
    """Delete the oldest complete checkpoints beyond `limit`, never one in `protected` (the one
    just written, the best one). Incomplete checkpoints are neither counted nor deleted: they
    can never be the reason a good one goes. Returns the deleted paths."""
    if not limit or limit <= 0:
        return []
    complete = [path for _, path in find_checkpoints(run_dir) if checkpoint_is_complete(path)]
    keep = {os.path.normpath(p) for p in protected if p} & {os.path.normpath(p) for p in complete}
    for path in reversed(complete):
        if len(keep) >= limit:
            break
        keep.add(os.path.normpath(path))
    deleted = [path for path in complete if os.path.normpath(path) not in keep]
    for path in deleted:
        remove_checkpoint(path)
    return deleted
