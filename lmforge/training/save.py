"""The final save: the trained model (or adapter), its tokenizer and a generation config that stops
at the end of a turn, written whole under a staging name and moved into the output directory
only once complete; a full disk is said in one line."""

from __future__ import annotations

import os
import shutil

import transformers
from transformers.trainer import TRAINER_STATE_NAME

from lmforge.errors import LmforgeError, is_disk_full
from lmforge.modeling.load import is_peft
from lmforge.training.run_record import update_run_info
from lmforge.training.verify_save import check_saved_model

BASE_CONFIG = "lmforge_base_config.json"
FINAL_STAGING = ".lmforge-final"  # the final save, before it is moved into the output directory


def set_generation_defaults(model, tokenizer, end_of_turn_id: int | None) -> None:
    """Make generation stop at the template's end-of-turn token (and the tokenizer's EOS)."""
    stop = [t for t in (end_of_turn_id, tokenizer.eos_token_id) if t is not None]
    stop = list(dict.fromkeys(stop))
    gen = model.generation_config
    if stop:
        gen.eos_token_id = stop if len(stop) > 1 else stop[0]
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def save_final(trainer: transformers.Trainer, tokenizer, end_of_turn_id: int | None, output_dir: str) -> str | None:
    """Write the trained model (safetensors; for LoRA the adapter, which
    `PeftModel.from_pretrained(base, out)` loads), its tokenizer with the chat template it was
    trained with, a generation config that stops at the end of a turn, and trainer_state.json.

    Complete or absent: everything is written under OUTPUT_DIR/.lmforge-final first and moved
    into OUTPUT_DIR only once all of it is written (a failure, a full disk say, removes the
    staging directory and leaves no partial model behind); trainer_state.json comes last, so
    its presence says the final output is whole.

    Under FSDP and ZeRO-3 each process holds a shard: the weights are gathered into one whole
    model (or adapter) written by the main process, and what was written is checked against the
    model (`lmforge.training.verify_save`) before it is moved in. Returns that check's summary on the main process."""
    model = trainer.model
    unwrapped = getattr(model, "module", model)
    unwrapped.config.use_cache = True
    set_generation_defaults(unwrapped, tokenizer, end_of_turn_id)
    staging = os.path.join(output_dir, FINAL_STAGING)
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    summary = None
    try:
        if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
            # The Trainer writes no model for a sharded state-dict type (its checkpoints are then
            # DCP shards); the final output must be whole whatever the checkpoints are.
            state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank
            if trainer.args.should_save:
                trainer._save(staging, state_dict=state_dict)
        else:
            # DDP: the main process writes its copy. FSDP (full state dict): gathered to the main
            # process. ZeRO-3: the 16-bit weights gathered (stage3_gather_16bit_weights_on_model_save),
            # for LoRA the adapter's only.
            trainer.save_model(staging)
        if main:
            summary = check_saved_model(staging, unwrapped)
            tokenizer.save_pretrained(staging)
            if is_peft(unwrapped):
                unwrapped.generation_config.save_pretrained(staging)
                # The base config as trained (RoPE scaling, use_cache): `lmforge merge` builds the
                # merged model with it, so the merged model computes what the adapter run did.
                unwrapped.get_base_model().config.to_json_file(os.path.join(staging, BASE_CONFIG))
        trainer.accelerator.wait_for_everyone()  # every rank's part of the save is on disk
    except BaseException as e:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise disk_full_error(output_dir, "the final model", e) or e
        raise
    if main:
        saved = sorted(os.listdir(staging))
        move_entries(staging, output_dir)
        # What the final save wrote, so that starting over can set exactly this aside.
        update_run_info(output_dir, final_save=saved + [TRAINER_STATE_NAME])
    trainer.save_state()
    return summary


DISK_NEARLY_FULL = 64 * 2**20  # bytes: less than this left, a failed write is taken for a full disk


def disk_full_error(directory: str, what: str, error: BaseException) -> LmforgeError | None:
    """The one-line error for a save that failed because the disk is full, or None when the
    disk has room (the failure is something else, raised as it is). A full disk surfaces in many
    forms: OSError ENOSPC from Python's writes, a RuntimeError from torch.save's zip writer
    ("unexpected pos ...") or from safetensors, with no errno to tell; the free space does."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if not is_disk_full(error) and free >= DISK_NEARLY_FULL:
        return None
    what = getattr(error, "filename", None) or what
    return LmforgeError(
        f"no space left on the disk of {directory} while writing {what} ({free / 2**20:.1f} MiB free); nothing "
        "half-written is used (a checkpoint is complete or absent). Free space or point --output_dir at a larger "
        "disk, then run the same command again to resume")


def move_entries(staging: str, output_dir: str) -> None:
    """Move every entry of `staging` into `output_dir` (replacing what is there), then remove it."""
    for name in sorted(os.listdir(staging)):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
