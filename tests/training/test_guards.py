"""The non-finite guard: a NaN gradient stops the run at that step, before the update, with
the last good checkpoint left as the newest one and no final model written."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from lmforge.config import TrainingArguments
from lmforge.data.collate import PaddedCollator
from lmforge.training.guards import NonFiniteGradients
from lmforge.training.run import train_and_save


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = [(i * 7 + k) % 50 + 1 for k in range(12)]
        return {"input_ids": ids, "labels": ids}


class PoisonAt(transformers.TrainerCallback):
    """Puts a NaN into one weight after `step` steps, as a blown-up update would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")  # used by every token


def test_nan_gradient_stops_before_the_update(tmp_path):
    config = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer(
        __import__("tokenizers").models.WordLevel({"<pad>": 0, "x": 1}, unk_token="<pad>")), pad_token="<pad>")
    out = str(tmp_path / "out")
    args = TrainingArguments(output_dir=out, max_steps=6, save_steps=1, per_device_train_batch_size=4,
                             report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    with pytest.raises(NonFiniteGradients, match=r"non-finite gradients \(NaN or inf\) at step 3; .*"
                                                 r"The last good checkpoint is .*checkpoint-2"):
        train_and_save(model, args, tokenizer, Rows(), None, PaddedCollator(0), None, None, {},
                       callbacks=[PoisonAt(2)])
    # The run report of the last good checkpoint stays too.
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "lmforge_run.json", "report", "report.md"]


class Snapshot(transformers.TrainerCallback):
    """The weights after `step` steps, and which optimizer the run used."""

    def __init__(self, step: int):
        self.step, self.weights, self.optimizer = step, None, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        if state.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fused_adamw_skips_the_bad_update_without_a_host_check(tmp_path):
    """No checkpoint or log at the bad step: the fused AdamW update is skipped on the device
    flag (every weight but the poisoned one is exactly what it was after the last good step),
    and the run still stops, naming the bad step."""
    config = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer(
        __import__("tokenizers").models.WordLevel({"<pad>": 0, "x": 1}, unk_token="<pad>")), pad_token="<pad>")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, save_steps=100, logging_steps=100,
                             per_device_train_batch_size=4, report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=False)
    assert args.optim == "adamw_torch_fused" and not args.logging_nan_inf_filter
    snapshot = Snapshot(2)
    with pytest.raises(NonFiniteGradients, match=r"at step 3; .*no checkpoint was written yet"):
        train_and_save(model, args, tokenizer, Rows(), None, PaddedCollator(0), None, None, {},
                       callbacks=[snapshot, PoisonAt(2)])
    assert getattr(snapshot.optimizer, "found_inf", None) is not None  # the device-flag path ran
    for name, param in model.named_parameters():
        if name != "model.norm.weight":
            assert torch.equal(param.detach(), snapshot.weights[name]), name


def test_the_guard_names_a_checkpoint_from_before_the_divergence(tmp_path):
    """A checkpoint can be finite and already ruined: the guard names the newest one from before
    the gradient norm left its usual range, with a command that continues from it."""
    from lmforge.training.guards import divergence_start, nonfinite_message
    from tests.training.test_checkpoint import make_checkpoint

    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    history = [{"step": s, "loss": 2.0, "grad_norm": n} for s, n in
               [(1, 1.0), (2, 1.2), (3, 0.9), (4, 1.1), (5, 1.0), (6, 40.0), (7, 3e4), (8, 2e9)]]
    assert divergence_start(history) == (6, 5)
    message = nonfinite_message(9, str(tmp_path), history)
    good = tmp_path / "checkpoint-4"
    assert message == (f"non-finite gradients (NaN or inf) at step 9; stopped before applying it. The gradient norm "
                       f"left its usual range at step 6; the newest checkpoint from before that is {good}. Rerun with "
                       f"--resume_from_checkpoint {good} and a lower --learning_rate (a resume applies it), or check "
                       "the data of steps 6 to 9.")
    # Steady norms: the newest checkpoint is the good one.
    steady = [{"step": s, "loss": 2.0, "grad_norm": 1.0} for s in range(1, 9)]
    assert divergence_start(steady) is None
    assert f"The last good checkpoint is {tmp_path / 'checkpoint-8'}. Rerun with --resume_from_checkpoint" in \
        nonfinite_message(9, str(tmp_path), steady)
