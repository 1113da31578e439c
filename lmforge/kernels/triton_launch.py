"""What lmforge's Triton kernels (`loss_kernel`, `optim_kernel`) share: whether they can run
here, and the device a launch goes to."""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch


@functools.cache
def available() -> bool:
    """Whether the kernels can run here: a CUDA device and Triton."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def on(device: torch.device):
    """The context a launch runs in: Triton launches on the current CUDA device, so that one is
    made `device`; on a CPU (Triton's interpreter, TRITON_INTERPRET=1, in tests) nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
