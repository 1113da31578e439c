"""`lmforge sft` end to end on a tiny model through the command line: kill and resume, the
output loads in plain transformers, output-directory policy, YAML run files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmforge.cli import main as cli

from conftest import ALPACA_DEMO, DUMMY_CONVERSATIONS, QWEN_TOKENIZER

pytestmark = pytest.mark.e2e  # see the markers in pyproject.toml

TINY_QWEN = {
    "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151936, "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@pytest.fixture
def tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny_config.json"
    path.write_text(json.dumps(TINY_QWEN))
    return str(path)


def sft_argv(config: str, out: str, *extra: str) -> list[str]:
    return ["sft", "--config_name", config, "--tokenizer_name", str(QWEN_TOKENIZER),
            "--data_path", str(DUMMY_CONVERSATIONS), "--output_dir", out, "--model_max_length", "128",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
            "--disable_tqdm", "True", "--dataloader_pin_memory", "False", *extra]


def run_cli(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_killed_run_resumes_and_output_loads(tmp_path, tiny_config):
    out = str(tmp_path / "out")
    argv = sft_argv(tiny_config, out, "--max_steps", "12", "--save_steps", "3", "--logging_steps", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = run_cli(argv, env)
    state = os.path.join(out, "checkpoint-3", "trainer_state.json")
    deadline = time.time() + 300
    while not os.path.exists(state) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    log = first.communicate()[0]
    assert os.path.exists(state), log
    assert not os.path.exists(os.path.join(out, "model.safetensors")), "the run finished before it was killed"

    from lmforge.training.checkpoint import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(out)
    resumed_from = int(checkpoint.rsplit("-", 1)[1])
    second = run_cli(argv, env)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log
    assert f"lmforge: resuming from {checkpoint}" in log
    with open(os.path.join(out, "trainer_state.json")) as f:
        final = json.load(f)
    assert final["global_step"] == 12
    # The resumed run logged only the steps after its checkpoint.
    logged_steps = [line for line in log.splitlines() if line.startswith("lmforge: step ")]
    assert len(logged_steps) == 12 - resumed_from, log

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache is True
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER)).chat_template
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_non_empty_output_dir_is_refused(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(sft_argv(tiny_config, str(out), "--max_steps", "1")) == 2
    assert "is not empty and holds no complete checkpoint" in capsys.readouterr().err
    as_file = tmp_path / "file"
    as_file.write_text("x")
    assert cli(sft_argv(tiny_config, str(as_file), "--max_steps", "1")) == 2
    assert f"--output_dir {as_file} is a file" in capsys.readouterr().err


def test_yaml_run_file_with_override(tmp_path, tiny_config):
    out = tmp_path / "out"
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(json.loads(ALPACA_DEMO.read_text())[:8]))
    run = tmp_path / "run.yaml"
    run.write_text(
        f"config_name: {tiny_config}\ntokenizer_name: {QWEN_TOKENIZER}\ndata_path:\n  - {DUMMY_CONVERSATIONS}\n"
        f"output_dir: {out}\nmax_steps: 5\nper_device_train_batch_size: 2\nmodel_max_length: 64\n"
        "report_to: none\ndisable_tqdm: true\nsave_strategy: 'no'\ndataloader_pin_memory: false\n"
        f"eval_data_path: {held_out}\neval_strategy: steps\neval_steps: 2\n"
    )
    assert cli(["sft", str(run), "--max_steps", "2"]) == 0
    with open(out / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 2
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [2]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    run_info = json.loads((out / "lmforge_run.json").read_text())
    assert run_info["train_data"]["records"] == 500 and run_info["eval_data"]["records"] == 8


def test_unknown_flag_and_missing_model_are_errors(tmp_path, tiny_config, capsys):
    assert cli(sft_argv(tiny_config, str(tmp_path / "o"), "--no_such_flag", "1")) == 2
    assert "unknown arguments: --no_such_flag 1" in capsys.readouterr().err
    argv = sft_argv(tiny_config, str(tmp_path / "o2"))
    argv[argv.index("--config_name") + 1] = str(tmp_path / "missing")
    assert cli(argv) == 2
    assert f"--config_name {tmp_path / 'missing'}: no such file or directory" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "qwen2", ')
    argv[argv.index("--config_name") + 1] = str(broken)
    assert cli(argv) == 2
    assert f"--config_name {broken}: not valid JSON: Expecting property name enclosed in double quotes at line 1 " \
        "column 25" in capsys.readouterr().err
