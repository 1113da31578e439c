"""CUDA graphs over whole micro-steps: the forward pass, the loss and the backward pass of a
batch recorded once per batch shape, then replayed with one launch.

Why lmforge does this itself: a small model's step can be bound by the host. LoRA DPO on the
Qwen2.5-0.5B shape launches thousands of kernels a step (LoRA adds matmuls to every linear layer,
in the policy's pass and the reference's), and the GPU idles for most of the step while the host
launches them (measured: docs/bench_results.md, 2026-12-03, CUDA graphs over DPO's micro-steps).
torch.compile's own CUDA graphs (mode reduce-overhead) cover each compiled region separately and
could not take their fast path with 24 regions and pending backwards (measured:
docs/bench_results.md, 2026-11-23, fused loss, compiled blocks); the Trainer's loop as a whole
cannot be captured (it reads values on the host). What can be captured is what lies between two
host reads: one micro-step, `compute_loss` and the backward, which is where the kernels are.

How: the first `warmup` batches of each shape run eagerly (they compile, pick kernels and
allocate as a normal step does, and train as one); the next one is captured into a graph, its
inputs copied into static buffers, and replayed. The trained parameters' gradients are fixed
buffers that the graph adds into; when the Trainer drops them (zero_grad sets them to None)
they are zeroed and given back before the next replay. Outputs (the loss, a method's metrics)
are copied out after each replay. All graphs share one memory pool: they never run at once,
and each one's outputs stay held by it.

What it asks of a step: inputs of a fixed shape per key (the collator pads lengths to buckets;
`bucketed` pads the labelled positions and the documents' offsets, whose counts change with
every batch), no read of a device value on the host inside `compute_loss` or the backward, one
process. Measured for DPO. SFT's packed rows take the same path (`--cuda_graphs True`): the
padding is exact on CPU tests and a GPU test trains as eager steps do, but that step already
keeps the GPU busy, so graphs gained nothing there and stay off for packed rows (measured:
docs/bench_results.md, 2026-12-03 (afternoon), CUDA graphs over packed SFT rows).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.data.collate import CU_SEQLENS, LABEL_POSITIONS

Key = tuple
PADDED_POSITIONS = "lmforge_padded_positions"  # LABEL_POSITIONS ends with positions past the batch
POSITION_BUCKET = 1024  # a graphed step's labelled positions: padded to a multiple of this
OFFSET_BUCKET = 64  # a graphed step's document offsets (varlen): padded to a multiple of this


def graphs_unsupported(args, cuda: bool) -> str | None:
    """Why a run cannot record its micro-steps as CUDA graphs (None: it can); `cuda`: a CUDA GPU
    is there."""
    if not cuda or args.use_cpu:
        return "CUDA graphs need a CUDA GPU"
    if args.world_size > 1:
        return "one process only (the gradients' reduction between processes is not recorded)"
    if args.deepspeed or args.fsdp:
        return "not with DeepSpeed or FSDP (their hooks run on the host during the backward)"
    if args.fp16:
        return "not with --fp16's loss scaler (it reads the gradients on the host)"
    if args.gradient_checkpointing:
        return "not with gradient checkpointing (it sets the GPU's random state during the backward)"
    return None


def bucketed(inputs: dict) -> dict:
    """A batch whose sizes that change from batch to batch are padded to buckets, so that few
    graphs cover a run: the labelled positions (to a multiple of POSITION_BUCKET, with positions
    past the batch, which the losses count as nothing: `PADDED_POSITIONS` says so) and the
    documents' offsets (to a multiple of OFFSET_BUCKET, repeating the last: empty sequences)."""
    out = dict(inputs)
    positions = inputs.get(LABEL_POSITIONS)
    if positions is not None and positions.numel():
        pad = -positions.numel() % POSITION_BUCKET
        end = torch.full((pad,), inputs["labels"].numel(), dtype=positions.dtype, device=positions.device)
        out[LABEL_POSITIONS], out[PADDED_POSITIONS] = torch.cat([positions, end]), True
    offsets = inputs.get(CU_SEQLENS)
    if offsets is not None:
        out[CU_SEQLENS] = torch.cat([offsets, offsets[-1:].expand(-offsets.numel() % OFFSET_BUCKET)])
    return out


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def batch_key(inputs: dict) -> Key:
    """What makes two batches replayable by one graph: their tensors' names, shapes and dtypes
    (and any other value, which the capture bakes in)."""
    return tuple(sorted((k, (tuple(v.shape), v.dtype, v.device)) if torch.is_tensor(v) else (k, v)
                        for k, v in inputs.items()))


class StepGraphs:
    """Runs micro-steps through CUDA graphs, one per batch key (`batch_key`).

    `params` are the trained parameters, whose gradients the step's backward adds to. `step`
    (given to `run`) takes the inputs and returns a dict of output tensors; it runs the backward
    itself. Up to `limit` graphs are kept; batches of further shapes run eagerly."""

    def __init__(self, params: list[torch.Tensor], warmup: int = 1, limit: int = 32):
        self.params = params
        self.warmup = warmup
        self.limit = limit
        self.graphs: dict[Key, _Graph] = {}
        self.seen: Counter = Counter()
        self.grads: list[torch.Tensor] | None = None
        self.pool = None
        self.replays = 0
        self.eager = 0
        self.side: torch.cuda.Stream | None = None

    def _attach_grads(self) -> None:
        """Give every trained parameter its fixed gradient buffer, holding the gradient so far
        (zero where the Trainer dropped it)."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            for p, g in zip(self.params, self.grads):
                p.grad = g
            return
        dropped = []
        for p, g in zip(self.params, self.grads):
            if p.grad is g:
                continue
            if p.grad is None:
                dropped.append(g)
            else:  # someone replaced it: keep its value
                g.copy_(p.grad)
            p.grad = g
        if dropped:
            torch._foreach_zero_(dropped)

    def run(self, inputs: dict, step: Callable[[dict], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        key = batch_key(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.seen[key] <= self.warmup or len(self.graphs) >= self.limit:
                self.eager += 1
                return self._eager(inputs, step)
            entry = self._capture(key, inputs, step)
        else:
            for name, buffer in entry.inputs.items():
                buffer.copy_(inputs[name], non_blocking=True)
        self._attach_grads()
        entry.graph.replay()
        self.replays += 1
        return {k: v.clone() for k, v in entry.outputs.items()}

    def _eager(self, inputs: dict, step) -> dict[str, torch.Tensor]:
        # On a side stream, as CUDA graphs want their warm-up: what runs lazily once (cuBLAS
        # handles, autograd's device threads) is then set up outside any capture.
        if self.side is None:
            self.side = torch.cuda.Stream()
        side = self.side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = step(dict(inputs))
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, key: Key, inputs: dict, step) -> _Graph:
        self._attach_grads()
        static = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
        args = {**inputs, **static}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = step(dict(args))
        entry = self.graphs[key] = _Graph(graph, static, outputs)
        return entry
