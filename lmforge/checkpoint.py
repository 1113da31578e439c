"""Checkpoints that are complete or absent.

The HF Trainer writes `checkpoint-N` in place, file after file, so a run killed mid-save leaves
a directory that looks like a checkpoint and is not one; it also rotates checkpoints by age
without looking inside them, so with `save_total_limit` it can delete the only good one. Here:

  - a checkpoint is written under `OUTPUT_DIR/.lmforge-staging/checkpoint-N`; when every file is
    there (all ranks done), `lmforge_manifest.json` lists each file (recursively: DeepSpeed and
    FSDP shards are directories) with its size, everything is fsynced, and the directory is
    renamed to `OUTPUT_DIR/checkpoint-N` - a rename within one file system is atomic;
  - a checkpoint is complete when its manifest reads and every listed file has its size; resume
    takes the newest complete one and names each one it skips and why;
  - rotation counts complete checkpoints only, keeps the one just written and the best one, and
    never touches an incomplete one, so a corrupt newest checkpoint cannot push out a good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Iterable

MANIFEST_NAME = "lmforge_manifest.json"
MANIFEST_FORMAT = 1
STAGING_DIR = ".lmforge-staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

Log = Callable[[str], None]


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


def write_manifest(path: str, step: int) -> dict[str, int]:
    """List the checkpoint's files and sizes in `path`/lmforge_manifest.json, after flushing
    them; the manifest is the last file written into a checkpoint."""
    files = checkpoint_files(path)
    for rel in files:
        _fsync(os.path.join(path, rel))
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    target = os.path.join(path, MANIFEST_NAME)
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for root, _, _ in os.walk(path):  # the directory entries of those files
        _fsync(root)
    return files


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is complete."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST_NAME} (its save did not finish, or an older lmforge wrote it)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        step = manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
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
    return None


def checkpoint_is_complete(path: str) -> bool:
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


def last_complete_checkpoint(output_dir: str, log: Log = print_flushed) -> str | None:
    """The newest complete checkpoint; each newer one is reported with why it is skipped."""
    for _, path in reversed(find_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"lmforge: ignoring incomplete checkpoint {path}: {problem}")
    return None


def remove_staging_leftovers(output_dir: str, log: Log = print_flushed) -> None:
    """Delete what a killed save (or a killed rotation) left in the staging directory."""
    staging = os.path.join(output_dir, STAGING_DIR)
    if not os.path.isdir(staging):
        return
    for name in sorted(os.listdir(staging)):
        log(f"lmforge: removing {os.path.join(staging, name)}, left by a save that did not finish")
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


def publish(staged: str, final: str, log: Log = print_flushed) -> None:
    """Rename a finished staged checkpoint to its final name. A directory already there under
    that name is an incomplete checkpoint of an earlier attempt at this step (resume never starts
    before a complete one), and is replaced."""
    if os.path.exists(final):
        problem = checkpoint_problem(final)
        log(f"lmforge: replacing {final} ({problem or 'written by an earlier attempt at this step'})")
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
