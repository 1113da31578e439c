"""The run record, OUTPUT_DIR/lmforge_run.json: written when training starts (`write_run_info`:
the command, the key flags, the data statistics, the device), added to while the run goes on
(`update_run_info`: preflight figures, the final save's file list, the end's timings and peak
memory) and read by resume (the flags a checkpoint was trained with), by starting over (what a
final save wrote) and by the report. Standard library only, so that `lmforge report` reads it
without importing torch.
"""

from __future__ import annotations

import json
import os
import sys
import time

RUN_INFO = "lmforge_run.json"

# The flags a reader of a report needs to know what was trained and how, in this order; resume
# compares them with the flags the run was started with (`training.resume.resume_policy`).
KEY_FLAGS = (
    "model_name_or_path", "config_name", "tokenizer_name", "torch_dtype", "attn_implementation",
    "data_path", "eval_data_path", "train_files", "validation_files", "val_split", "template", "masking",
    "model_max_length", "block_size", "packing", "long_records", "pretrain_document_mask",
    "lora", "q_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "bf16", "fp16", "gradient_checkpointing", "deepspeed", "fsdp", "seed",
    "eval_strategy", "eval_steps", "logging_steps", "save_strategy", "save_steps",
)
LORA_ONLY = ("q_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def _plain(value: object) -> object:
    value = getattr(value, "value", value)  # enums
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def key_flags(*arg_objects: object) -> dict:
    """The KEY_FLAGS values of the parsed argument objects (the first that has each), leaving
    out unset ones and the LoRA settings of a run without LoRA."""
    out: dict = {}
    for name in KEY_FLAGS:
        owner = next((o for o in arg_objects if hasattr(o, name)), None)
        if owner is None:
            continue
        value = _plain(getattr(owner, name))
        if value is None or value == [] or value == "":
            continue
        out[name] = value
    if not out.get("lora"):
        for name in ("lora",) + LORA_ONLY:
            out.pop(name, None)
    return out


def read_run_info(run_dir: str) -> dict:
    """The run's record, or {} where it has none."""
    path = os.path.join(run_dir, RUN_INFO)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(run_dir: str, info: dict) -> None:
    """The whole record, written beside and renamed into place: a reader never sees half of it."""
    tmp = os.path.join(run_dir, f".{RUN_INFO}.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, default=str)
    os.replace(tmp, os.path.join(run_dir, RUN_INFO))


def write_run_info(output_dir: str, info: dict) -> None:
    """Start the record: the command line and `info`, replacing what an earlier run wrote."""
    os.makedirs(output_dir, exist_ok=True)
    _write(output_dir, {"argv": sys.argv, **info})


def update_run_info(run_dir: str, **fields) -> None:
    """Merge `fields` into lmforge_run.json (written whole, renamed into place)."""
    info = read_run_info(run_dir)
    info.update(fields)
    _write(run_dir, info)


def peak_memory_fields(device) -> dict[str, float]:
    """This process' peak memory: PyTorch's GPU allocations on a GPU, else the max RSS."""
    import resource

    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_gib": round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}


def record_end(run_dir: str, device) -> None:
    """The run's end: when it finished, its wall time and this process' peak memory."""
    info = read_run_info(run_dir)
    started = info.get("started")
    end = {"finished": time.time(), **peak_memory_fields(device)}
    if started:
        end["wall_seconds"] = round(end["finished"] - started, 1)
    update_run_info(run_dir, end=end)
