"""What lmforge adds around the engines it runs on several processes (DDP, FSDP2, DeepSpeed,
all through the Trainer / accelerate): the decoder layer class FSDP wraps, found from the
model, and the wait of the other processes while the first one tokenizes the data.

No sharding is done here; FSDP and DeepSpeed do it.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Iterator

import torch

from lmforge.errors import LmforgeError
from lmforge.logs import say


def _base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layer_classes(model) -> list[str]:
    """The names of the model's decoder layer classes: those of its `_no_split_modules` (the
    blocks transformers never splits across devices) that occur in it, in that order. Models
    list classes they may not hold (a vision tower's block, say); accelerate refuses a name it
    cannot find, so only those present are kept."""
    base = _base_model(model)
    present = {type(m).__name__ for m in base.modules()}
    declared = list(getattr(base, "_no_split_modules", None) or [])
    return [name for name in dict.fromkeys(declared) if name in present]


def check_layer_classes(model, given: list[str]) -> None:
    """Every class named by --fsdp_transformer_layer_cls_to_wrap is in the model."""
    base = _base_model(model)
    missing = [c for c in given if c not in {type(m).__name__ for m in base.modules()}]
    if missing:
        raise LmforgeError(
            f"--fsdp_transformer_layer_cls_to_wrap {','.join(given)}: the model ({type(base).__name__}) has no "
            f"{', '.join(missing)}; its decoder layer class is "
            f"{', '.join(decoder_layer_classes(model)) or 'not declared (no _no_split_modules)'}. "
            "Leave the flag out to use it")


def configure_fsdp_wrapping(model, args) -> list[str] | None:
    """With FSDP on: the layer classes it wraps, each instance its own unit (sharded, gathered
    for its forward and backward, freed after). `--fsdp_transformer_layer_cls_to_wrap` is
    checked against the model; without it the model's decoder layer classes are used. The
    choice goes into the arguments the Trainer builds accelerate's FSDP plugin from, before
    the Trainer exists. Returns the classes, or None when FSDP is off or wraps by another policy."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if not args.fsdp or plugin_args is None:
        # FSDP off (one process runs without it): a wrong class name is still named now, not
        # when the same command line runs under a launcher.
        if getattr(args, "fsdp_transformer_layer_cls_to_wrap", None):
            check_layer_classes(model, [c for c in args.fsdp_transformer_layer_cls_to_wrap.split(",") if c])
        return None
    if plugin_args.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        return None
    base = _base_model(model)
    given = plugin_args.get("transformer_cls_names_to_wrap")
    if isinstance(given, str):
        given = [c for c in given.split(",") if c]
    detected = decoder_layer_classes(model)
    if given:
        check_layer_classes(model, given)
        classes, source = list(given), "--fsdp_transformer_layer_cls_to_wrap"
    elif detected:
        classes, source = detected, "the model's _no_split_modules"
    else:
        raise LmforgeError(
            f"--fsdp: the model ({type(base).__name__}) declares no decoder layer class (_no_split_modules) to "
            "wrap; name it with --fsdp_transformer_layer_cls_to_wrap")
    plugin_args["transformer_cls_names_to_wrap"] = ",".join(classes)
    if isinstance(args.fsdp_config, dict):
        args.fsdp_config["transformer_layer_cls_to_wrap"] = list(classes)
    say(f"lmforge: FSDP wraps each {', '.join(classes)} (from {source})")
    return classes


def shards_weights(args) -> bool:
    """True when the parsed flags shard the model's weights over the processes (FSDP, ZeRO-3):
    a frozen reference copy would then be a whole model on every GPU."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    return bool(args.fsdp) or (ds_config is not None and ds_config.is_zero3())


def sharded_across_processes(model: torch.nn.Module) -> bool:
    """True when the model's weights are split over several processes (FSDP 1 or 2, DeepSpeed
    ZeRO-3), so that each forward gathers them from all: every process must then run the same
    forwards. transformers' `generate` infers that for ZeRO-3 and for models it sharded itself,
    not for a model accelerate prepared with FSDP2: lmforge says so explicitly."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed ZeRO-3's partitioned parameters


def _distributed(args) -> bool:
    return args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def local_main_first(args, timeout_s: float, what: str) -> Iterator[None]:
    """Run the block on the first process of each machine (local rank 0) first; the other
    processes enter it once that is done, when they find its result (the token cache) on disk.

    The wait is an all-reduce in a gloo group of its own whose timeout is `timeout_s`
    (--prepare_timeout), not the process group's (--ddp_timeout, 30 minutes by default, which
    a large corpus can take to tokenize: NCCL would abort the waiting ranks). Gloo waits on
    the CPU, so a waiting rank holds no GPU work. The first process also reports through it
    whether the block failed: the others then stop with an error instead of waiting out the
    timeout or redoing the failing work."""
    if not _distributed(args):
        yield
        return
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    first = args.local_process_index == 0
    if not first:
        _wait_for_first(group, timeout_s, what)
        yield
        return
    try:
        yield
    except BaseException:
        _release(group, failed=True, what=what)
        raise
    if _release(group, failed=False, what=what):
        raise LmforgeError(f"{what} failed on another machine (in its first process); its error is in that log")


def _release(group, failed: bool, what: str) -> bool:
    """Lets the waiting processes go; True when the block failed on any machine."""
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
    try:
        _all_reduce_once(group, flag)
    except RuntimeError as e:  # the waiting processes gave up (their timeout) or went away
        if failed:
            return True  # the block's own error is the one to report
        raise LmforgeError(f"{what} finished, but the other processes had stopped waiting for it ({e}); their "
                           "output says why (for data that takes longer, raise --prepare_timeout)") from None
    return bool(flag.item())


def _all_reduce_once(group, flag: torch.Tensor) -> None:
    """The group's one collective, after which the group is destroyed whatever the outcome. A gloo
    group left alive until interpreter exit can abort the process there (SIGABRT, "terminate
    called without an active exception": a thread of gloo's still joinable when its owner is
    freed), turning a finished run or lmforge's error message into exit code 134. With a failed
    collective, and also with a successful one: 11 of 40 two-process runs aborted so on exit
    (torch 2.13, CPU), none once the group was destroyed."""
    try:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    finally:
        torch.distributed.destroy_process_group(group)


def _wait_for_first(group, timeout_s: float, what: str) -> None:
    flag = torch.tensor([0], dtype=torch.int32)
    try:
        _all_reduce_once(group, flag)
    except RuntimeError as e:  # gloo's timeout (and a peer that went away) surface as RuntimeError
        raise LmforgeError(
            f"waited {timeout_s:g} s for the first process of this machine to finish {what} ({e}); for data that "
            "takes longer, raise --prepare_timeout, or tokenize beforehand with `lmforge prepare`") from None
    if int(flag.item()):
        raise LmforgeError(f"{what} failed in the first process of a machine (local rank 0); its error is in "
                           "that process' output")
