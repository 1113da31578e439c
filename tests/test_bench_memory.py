"""bench/memory_peak.py's replay of the allocator's history, on a made-up trace: the peak, what
was older than the recording, the allocations live at the peak and who made them."""

from __future__ import annotations

import importlib.util
import os

from conftest import ROOT

spec = importlib.util.spec_from_file_location("memory_peak", ROOT / "bench" / "memory_peak.py")
memory_peak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_peak)

TORCH = os.path.join(os.sep, "venv", "site-packages", "torch", "nn", "functional.py")
INDUCTOR = os.path.join(os.sep, "tmp", "torchinductor_me", "ab", "cabc123.py")
LOSS = os.path.join(os.sep, "repo", "lmforge", "modeling", "loss.py")
MIB = 2**20


def alloc(addr: int, mib: int, *files: str) -> dict:
    return {"action": "alloc", "addr": addr, "size": mib * MIB,
            "frames": [{"filename": f, "line": 10 + i, "name": f"fn{i}"} for i, f in enumerate(files)]}


def free(addr: int, mib: int) -> dict:
    return {"action": "free_completed", "addr": addr, "size": mib * MIB, "frames": []}


def test_replay_finds_the_peak_and_what_was_live_then():
    trace = [
        alloc(1, 100, INDUCTOR, TORCH),          # an activation a compiled block keeps
        alloc(2, 300, TORCH, LOSS),              # a logits chunk, made through torch from lmforge's loss
        {"action": "free_requested", "addr": 2, "size": 300 * MIB},  # not yet given back: still counted
        alloc(3, 50, INDUCTOR),
        free(2, 300),
        free(99, 200),                           # allocated before the recording (an older gradient)
        alloc(4, 120, LOSS),                     # after the peak: not in it
        free(3, 50),
    ]
    peak, older, live = memory_peak.live_at_peak(trace, allocated_before=1000 * MIB)
    assert peak == (1000 + 100 + 300 + 50) * MIB
    assert older == 1000 * MIB  # the older block was freed only after the peak
    assert sorted(e["addr"] for e in live) == [1, 2, 3]

    lines = memory_peak.summary(trace, 1000 * MIB)
    assert lines[0].startswith(f"peak {1450 * MIB / 2**30:.2f} GiB")
    assert f"{1000 * MIB / 2**30:.2f} GiB" in lines[0]
    assert "modeling/loss.py:11 fn1" in lines[1] and f"{300 * MIB / 2**30:7.3f} GiB" in lines[1]
    assert "compiled blocks" in lines[2] and "     2 blocks" in lines[2]


def test_frees_of_older_blocks_before_the_peak_lower_the_older_part():
    trace = [free(7, 400), alloc(1, 100, LOSS)]
    peak, older, live = memory_peak.live_at_peak(trace, allocated_before=1000 * MIB)
    assert (peak, older, [e["addr"] for e in live]) == (1000 * MIB, 1000 * MIB, [])  # the start was the peak
    trace = [free(7, 400), alloc(1, 500, LOSS)]
    peak, older, live = memory_peak.live_at_peak(trace, allocated_before=1000 * MIB)
    assert (peak, older, [e["addr"] for e in live]) == (1100 * MIB, 600 * MIB, [1])


def test_where_charges_torch_internal_frames_to_their_caller():
    assert memory_peak.where([{"filename": TORCH, "line": 1, "name": "linear"},
                              {"filename": LOSS, "line": 5, "name": "forward"}]) == "modeling/loss.py:5 forward"
    assert memory_peak.where([]) == "no stack recorded"
