"""The final save holds the whole trained model: every parameter, each at its full shape.

Sharding engines fail here quietly in the field: a ZeRO-3 or FSDP save that holds one rank's
partition (tensors of shape [0] or a fraction of their rows), an adapter saved from
partitioned LoRA weights, a save with half the tensors. lmforge gathers the model the way each
engine provides (train.save_final) and then reads back the headers of what was written (no
tensor is loaded) and compares them with the model it trained.
"""

from __future__ import annotations

import os
from typing import Iterable

from lmforge.errors import LmforgeError


def full_shape(param) -> tuple[int, ...]:
    """A parameter's shape in the model, whatever this process holds of it."""
    ds_shape = getattr(param, "ds_shape", None)  # DeepSpeed ZeRO-3: the tensor is this rank's partition
    if ds_shape is not None:
        return tuple(ds_shape)
    return tuple(param.shape)  # FSDP2's DTensor reports its global shape


def saved_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in the safetensors files of `directory` (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _peft_saved_name(name: str, adapters: Iterable[str]) -> str:
    """The key PEFT writes for parameter `name`: without `modules_to_save.` and the adapter name."""
    name = name.replace("modules_to_save.", "")
    for adapter in adapters:
        name = name.replace(f".{adapter}", "")
    return name


def expected_parameters(model) -> list[tuple[list[str], tuple[int, ...]]]:
    """Each parameter the save must hold, once (tied weights share one entry), with every name it
    may be saved under and its full shape. A PEFT model saves its adapter: the trainable
    parameters, under PEFT's names."""
    adapters = list(getattr(model, "peft_config", {}) or {})
    groups: dict[int, tuple[list[str], tuple[int, ...]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if adapters:
            if not param.requires_grad:
                continue
            name = _peft_saved_name(name, adapters)
        names, _ = groups.setdefault(id(param), ([], full_shape(param)))
        names.append(name)
    return list(groups.values())


def _tied_output_names(model) -> set[str]:
    """Names of the output head's weight when the config ties it to the input embedding:
    save_pretrained drops that copy, even where an engine holds it as a separate tensor."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return set()
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is head}


def loaded_through_tie(model, missing_keys: Iterable[str]) -> set[str]:
    """The `missing_keys` of a state-dict load into `model` that name a parameter shared with a
    key the checkpoint did hold (tied weights: the output head that is the input embedding), so
    loading that key loaded them too. A missing key with no loaded twin is not among them."""
    missing = set(missing_keys)
    if not missing:
        return set()
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name for shared in names.values() if len(shared) > 1 and not missing.issuperset(shared)
            for name in shared if name in missing}


def check_saved_model(directory: str, model) -> str:
    """Raise an LmforgeError naming what is missing or partial in the weights saved in `directory`
    for `model` (the in-memory, possibly sharded model); return a one-line summary when whole."""
    saved = saved_shapes(directory)
    if not saved:
        if any(n.endswith(".bin") for n in os.listdir(directory)):
            return "weights saved as .bin, not checked"
        raise LmforgeError(f"{directory}: no weights were written (no .safetensors file); with DeepSpeed ZeRO-3 "
                           "set stage3_gather_16bit_weights_on_model_save true (the shipped configs do)")
    tied = _tied_output_names(model)
    missing: list[str] = []
    partial: list[str] = []
    values = 0
    for names, shape in expected_parameters(model):
        found = [n for n in names if n in saved]
        if not found:
            if not tied.intersection(names):
                missing.append(names[0])
            continue
        for name in found:
            if saved[name] != shape:
                partial.append(f"{name} {list(saved[name])} (the model's is {list(shape)})")
        size = 1
        for dim in shape:
            size *= dim
        values += size
    if partial or missing:
        problems = ([f"{len(partial)} partial tensors: {'; '.join(partial[:3])}"] if partial else []) + \
                   ([f"{len(missing)} missing: {', '.join(missing[:3])}"] if missing else [])
        raise LmforgeError(f"{directory}: the saved weights are not the whole model ({'; '.join(problems)}); "
                           "the save kept a shard of the sharded model")
    return f"{len(saved)} tensors, {values:,} parameters, each at its full shape"
