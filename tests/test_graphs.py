"""lmforge.graphs: what makes two batches one graph, and the gradient buffers a recorded
backward adds into (kept, zeroed where the Trainer dropped them, refilled where it replaced
them). The recording itself needs a CUDA GPU: tests/test_dpo.py's GPU test trains with it."""

from __future__ import annotations

import torch

from lmforge.graphs import StepGraphs, batch_key


def test_batch_key_separates_shapes_dtypes_and_plain_values():
    a = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "n": 2}
    assert batch_key(a) == batch_key({"n": 2, "input_ids": torch.ones(2, 8, dtype=torch.long)})
    assert batch_key(a) != batch_key({**a, "input_ids": torch.zeros(2, 16, dtype=torch.long)})
    assert batch_key(a) != batch_key({**a, "input_ids": torch.zeros(2, 8, dtype=torch.int32)})
    assert batch_key(a) != batch_key({**a, "n": 1})


def test_gradient_buffers_keep_their_storage_and_the_gradient_so_far():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    params[0].grad = torch.full((3,), 5.0)  # an eager step's gradient: adopted as the buffer
    graphs = StepGraphs(params)
    graphs._attach_grads()
    buffers = [p.grad for p in params]
    assert buffers[0].tolist() == [5.0] * 3 and torch.equal(buffers[1], torch.zeros(2, 2))

    buffers[1].add_(7.0)
    params[0].grad = None  # the Trainer's zero_grad(set_to_none=True)
    params[1].grad = torch.full((2, 2), 3.0)  # a gradient put there by someone else
    graphs._attach_grads()
    assert all(p.grad is b for p, b in zip(params, buffers))  # the storage a graph writes into
    assert torch.equal(buffers[0], torch.zeros(3)) and torch.equal(buffers[1], torch.full((2, 2), 3.0))
