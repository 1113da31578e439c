"""What holds a training step's peak GPU memory: torch's allocator history over one step, replayed
to the moment memory peaked, and the allocations live then grouped by the code that made them.

`bench/cli_throughput.py --memory` records the step before its timed window and writes the
summary beside the row's results (ROW.memory.txt). peak_gib in the table says how much; this
says what, which the profile cannot: the profile counts time, and the compiler's partitioner
decides what a compiled block keeps for its backward without saying so.
"""

from __future__ import annotations

import os
from collections import defaultdict

# Frames from torch's own package are its machinery, not the code that asked for the memory.
TORCH_PACKAGE = f"{os.sep}torch{os.sep}"
GIB = 2**30


def where(frames: list[dict]) -> str:
    """The code an allocation is charged to: its innermost frame (torch records the innermost
    first) outside torch's own package. Inductor's generated code (a compiled block's forward or
    backward graph) is one group."""
    for frame in frames:
        name = frame.get("filename", "")
        if "torchinductor" in name:
            return "compiled blocks (Inductor's generated code: activations kept, workspaces)"
        if name and TORCH_PACKAGE not in name and not name.startswith("<"):
            parts = name.split(os.sep)
            short = os.sep.join(parts[-2:])
            return f"{short}:{frame.get('line', 0)} {frame.get('name', '')}"
    return frames[0].get("name", "?") if frames else "no stack recorded"


def live_at_peak(trace: list[dict], allocated_before: int) -> tuple[int, int, list[dict]]:
    """Replay the allocator's events from `allocated_before` bytes: the peak, how much of it was
    allocated before the recording (weights, optimizer state, anything older), and the recorded
    allocations live at that moment."""
    current, peak, peak_at = allocated_before, allocated_before, -1
    for i, event in enumerate(trace):
        if event.get("action") == "alloc":
            current += event["size"]
        elif event.get("action") == "free_completed":
            current -= event["size"]
        if current > peak:
            peak, peak_at = current, i
    live: dict[int, dict] = {}
    older = allocated_before
    for event in trace[:peak_at + 1]:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
        elif action == "free_completed" and live.pop(event["addr"], None) is None:
            older -= event["size"]
    return peak, older, list(live.values())


def summary(trace: list[dict], allocated_before: int, top: int = 20) -> list[str]:
    """Lines for ROW.memory.txt: the peak, the older part of it, and the rest by `where`."""
    peak, older, live = live_at_peak(trace, allocated_before)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live:
        group = groups[where(event.get("frames", []))]
        group[0] += event["size"]
        group[1] += 1
    lines = [f"peak {peak / GIB:.2f} GiB in the recorded step; allocated before it and live at the peak "
             f"(weights, optimizer state, ...): {older / GIB:.2f} GiB; allocated in the step and live then:"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    for name, (size, count) in ranked[:top]:
        lines.append(f"  {size / GIB:7.3f} GiB  {count:6d} blocks  {name}")
    rest = ranked[top:]
    if rest:
        lines.append(f"  {sum(s for _, (s, _) in rest) / GIB:7.3f} GiB  in {len(rest)} more places")
    return lines


def install_memory(step: int, path: str):
    """A Trainer callback that records the allocator's history over step `step` (counted as the
    Trainer's global_step before it) and writes `summary` to PATH.txt."""
    import torch
    import transformers

    class Memory(transformers.TrainerCallback):
        recording = False

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step and not self.recording:
                torch.cuda.synchronize()
                self.before = torch.cuda.memory_allocated()
                # Python stacks of allocations only: C++ frames would take minutes to symbolise.
                torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
                self.recording = True

        def on_step_end(self, args, state, control, **kwargs):
            if not self.recording or state.global_step != step + 1:
                return
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False
            trace = snapshot["device_traces"][torch.cuda.current_device()]
            with open(path + ".txt", "w") as f:
                f.write("\n".join(summary(trace, self.before)) + "\n")

    return Memory()
