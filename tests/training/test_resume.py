"""Crashes and resume on a tiny CPU run (fp32, packing on, gradient accumulation 2, attention
dropout on so the RNG state matters, several epochs so resumes land in epochs after the first):

  - SIGKILL at seeded random moments (a step's log line plus a random delay) and once inside a
    checkpoint write; each time the same command resumes; the final weights are bitwise those of
    the uninterrupted run and so is every logged step (loss, grad norm, learning rate);
  - SIGTERM writes a checkpoint at the next step boundary and exits 143; the rerun finishes
    with the uninterrupted run's weights;
  - incomplete checkpoints (a killed save's staging directory, no manifest, a truncated or
    missing file) are skipped or removed with a message; with save_total_limit=1 a corrupt
    newest checkpoint never costs the good one;
  - SIGINT stops like SIGTERM (exit status 130), and a second one stops at once.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmforge.cli import main as cli
from lmforge.config import TrainingArguments
from lmforge.data.collate import PaddedCollator
from lmforge.training.checkpoint import (
    MANIFEST_NAME,
    STAGING_DIR,
    checkpoint_problem,
    find_checkpoints,
    last_complete_checkpoint,
    rotate,
    write_manifest,
)
from lmforge.training.resume import resolve_resume
from lmforge.training.run import train_and_save

from conftest import DUMMY_CONVERSATIONS, SHARED_DATA

pytestmark = pytest.mark.e2e  # see the markers in pyproject.toml

MAX_STEPS = 24
SAVE_STEPS = 3
# With the 512-token tokenizer, 50 records pack into 33 rows of up to 256 tokens: 17 batches of
# 2, so 9 optimizer steps an epoch (the last one a single micro-batch) and 24 steps cross two
# epoch boundaries.
RECORDS = 50
TINY_QWEN = {
    "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 512,
    "tie_word_embeddings": True, "attention_dropout": 0.1,
}
LOSS_LINE = re.compile(r"^lmforge: step \d+/")
RESUMED = re.compile(r"lmforge: resuming from (\S+checkpoint-(\d+))")
HOOKS = str(pathlib.Path(__file__).resolve().parents[1] / "hooks.py")  # the test callbacks' entry


@dataclass
class Setup:
    config: str
    tokenizer: str
    data: str
    cache: str
    baseline: str


def argv(setup: Setup, out: str, hooks: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """`lmforge sft`; with `hooks` (tests/hooks.py options: `--pause_save STEP:SECONDS`) through
    tests/hooks.py, which runs the same command with those test callbacks."""
    entry = [HOOKS, *hooks] if hooks else ["-m", "lmforge"]
    return [sys.executable, *entry, "sft", "--config_name", setup.config,
            "--tokenizer_name", setup.tokenizer, "--data_path", setup.data, "--output_dir", out,
            "--model_max_length", "256", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--learning_rate", "1e-3", "--warmup_steps", "2", "--max_steps", str(MAX_STEPS),
            "--save_steps", str(SAVE_STEPS), "--logging_steps", "1", "--seed", "7", "--report_to", "none",
            "--disable_tqdm", "True", "--dataloader_pin_memory", "False", *extra]


@dataclass
class Run:
    returncode: int
    log: str

    @property
    def resumed_from(self) -> int:
        m = RESUMED.search(self.log)
        return int(m.group(2)) if m else 0

    @property
    def last_logged_step(self) -> int:
        return self.resumed_from + sum(1 for line in self.log.splitlines() if LOSS_LINE.match(line))


def run(setup: Setup, out: str, stop: Optional[Callable[[Run], Optional[float]]] = None,
        sig: int = signal.SIGKILL, hooks: Sequence[str] = (), extra: Sequence[str] = ()) -> Run:
    """Run the command (with the test callbacks `hooks`, see `argv`); `stop` sees the log so far
    after every line and returns a delay after which `sig` is sent (or None to keep going)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_CACHE": setup.cache}
    proc = subprocess.Popen(argv(setup, out, hooks, extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines: list[str] = []
    timer = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if stop is not None and timer is None:
                delay = stop(Run(0, "".join(lines)))
                if delay is not None:
                    timer = threading.Timer(delay, proc.send_signal, (sig,))
                    timer.start()
        proc.wait()
    finally:
        watchdog.cancel()
    return Run(proc.returncode, "".join(lines))


def logged_steps(out: str) -> list[tuple]:
    """(step, loss, grad_norm, learning_rate, epoch) of every logged step, from trainer_state.json."""
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return [(h["step"], h["loss"], h["grad_norm"], h["learning_rate"], h["epoch"]) for h in history if "loss" in h]


def assert_same_weights(out: str, reference: str) -> None:
    got = load_file(os.path.join(out, "model.safetensors"))
    want = load_file(os.path.join(reference, "model.safetensors"))
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"weights differ from the uninterrupted run: {different}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("resume")
    config, data, tokenizer = root / "tiny.json", root / "data.json", str(root / "tok")
    config.write_text(json.dumps(TINY_QWEN))
    data.write_text(json.dumps(json.loads(DUMMY_CONVERSATIONS.read_text())[:RECORDS]))
    # A 512-token vocabulary keeps a step at tens of milliseconds on a CPU (Qwen's 152k-token
    # output layer would make it a second).
    assert cli(["tokenizer", "train", "--train_files", str(SHARED_DATA / "pretrain_text" / "tinyshakespeare.txt"),
                "--vocab_size", "512", "--output_dir", tokenizer]) == 0
    s = Setup(str(config), tokenizer, str(data), str(root / "cache"), str(root / "uninterrupted"))
    done = run(s, s.baseline)
    assert done.returncode == 0, done.log
    assert "packing: 50 records into 33 rows" in done.log, done.log  # the epoch shape described above
    assert [step for step, *_ in logged_steps(s.baseline)] == list(range(1, MAX_STEPS + 1))
    return s


def newest_step(out: str) -> int:
    newest = last_complete_checkpoint(out, quiet=True)
    return int(newest.rsplit("-", 1)[1]) if newest else 0


def stop_after_step(step: int, delay: float) -> Callable[[Run], Optional[float]]:
    """Signal `delay` seconds after step `step` is logged (or after the first step a resumed run
    logs, when it resumed past `step`). A step of this run takes tens of milliseconds (the first
    few of a process up to a second), so a delay below 0.1 s lands inside one of the next steps
    or inside the save after the step."""
    return lambda r: delay if r.last_logged_step >= max(step, r.resumed_from + 1) else None


def test_sigkill_at_random_moments_resumes_exactly(setup, tmp_path):
    out = str(tmp_path / "out")
    rng = random.Random(20261123)
    # Three kills at seeded random moments: after a random step's log line plus a random delay.
    # Each killed run has at least 8 steps to go.
    plan = [(step, round(rng.uniform(0, 0.08), 3)) for step in sorted(rng.sample(range(2, MAX_STEPS - 8), 3))]
    expected_resume, leftover = 0, None
    for i, (step, delay) in enumerate(plan):
        killed = run(setup, out, stop_after_step(step, delay))
        assert killed.returncode == -signal.SIGKILL, f"plan {plan}, kill {i}: the run was not killed\n{killed.log}"
        assert killed.resumed_from == expected_resume, killed.log
        if leftover:
            assert f"lmforge: removing {leftover}, left by a save that did not finish" in killed.log
            leftover = None
        # Whenever the kill came, every checkpoint-N on disk is complete.
        assert all(checkpoint_problem(path) is None for _, path in find_checkpoints(out)), f"plan {plan}, kill {i}"
        expected_resume = newest_step(out)
        assert expected_resume >= killed.resumed_from
        print(f"kill {i}: {delay} s after step {step}: the run had resumed from step {killed.resumed_from}, "
              f"logged step {killed.last_logged_step}, left checkpoint-{expected_resume} as the newest")
        if i == 0:
            # Once inside a checkpoint write, deterministically: the save of the next checkpoint
            # pauses after its files are written and before its manifest, and is killed there.
            at = (expected_resume // SAVE_STEPS + 1) * SAVE_STEPS
            paused = run(setup, out, lambda r: 0.0 if "pausing 60 s inside the save" in r.log else None,
                         hooks=("--pause_save", f"{at}:60"))
            assert paused.returncode == -signal.SIGKILL, paused.log
            staged = os.path.join(out, STAGING_DIR, f"checkpoint-{at}")
            assert os.path.isfile(os.path.join(staged, "model.safetensors"))
            assert not os.path.exists(os.path.join(staged, MANIFEST_NAME))
            assert not os.path.exists(os.path.join(out, f"checkpoint-{at}"))
            assert newest_step(out) == expected_resume
            leftover = staged
    final = run(setup, out)
    assert final.returncode == 0, final.log
    assert final.resumed_from == expected_resume, final.log
    assert logged_steps(out) == logged_steps(setup.baseline), f"plan {plan}"
    assert_same_weights(out, setup.baseline)


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_matches(setup, tmp_path):
    out = str(tmp_path / "out")
    # The signal comes right after step 4's log line, so inside step 5: the run stops at the end
    # of step 5 (on a slow machine a little later), not a save step (3, 6, ...).
    stopped = run(setup, out, stop_after_step(4, 0.0), sig=signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.log
    m = re.search(r"stopped by SIGTERM at step (\d+), checkpoint written to (\S+checkpoint-(\d+));", stopped.log)
    assert m, stopped.log
    step = int(m.group(1))
    assert m.group(3) == str(step) and 5 <= step < MAX_STEPS
    assert checkpoint_problem(m.group(2)) is None
    assert not os.path.exists(os.path.join(out, "model.safetensors")), "a stopped run wrote a final model"
    rerun = run(setup, out)
    assert rerun.returncode == 0, rerun.log
    assert rerun.resumed_from == step
    assert logged_steps(out) == logged_steps(setup.baseline)
    assert_same_weights(out, setup.baseline)


# ---- incomplete checkpoints, in-process on a smaller model ------------------------------------


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
    on_disk = {name: os.path.getsize(os.path.join(newest, name))
               for name in os.listdir(newest) if name != MANIFEST_NAME}
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
            f.write('{"format": 2, "step": 4, "fil')
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
    import lmforge.training.step as step_module

    def checked_rotate(run_dir, limit, protected):
        deleted = rotate(run_dir, limit, protected)
        assert last_complete_checkpoint(run_dir, quiet=True) is not None
        return deleted

    monkeypatch.setattr(step_module, "rotate", checked_rotate)
    capsys.readouterr()
    tiny_run(out, 8, save_steps=1, save_total_limit=1)
    log = capsys.readouterr().out
    assert f"lmforge: ignoring incomplete checkpoint {corrupt}: optimizer.pt has 100 bytes" in log
    assert f"lmforge: replacing {corrupt} (optimizer.pt has 100 bytes" in log
    assert [os.path.basename(p) for _, p in find_checkpoints(out)] == ["checkpoint-8"]
    assert checkpoint_problem(os.path.join(out, "checkpoint-8")) is None


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
    import lmforge.training.run as run_module

    class Signalled(run_module.Trainer):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [callback]
            super().__init__(*a, **k)

    monkeypatch.setattr(run_module, "Trainer", Signalled)


def test_sigint_stops_with_a_checkpoint_and_restores_the_handler(tmp_path, monkeypatch):
    from lmforge.training.guards import TrainingStopped

    out = str(tmp_path / "out")
    before = signal.getsignal(signal.SIGINT)
    with_callback(monkeypatch, SignalAt(3, signal.SIGINT))
    expected = r"stopped by SIGINT at step 3, checkpoint written to .*checkpoint-3;"
    with pytest.raises(TrainingStopped, match=expected) as e:
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


def test_rerun_of_a_finished_command_changes_nothing(setup, tmp_path):
    """The same command line again over its finished run (here a copy of it): recognised, left as
    it is, exit 0; no step past --max_steps, no new checkpoint."""
    out = tmp_path / "out"
    shutil.copytree(setup.baseline, out)
    weights = (out / "model.safetensors").read_bytes()
    again = run(setup, str(out))
    assert again.returncode == 0, again.log
    assert (f"lmforge: {out} already holds the result of this command (trained to step {MAX_STEPS} of {MAX_STEPS}, "
            "saved); nothing to do") in again.log
    assert "resuming" not in again.log and (out / "model.safetensors").read_bytes() == weights
    assert newest_step(str(out)) == MAX_STEPS


def test_run_killed_during_its_final_save_redoes_only_the_save(setup, tmp_path):
    """Killed after its last checkpoint, before the final save was whole: the rerun writes the
    final save from that checkpoint, without training a step past the end."""
    out = tmp_path / "out"
    shutil.copytree(setup.baseline, out)
    for entry in out.iterdir():  # what a kill during the final save leaves: the checkpoints, the run record
        if not entry.name.startswith("checkpoint-") and entry.name != "lmforge_run.json":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    again = run(setup, str(out))
    assert again.returncode == 0, again.log
    assert f"checkpoint-{MAX_STEPS} is this run's last step; writing its final save, without training" in again.log
    assert not any(LOSS_LINE.match(line) for line in again.log.splitlines()) and newest_step(str(out)) == MAX_STEPS
    assert_same_weights(str(out), setup.baseline)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS


def interrupted_copy(setup: Setup, out) -> None:
    """The uninterrupted run's checkpoints and run record, without its final save."""
    shutil.copytree(setup.baseline, out)
    for entry in out.iterdir():
        if not entry.name.startswith("checkpoint-") and entry.name != "lmforge_run.json":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def test_resume_applies_a_changed_learning_rate_and_refuses_a_changed_seed(setup, tmp_path):
    """Resume says which flags differ: a new --learning_rate (and a longer --max_steps) apply from
    the resumed step, the rate written into the restored optimizer and schedule; a changed --seed
    (the data order, dropout) is refused before anything loads."""
    out = tmp_path / "out"
    interrupted_copy(setup, out)
    refused = run(setup, str(out), extra=("--seed", "8"))
    assert refused.returncode == 2
    assert (f"resuming from {out / f'checkpoint-{MAX_STEPS}'} with changed flags that shape the data, the model or "
            "the batches it was trained on (--seed 7 → 8)") in refused.log
    longer = MAX_STEPS + 4
    resumed = run(setup, str(out), extra=("--learning_rate", "5e-4", "--max_steps", str(longer)))
    assert resumed.returncode == 0, resumed.log
    assert ("lmforge: resuming with changed flags, applied from the resumed step: --learning_rate 0.001 → 0.0005, "
            f"--max_steps {MAX_STEPS} → {longer}") in resumed.log
    rates = {step: lr for step, _, _, lr, _ in logged_steps(str(out))}
    warmup = 2  # --warmup_steps: the linear schedule decays from there to 0 at the last step
    for step in range(MAX_STEPS + 1, longer + 1):  # the rate logged at a step is the one it used
        assert rates[step] == pytest.approx(5e-4 * (longer - step + 1) / (longer - warmup)), step


def test_resume_from_a_chosen_checkpoint_sets_the_later_ones_aside(setup, tmp_path):
    """--resume_from_checkpoint (what the non-finite guard's advice names): the run continues from
    that checkpoint, exactly; the later checkpoints are kept aside, never resumed from again."""
    out = tmp_path / "out"
    interrupted_copy(setup, out)
    chosen = out / "checkpoint-12"
    resumed = run(setup, str(out), extra=("--resume_from_checkpoint", str(chosen)))
    assert resumed.returncode == 0, resumed.log
    aside = out / "abandoned-after-checkpoint-12"
    assert f"lmforge: resuming from {chosen}: the 4 later checkpoint(s) moved to {aside}" in resumed.log
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-15", "checkpoint-18", "checkpoint-21",
                                                       "checkpoint-24"]
    assert_same_weights(str(out), setup.baseline)


# ---------------------------------------------------------------------------------------------
# An output directory holds one run
# ---------------------------------------------------------------------------------------------


def test_starting_over_sets_the_previous_run_aside(setup, tmp_path):
    """A finished run in OUT, then `--resume False --overwrite_output_dir True` with other steps,
    killed after its first checkpoint, then the same command without --resume False: the old
    run (checkpoints, final save, records) is in previous-run-1, the rerun resumes the new
    run's checkpoint, and ends with the weights of that command run uninterrupted."""
    out = tmp_path / "out"
    shutil.copytree(setup.baseline, out)
    fresh = ("--max_steps", "6", "--save_total_limit", "2", "--overwrite_output_dir", "True")
    killed = run(setup, str(out), stop=stop_after_step(4, 0.0), extra=(*fresh, "--resume", "False"))
    assert killed.returncode == -signal.SIGKILL, killed.log
    aside = out / "previous-run-1"
    assert (f"lmforge: starting over in {out}: the run it held (8 checkpoint folder(s), its final save and its "
            f"records) moved to {aside}") in killed.log
    assert sorted(p.name for p in aside.iterdir() if p.name.startswith("checkpoint-")) == sorted(
        f"checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert (aside / "model.safetensors").read_bytes() == (pathlib.Path(setup.baseline) / "model.safetensors").read_bytes()
    assert {"trainer_state.json", "lmforge_run.json", "config.json"} <= {p.name for p in aside.iterdir()}
    again = run(setup, str(out), extra=fresh)
    assert again.returncode == 0, again.log
    assert again.resumed_from == 3, again.log
    reference = tmp_path / "reference"
    assert run(setup, str(reference), extra=fresh).returncode == 0
    assert_same_weights(str(out), str(reference))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert newest_step(str(aside)) == MAX_STEPS  # the old run is kept whole


def test_a_second_run_into_one_output_directory_is_refused_and_a_dead_ones_lock_taken_over(setup, tmp_path):
    from lmforge.training.run_lock import LOCK_NAME, RunLock

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = RunLock(str(out), "lmforge sft --output_dir out")
        lock.holder = lock.holder.__class__(holder.pid, lock.holder.host, None, 1.0e9, "lmforge sft --output_dir out")
        lock.acquire()  # as the live process `holder` would have
        refused = run(setup, str(out))
        assert refused.returncode == 2
        assert (f"lmforge sft: error: --output_dir {out} is in use by another lmforge run (process {holder.pid} on "
                f"{lock.holder.host}, started ") in refused.log
        assert "wait for it to end or choose another --output_dir" in refused.log
        assert not (out / "lmforge_run.json").exists() and (out / LOCK_NAME).exists()
    finally:
        lock.release()
        holder.kill()
        holder.wait()
    lock.acquire()  # the holder is gone now: its lock is left behind, stale
    lock._stop.set()
    taken = run(setup, str(out), extra=("--max_steps", "2"))
    assert taken.returncode == 0, taken.log
    assert f"lmforge: took over the lock of {out}, left by a run that is gone (process {holder.pid} on" in taken.log
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_resume_compares_the_data_not_its_path(setup, tmp_path):
    """The same data under another path resumes; data edited in place is refused in one line naming
    the file, unless --resume_changed_data True (the change then said and recorded)."""
    out = tmp_path / "out"
    interrupted_copy(setup, out)
    moved = tmp_path / "elsewhere.json"
    shutil.copy(setup.data, moved)
    same = run(setup, str(out), extra=("--data_path", str(moved)))
    assert same.returncode == 0, same.log
    assert same.resumed_from == MAX_STEPS and "changed flags" not in same.log
    interrupted_copy(setup, out2 := tmp_path / "out2")
    records = json.loads(moved.read_text())
    moved.write_text(json.dumps(records[:40]))
    refused = run(setup, str(out2), extra=("--data_path", str(moved)))
    assert refused.returncode == 2
    assert (f"resuming from {out2 / f'checkpoint-{MAX_STEPS}'}: {moved} (it was {setup.data}) is not the training "
            "data the run started with: ") in refused.log
    assert "pass --resume_changed_data True to go on with this data" in refused.log
    longer = ("--max_steps", str(MAX_STEPS + 2))
    went_on = run(setup, str(out2), extra=("--data_path", str(moved), "--resume_changed_data", "True", *longer))
    assert went_on.returncode == 0, went_on.log
    assert "lmforge: resuming on changed data (--resume_changed_data True): " in went_on.log
    info = json.loads((out2 / "lmforge_run.json").read_text())
    assert info["resumed_on_changed_data"][0].startswith(f"{moved} (it was {setup.data}) is not the training data")
    assert info["data"]["train"]["records"] == 40
    report = (out2 / "report.md").read_text()
    assert f"- resumed on changed data (--resume_changed_data True): {moved} (it was {setup.data})" in report


def test_chat_on_a_run_without_a_final_save_uses_its_newest_checkpoint(setup, tmp_path, capsys):
    out = tmp_path / "out"
    interrupted_copy(setup, out)
    assert cli(["chat", str(out), "--prompt", "Hi", "--max_new_tokens", "4"]) == 0
    assert (f"lmforge chat: {out} has no final save (its run did not finish); using its newest complete checkpoint, "
            f"{out / f'checkpoint-{MAX_STEPS}'}") in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["chat", str(empty), "--prompt", "Hi"]) == 2
    assert f"{empty}: holds no saved model (no config.json) and no complete checkpoint-N" in capsys.readouterr().err


def test_replaced_and_leftover_checkpoints_are_named_for_what_they_are(two_checkpoints, tmp_path, capsys):
    """A complete checkpoint that failed its checksum, replaced by a new save of its step, is
    called damaged; a checkpoint a rotation was deleting when the run stopped is called that."""
    from lmforge.training.checkpoint import publish

    out = copy_of(two_checkpoints, tmp_path)
    newest = os.path.join(out, "checkpoint-4")
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    staged = os.path.join(out, STAGING_DIR, "checkpoint-4")
    shutil.copytree(os.path.join(out, "checkpoint-2"), staged)
    publish(staged, newest)
    assert f"lmforge: replacing {newest} (damaged, passed over when this run resumed: model.safetensors is damaged" \
        in capsys.readouterr().out
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(out, STAGING_DIR, "deleting-checkpoint-2"))
    resolve_resume(out, resume=True, overwrite=False)
    assert (f"lmforge: removing {os.path.join(out, STAGING_DIR, 'deleting-checkpoint-2')}, a checkpoint that "
            "rotation (or a replacement) was deleting when the run stopped") in capsys.readouterr().out


def test_a_final_save_that_did_not_finish_is_removed_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".lmforge-final").mkdir(parents=True)
    (out / ".lmforge-final" / "model.safetensors").write_bytes(b"x" * 10)  # a disk-full final save's leftover
    assert resolve_resume(str(out), resume=True, overwrite=False) is None
    assert f"lmforge: removing {out / '.lmforge-final'}, left by a final save that did not finish" \
        in capsys.readouterr().out
    assert not (out / ".lmforge-final").exists()


def test_float8_run_saves_ordinary_weights_and_resumes_exactly(setup, tmp_path):
    """--fp8 true (torchao emulates float8 matmuls on a CPU): the decoder blocks' linear layers
    are converted (and only those), the run trains to other weights than the plain one, saves
    the same tensors under the same names, and a SIGTERM + resume ends bitwise where the
    uninterrupted float8 run ends."""
    pytest.importorskip("torchao")
    fp8 = ["--fp8", "true", "--max_steps", "8"]
    reference = run(setup, str(tmp_path / "fp8"), extra=fp8)
    assert reference.returncode == 0, reference.log
    # 2 blocks x (q, k, v, o, gate, up, down); the tied head / embedding stays as it is
    assert "lmforge: speed: float8 (--fp8 true): 14 layers" in reference.log, reference.log
    got = load_file(os.path.join(tmp_path / "fp8", "model.safetensors"))
    plain = load_file(os.path.join(setup.baseline, "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    assert "quantization_config" not in json.loads((tmp_path / "fp8" / "config.json").read_text())

    assert_sigterm_and_resume_end_as(setup, str(tmp_path / "out"), str(tmp_path / "fp8"), fp8)


def assert_sigterm_and_resume_end_as(setup: Setup, out: str, reference: str, extra: Sequence[str]) -> None:
    """SIGTERM after step 4, then the same command: the weights and every logged step of
    `reference`, the uninterrupted run of the same flags."""
    stopped = run(setup, out, stop_after_step(4, 0.0), sig=signal.SIGTERM, extra=extra)
    assert stopped.returncode == 143, stopped.log
    resumed = run(setup, out, extra=extra)
    assert resumed.returncode == 0 and resumed.resumed_from >= 4, resumed.log
    assert_same_weights(out, reference)
    assert logged_steps(out) == logged_steps(reference)


def test_eight_bit_adamw_over_bf16_weights_resumes_exactly(setup, tmp_path):
    """--optim adamw_torch_8bit (torchao's AdamW8bit: moments in 8 bits) over bf16 weights: no
    fp32 masters, stochastic rounding turned on and said, bf16 weights saved, and a SIGTERM +
    resume ends bitwise where the uninterrupted run ends (the quantised moments and the rounding's
    random stream both come back)."""
    pytest.importorskip("torchao")
    flags = ["--optim", "adamw_torch_8bit", "--torch_dtype", "bfloat16", "--max_steps", "8"]
    reference = run(setup, str(tmp_path / "ref"), extra=flags)
    assert reference.returncode == 0, reference.log
    assert "lmforge: optimizer: --optim adamw_torch_8bit over bf16 weights: stochastic rounding" in reference.log
    assert "fp32 master weights" not in reference.log
    assert "adamw_torch_8bit (2 bytes of state a weight)" in reference.log
    saved = load_file(os.path.join(tmp_path / "ref", "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}

    assert_sigterm_and_resume_end_as(setup, str(tmp_path / "out"), str(tmp_path / "ref"), flags)
