"""Float8 training of the decoder blocks' linear layers, through torchao, where it measures faster.

Each linear layer inside a decoder block computes its three matmuls (forward, input gradient,
weight gradient) in float8 with one dynamic scale per tensor ("tensorwise", the faster of
torchao's recipes here: docs/bench_results.md), the weights themselves staying in their dtype:
the optimizer, the checkpoints and the saved model see ordinary weights, and there is no scaling
state to save, so resume is exact as before. The output head and the chunked loss stay in bf16
(a vocabulary-wide projection in float8 loses the logits' precision for little gain).

Float8 matmuls need a GPU of SM89 or newer (Ada, Hopper, Blackwell). They gain where the matmuls
are large enough to repay the casts: measured on one H100, linear stacks of the 0.5B shape
(hidden 896) ran 1.04x bf16, the 1B shape (2048) 1.22x, the 7B shape (3584) 1.46x. So `--fp8
auto` turns it on for full-parameter training in compiled blocks from a hidden size of
MIN_HIDDEN on; `--fp8 true` asks for it anyway (on a CPU torchao emulates it: slow, for tests).
"""

from __future__ import annotations

import importlib.util

import torch

RECIPE = "tensorwise"
# The smallest hidden size `auto` converts: the 1B shape's 2048 gained 1.22x, the 0.5B shape's
# 896 gained 4%, within the noise of a whole step.
MIN_HIDDEN = 2048
MIN_CAPABILITY = (8, 9)
CHOICES = ("auto", "true", "false")


def installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def choose(requested: str, *, capability: tuple[int, int] | None, torchao: bool, compiled: bool,
           engine: str | None, adapters: bool, hidden: int) -> tuple[bool, str]:
    """(float8 on, why). `capability`: the GPU's (None: no CUDA GPU); `torchao`: installed;
    `compiled`: blocks compiled; `engine`: DeepSpeed / FSDP or None; `adapters`: LoRA / QLoRA;
    `hidden`: the model's hidden size. `true` is refused with the reason where it cannot run."""
    from lmforge.errors import LmforgeError

    requested = str(requested).lower()
    if requested not in CHOICES:
        raise LmforgeError(f"--fp8 {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == "false":
        return False, "--fp8 false"
    cannot = ("torchao is not installed (pip install 'lmforge[hopper]')" if not torchao
              else f"{engine} keeps fp32 weights of its own" if engine
              else "LoRA / QLoRA: the base weights are frozen or 4-bit (not measured in float8)" if adapters
              else None)
    if requested == "true":
        if cannot:
            raise LmforgeError(f"--fp8 true cannot run here: {cannot}")
        return True, "--fp8 true"
    gpu = ("no CUDA GPU" if capability is None
           else f"SM{capability[0]}{capability[1]} has no float8 matmuls (SM89 or newer)"
           if tuple(capability) < MIN_CAPABILITY else None)
    why_not = (gpu or cannot or ("blocks not compiled (eager float8 casts cost more than they save)" if not compiled
                                 else None)
               or (f"hidden size {hidden} < {MIN_HIDDEN}: matmuls too small to repay the casts" if hidden < MIN_HIDDEN
                   else None))
    if why_not:
        return False, f"bf16 ({why_not}; --fp8 true: float8 anyway)"
    return True, (f"SM{capability[0]}{capability[1]}, hidden size {hidden}: float8 matmuls in the decoder blocks' "
                  f"linear layers, {RECIPE} scaling (--fp8 false: bf16)")


def _convertible(module: torch.nn.Module) -> bool:
    """A plain linear layer whose two dimensions float8 matmuls take (multiples of 16)."""
    if type(module) is not torch.nn.Linear:
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


def convert(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> int:
    """Float8 training for the linear layers inside `blocks` (the decoder blocks), in place,
    before the optimizer is made (the parameters are the same objects afterwards). Returns how
    many were converted. Compiled, they need room in dynamo's recompile limits
    (`lmforge.modeling.load.compile_settings`)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(RECIPE)
    converted = 0
    for block in blocks:
        before = sum(1 for m in block.modules() if _convertible(m))
        convert_to_float8_training(block, config=config, module_filter_fn=lambda m, _name: _convertible(m))
        converted += before
    return converted
