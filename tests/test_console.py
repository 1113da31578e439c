"""What a user sees on the console: one line per event. With --disable_tqdm True every log is one
lmforge line (no Trainer log dicts), each training step once, an evaluation's loss on a line of
its own; no "Loading weights" / "Writing model shards" bars, no "missing keys ... lm_head.weight"
warning when a checkpoint of a tied-embedding model is resumed (a key that is really missing is
still reported), no DeepSpeed accelerator-detection line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lmforge.cli import main as cli

from conftest import QWEN_TOKENIZER

TINY_QWEN = {
    "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151936, "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
STEP_LINE = re.compile(r"^lmforge: step (\d+)/(\d+) ")
NOISE = ("Loading weights", "Writing model shards", "missing keys", "Setting accelerator")


@pytest.fixture
def files(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_QWEN))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                                              {"role": "assistant", "content": str(2 * i)}]} for i in range(40)]))
    return SimpleNamespace(config=str(config), data=str(data), tmp=tmp_path)


def sft(files, out, *extra: str) -> list[str]:
    return ["sft", "--tokenizer_name", str(QWEN_TOKENIZER), "--data_path", files.data, "--output_dir", str(out),
            "--model_max_length", "128", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--report_to", "none", "--dataloader_pin_memory", "False", *extra]


def step_lines(text: str) -> list[int]:
    return [int(m.group(1)) for m in map(STEP_LINE.match, text.splitlines()) if m]


def test_disable_tqdm_prints_each_log_once_as_an_lmforge_line(files, capfd):
    out = files.tmp / "out"
    assert cli(sft(files, out, "--config_name", files.config, "--disable_tqdm", "True", "--max_steps", "4",
                   "--save_steps", "2", "--val_split", "0.1", "--eval_strategy", "steps", "--eval_steps", "2")) == 0
    captured = capfd.readouterr()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    lines = captured.out.splitlines()
    # No Trainer dict: neither a training log nor an evaluation's nor the summary's.
    assert not [line for line in lines if line.startswith("{")], captured.out
    assert "{'loss'" not in captured.out and "{'eval_loss'" not in captured.out
    # Each logged step exactly once, as lmforge's progress line.
    assert step_lines(captured.out) == [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    # Each evaluation's loss on an lmforge line of its own.
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        expected = f"lmforge: eval at step {h['step']}/4: loss {h['eval_loss']:.4g}, perplexity "
        assert sum(line.startswith(expected) for line in lines) == 1, captured.out
    # The summary: one line.
    assert sum(line.startswith("lmforge: trained to step 4/4 in ") for line in lines) == 1, captured.out
    # One line per log, and nothing else of the libraries' on either stream.
    logged = [line for line in lines if re.match(r"lmforge: (step|eval at step|trained to step|log at step) ", line)]
    assert len(logged) == len(history), captured.out
    for noise in NOISE:
        assert noise not in captured.out + captured.err, noise


def test_resume_of_a_tied_model_from_weights_is_quiet(files, capfd):
    import transformers

    weights = files.tmp / "weights"
    config = transformers.AutoConfig.for_model(**TINY_QWEN)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(weights)
    capfd.readouterr()  # the save's own output
    out = files.tmp / "out"
    flags = sft(files, out, "--model_name_or_path", str(weights), "--disable_tqdm", "True", "--save_steps", "2")
    assert cli([*flags, "--max_steps", "2"]) == 0
    first = capfd.readouterr()
    assert step_lines(first.out) == [1, 2]
    assert cli([*flags, "--max_steps", "3"]) == 0  # a changed --max_steps resumes from checkpoint-2
    captured = capfd.readouterr()
    assert f"lmforge: resuming from {out}/checkpoint-2" in captured.out
    assert step_lines(captured.out) == [3]
    assert "{'loss'" not in captured.out
    for noise in NOISE:
        assert noise not in first.out + first.err + captured.out + captured.err, noise


def test_with_bars_logs_are_lines_and_checkpoints_write_no_bar(files, capfd):
    out = files.tmp / "out"
    assert cli(sft(files, out, "--config_name", files.config, "--disable_tqdm", "False", "--max_steps", "2",
                   "--save_steps", "1", "--val_split", "0.1", "--eval_strategy", "steps", "--eval_steps", "2")) == 0
    captured = capfd.readouterr()
    assert not [line for line in captured.out.splitlines() if line.startswith("{")], captured.out
    assert sum(line.startswith("lmforge: eval at step 2/2: loss ") for line in captured.out.splitlines()) == 1
    assert "loss=" in captured.err  # the training bar carries the loss
    # Two checkpoints written during training, no bar for them; the final save may have its own
    # (counted by its start: a bar may render its 100 % twice, as its rate changes on close).
    assert captured.err.count("Writing model shards:   0%") <= 1, captured.err


def test_a_tied_head_is_not_missing_a_missing_key_still_is(monkeypatch):
    import transformers

    from lmforge.training.step import Trainer
    from lmforge.training.verify_save import loaded_through_tie

    small = {**TINY_QWEN, "vocab_size": 64}
    tied = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**small))
    untied = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**small, "tie_word_embeddings": False}))
    assert loaded_through_tie(tied, ["lm_head.weight"]) == {"lm_head.weight"}
    assert loaded_through_tie(tied, ["lm_head.weight", "model.norm.weight"]) == {"lm_head.weight"}
    # Both names of the shared tensor missing: nothing loaded it.
    assert loaded_through_tie(tied, ["lm_head.weight", "model.embed_tokens.weight"]) == set()
    assert loaded_through_tie(untied, ["lm_head.weight"]) == set()

    import torch
    from transformers import trainer as hf_trainer

    warned: list[str] = []
    monkeypatch.setattr(hf_trainer.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    fake = object.__new__(Trainer)
    fake.model = tied
    IncompatibleKeys = torch.nn.modules.module._IncompatibleKeys
    fake._issue_warnings_after_load(IncompatibleKeys(["lm_head.weight"], []))
    assert warned == []
    fake._issue_warnings_after_load(IncompatibleKeys(["lm_head.weight", "model.norm.weight"], []))
    assert len(warned) == 1 and "model.norm.weight" in warned[0] and "lm_head" not in warned[0]
    fake.model = untied
    fake._issue_warnings_after_load(IncompatibleKeys(["lm_head.weight"], []))
    assert len(warned) == 2 and "lm_head.weight" in warned[1]


def test_log_lines():
    from lmforge.training.progress import log_line

    state = SimpleNamespace(global_step=30, max_steps=100)
    assert log_line(state, {"eval_loss": 1.23456, "eval_perplexity": 3.437, "eval_runtime": 2.04, "epoch": 1.0}) \
        == "lmforge: eval at step 30/100: loss 1.235, perplexity 3.437 (2.0 s)"
    dpo = {"eval_loss": 0.6, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.0123}
    assert log_line(state, dpo) == "lmforge: eval at step 30/100: loss 0.6, reward acc 0.75, margin 0.0123"
    summary = {"train_runtime": 75.2, "train_loss": 2.5, "useful_tokens_per_second": 16712.0, "total_flos": 1.0}
    assert log_line(state, summary) == "lmforge: trained to step 30/100 in 1:15, mean loss 2.5, tok/s 16.7k"
    assert log_line(state, {"custom": 0.5, "epoch": 1.0}) == "lmforge: log at step 30/100: custom 0.5"
    assert log_line(state, {"loss": 2.0, "learning_rate": 1e-4}) == "lmforge: step 30/100 (30 %), loss 2, lr 0.0001"


def test_deepspeed_import_says_nothing_about_its_accelerator():
    pytest.importorskip("deepspeed")
    # what every command's entry (lmforge.cli._call) does first
    code = "from lmforge.logs import quiet_library_imports; quiet_library_imports(); import deepspeed"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Setting accelerator" not in proc.stdout + proc.stderr


def test_library_import_noise_is_dropped_and_nothing_else(monkeypatch):
    """The filters drop exactly the listed lines of each library's logger: torchao's extension
    lines only where torch has no CUDA; every other record passes."""
    import logging

    import torch

    from lmforge.logs import quiet_library_imports

    quiet_library_imports()
    quiet_library_imports()  # idempotent: one filter a logger

    def kept(logger: str, message: str) -> bool:
        log = logging.getLogger(logger)
        assert len(log.filters) >= 1
        return log.filter(logging.LogRecord(logger, logging.WARNING, __file__, 1, message, None, None))

    assert not kept("DeepSpeed", "Setting accelerator to CPU. If you have GPU ...")
    assert kept("DeepSpeed", "ZeRO-3 is enabled")
    assert not kept("torch.utils._pytree", "<enum 'X'> is an Enum subclass ... Calling register_constant() on Enum "
                                           "subclasses is deprecated and will be an error in a future release.")
    assert kept("torch.utils._pytree", "something else")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not kept("torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library")
    assert kept("torchao", "Skipping import of cpp extensions")
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA torch: a failed extension is news
    assert kept("torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library")


def test_log_file_keeps_only_the_steps_up_to_where_a_run_starts(tmp_path):
    """A resumed run drops the entries past its checkpoint (it logs those steps again), a fresh
    run all of them; a line cut short by a kill is dropped too."""
    from lmforge.training.progress import LOG_FILE, LogFile

    path = tmp_path / LOG_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
    args = SimpleNamespace(output_dir=str(tmp_path))
    LogFile().on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=4), None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    LogFile().on_train_begin(args, SimpleNamespace(is_world_process_zero=False, global_step=0), None)
    assert len(path.read_text().splitlines()) == 4  # only the main process writes the file
    LogFile().on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    assert path.read_text() == ""


def test_grpo_logs_show_reward_lengths_clipping_entropy_and_kl():
    from lmforge.training.progress import progress_fields

    logs = {"loss": 0.01, "learning_rate": 1e-6, "reward": 0.625, "reward_std": 0.2, "rewards/accuracy": 0.5,
            "rewards/my.py:brevity": 0.25, "completion_length": 118.4, "completion_length_max": 256,
            "truncated": 0.125, "clip_ratio/low": 0.01, "clip_ratio/high": 0.02, "entropy": 0.4567, "kl": 0.0031}
    assert progress_fields(logs) == {
        "loss": "0.01", "lr": "1e-06", "reward": "0.625 ± 0.2", "accuracy": "0.5", "brevity": "0.25",
        "length": "118 (max 256, 12 % cut)", "clipped": "3.0 %", "entropy": "0.457", "kl": "0.0031"}
    dpo = {"loss": 0.6, "rewards/accuracies": 0.75, "rewards/margins": 0.1, "rewards/chosen": 0.2}
    assert set(progress_fields(dpo)) == {"loss", "reward acc", "margin"}
