"""Checkpoints are complete or absent: the manifest lists every file, incomplete checkpoints
(a killed save's staging directory, no manifest, a truncated or missing file) are skipped or
removed with a message, and with save_total_limit=1 a corrupt newest checkpoint never costs
the good one.

An epoch's row order does not depend on the global RNG (the Trainer's does without
accelerate's seedable sampler).

SIGINT stops a run at the next step with a checkpoint (exit status 130); a second one stops
at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
import transformers

from lmforge.checkpoint import (
    MANIFEST_NAME,
    STAGING_DIR,
    checkpoint_problem,
    find_checkpoints,
    rotate,
    write_manifest,
)
from lmforge.config import TrainingArguments
from lmforge.data.collate import PaddedCollator
from lmforge.train import last_complete_checkpoint, resolve_resume, train_and_save


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        ids = [(i * 7 + k) % 50 + 1 for k in range(12)]
        return {"input_ids": ids, "labels": ids}


def tiny_run(out: str, max_steps: int, **kwargs) -> None:
    import tokenizers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "x": 1}, unk_token="<pad>")),
        pad_token="<pad>")
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4, report_to="none",
                             disable_tqdm=True, dataloader_pin_memory=False, **kwargs)
    checkpoint = resolve_resume(out, resume=True, overwrite=False)
    train_and_save(model, args, tokenizer, Rows(), None, PaddedCollator(0), checkpoint, None, {})


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> str:
    """A finished run's output with checkpoint-2 and checkpoint-4 (both complete)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "out")
    tiny_run(out, 4, save_steps=2)
    return out


def copy_of(path: str, tmp_path) -> str:
    out = str(tmp_path / "out")
    shutil.copytree(path, out)
    return out


def test_checkpoint_manifest_lists_every_file(two_checkpoints):
    newest = os.path.join(two_checkpoints, "checkpoint-4")
    with open(os.path.join(newest, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    on_disk = {name: os.path.getsize(os.path.join(newest, name)) for name in os.listdir(newest) if name != MANIFEST_NAME}
    assert manifest["step"] == 4 and manifest["files"] == on_disk
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(on_disk)
    assert not os.path.exists(os.path.join(two_checkpoints, STAGING_DIR))


def test_sharded_checkpoint_directories_are_listed_recursively(tmp_path):
    """DeepSpeed / FSDP write their shards into subdirectories; a missing shard is caught."""
    ckpt = tmp_path / "checkpoint-7"
    (ckpt / "global_step7").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step7")
    (ckpt / "global_step7" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    (ckpt / "global_step7" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 12)
    files = write_manifest(str(ckpt), 7)
    assert files == {"latest": 12, "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt": 10,
                     "global_step7/zero_pp_rank_1_mp_rank_00_optim_states.pt": 12}
    assert checkpoint_problem(str(ckpt)) is None
    (ckpt / "global_step7" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(str(ckpt)) == "global_step7/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"


@pytest.mark.parametrize("damage, reason", [
    ("no_manifest", f"no {MANIFEST_NAME}"),
    ("truncated", "model.safetensors has {} bytes, its manifest says {}"),
    ("missing_file", "optimizer.pt is missing"),
    ("bad_manifest", f"unreadable {MANIFEST_NAME}"),
])
def test_incomplete_newest_checkpoint_is_skipped_with_a_message(two_checkpoints, tmp_path, capsys, damage, reason):
    out = copy_of(two_checkpoints, tmp_path)
    newest = os.path.join(out, "checkpoint-4")
    if damage == "no_manifest":
        os.remove(os.path.join(newest, MANIFEST_NAME))
    elif damage == "truncated":
        weights = os.path.join(newest, "model.safetensors")
        size = os.path.getsize(weights)
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
        reason = reason.format(size // 2, size)
    elif damage == "missing_file":
        os.remove(os.path.join(newest, "optimizer.pt"))
    else:
        with open(os.path.join(newest, MANIFEST_NAME), "w") as f:
            f.write('{"format": 1, "step": 4, "fil')
    assert resolve_resume(out, resume=True, overwrite=False) == os.path.join(out, "checkpoint-2")
    assert f"lmforge: ignoring incomplete checkpoint {newest}: {reason}" in capsys.readouterr().out


def test_leftover_of_a_killed_save_is_removed_with_a_message(two_checkpoints, tmp_path, capsys):
    out = copy_of(two_checkpoints, tmp_path)
    leftover = os.path.join(out, STAGING_DIR, "checkpoint-6")
    shutil.copytree(os.path.join(out, "checkpoint-4"), leftover)
    os.remove(os.path.join(leftover, MANIFEST_NAME))
    assert resolve_resume(out, resume=True, overwrite=False) == os.path.join(out, "checkpoint-4")
    assert f"lmforge: removing {leftover}, left by a save that did not finish" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, STAGING_DIR))


def test_killed_first_save_does_not_block_the_rerun(tmp_path, capsys):
    """A run killed while writing its first checkpoint leaves only its own files: the same
    command starts over instead of refusing a non-empty output directory."""
    out = tmp_path / "out"
    (out / STAGING_DIR / "checkpoint-2").mkdir(parents=True)
    (out / "lmforge_run.json").write_text("{}")
    assert resolve_resume(str(out), resume=True, overwrite=False) is None
    assert "left by a save that did not finish" in capsys.readouterr().out


def test_save_total_limit_1_never_deletes_the_good_checkpoint_for_a_corrupt_newer_one(two_checkpoints, tmp_path,
                                                                                        capsys, monkeypatch):
    out = copy_of(two_checkpoints, tmp_path)
    # checkpoint-6: complete once, then truncated (a disk that filled up, a bad copy).
    corrupt = os.path.join(out, "checkpoint-6")
    shutil.copytree(os.path.join(out, "checkpoint-4"), corrupt)
    with open(os.path.join(corrupt, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    manifest["step"] = 6
    with open(os.path.join(corrupt, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(corrupt, "optimizer.pt"), "r+b") as f:
        f.truncate(100)

    # The Trainer's own rotation (checkpoints within a second of each other are ordered by
    # number) keeps only the "newest", the corrupt one: this is what must not happen.
    from transformers.trainer_utils import rotate_checkpoints

    hf = copy_of(out, tmp_path / "hf")
    rotate_checkpoints(hf, save_total_limit=1, use_mtime=True)
    assert [os.path.basename(p) for _, p in find_checkpoints(hf)] == ["checkpoint-6"]

    # lmforge's rotation counts complete checkpoints only.
    assert rotate(out, 1, [None]) == [os.path.join(out, "checkpoint-2")]
    assert os.path.isdir(os.path.join(out, "checkpoint-4")) and os.path.isdir(corrupt)

    # Resuming with save_total_limit=1: the run resumes from checkpoint-4, and at every save a
    # complete checkpoint is on disk; the corrupt checkpoint-6 is replaced by a good one.
    import lmforge.train as train_module

    def checked_rotate(run_dir, limit, protected):
        deleted = rotate(run_dir, limit, protected)
        assert last_complete_checkpoint(run_dir, log=lambda _: None) is not None
        return deleted

    monkeypatch.setattr(train_module, "rotate", checked_rotate)
    capsys.readouterr()
    tiny_run(out, 8, save_steps=1, save_total_limit=1)
    log = capsys.readouterr().out
    assert f"lmforge: ignoring incomplete checkpoint {corrupt}: optimizer.pt has 100 bytes" in log
    assert f"lmforge: replacing {corrupt} (optimizer.pt has 100 bytes" in log
    assert [os.path.basename(p) for _, p in find_checkpoints(out)] == ["checkpoint-8"]
    assert checkpoint_problem(os.path.join(out, "checkpoint-8")) is None


# ---- data order ------------------------------------------------------------------------------


class Numbered(torch.utils.data.Dataset):
    """Row i holds token i + 1: a batch shows which rows it holds."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"input_ids": [i + 1] * 4, "labels": [i + 1] * 4}


def epoch_rows(trainer_cls, out: str, global_seed: int, skip_batches: int, seedable: bool) -> list[int]:
    """The rows epoch 1 reads, as `_run_epoch` reads them when it resumes after `skip_batches`
    batches; `global_seed` stands for whatever state the global RNG is in at that moment."""
    from accelerate import skip_first_batches

    config = transformers.AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, seed=3, report_to="none",
                             disable_tqdm=True, dataloader_pin_memory=False,
                             accelerator_config={"use_seedable_sampler": seedable})
    trainer = trainer_cls(model=transformers.AutoModelForCausalLM.from_config(config), args=args,
                          train_dataset=Numbered(), data_collator=PaddedCollator(0))
    loader = trainer.get_train_dataloader()
    torch.manual_seed(global_seed)
    if skip_batches:
        loader = skip_first_batches(loader, skip_batches)
    loader.set_epoch(1)
    return [int(row[0]) - 1 for batch in loader for row in batch["input_ids"]]


def test_epoch_order_does_not_depend_on_the_global_rng(tmp_path):
    from lmforge.train import Trainer

    out = str(tmp_path / "o")
    for seedable in (True, False):
        whole = epoch_rows(Trainer, out, 1, 0, seedable)
        assert sorted(whole) == list(range(10))
        assert epoch_rows(Trainer, out, 2, 2, seedable) == whole[4:]
    # The same permutation as accelerate's seedable sampler, the Trainer's default.
    assert epoch_rows(transformers.Trainer, out, 1, 0, True) == whole
    # Without that sampler, the Trainer's epoch order comes from the global RNG, so a run
    # resumed in epoch 1 would read other rows.
    assert epoch_rows(transformers.Trainer, out, 2, 2, False) != epoch_rows(transformers.Trainer, out, 1, 0, False)[4:]


# ---- SIGINT, in-process -----------------------------------------------------------------------


class SignalAt(transformers.TrainerCallback):
    """Sends this process `signum` (`times` times) during step `step`, as Ctrl-C would."""

    def __init__(self, step: int, signum: int, times: int = 1):
        self.step, self.signum, self.times = step, signum, times

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


def with_callback(monkeypatch, callback) -> None:
    import lmforge.train as train_module

    class Signalled(train_module.Trainer):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [callback]
            super().__init__(*a, **k)

    monkeypatch.setattr(train_module, "Trainer", Signalled)


def test_sigint_stops_with_a_checkpoint_and_restores_the_handler(tmp_path, monkeypatch):
    from lmforge.train import TrainingStopped

    out = str(tmp_path / "out")
    before = signal.getsignal(signal.SIGINT)
    with_callback(monkeypatch, SignalAt(3, signal.SIGINT))
    with pytest.raises(TrainingStopped, match=r"stopped by SIGINT at step 3, checkpoint written to .*checkpoint-3;") as e:
        tiny_run(out, 8, save_steps=5)
    assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert checkpoint_problem(os.path.join(out, "checkpoint-3")) is None
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_a_second_sigint_stops_at_once(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with_callback(monkeypatch, SignalAt(3, signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt):
        tiny_run(out, 8, save_steps=5)
    assert find_checkpoints(out) == []
