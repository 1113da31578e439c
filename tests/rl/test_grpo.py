"""`lmforge grpo` end to end on a tiny random model (CPU, fp32): packed log-probs, a run that
logs its rewards, an exact resume after SIGKILL (the same completions, rewards and weights as the
run never killed, a checkpoint between the steps of one generation batch included), and the bad
inputs refused in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main as cli
from lmforge.modeling.loss import token_log_probs
from lmforge.rl.trainer import SEQ, deal_rows, packed_micro_batch, rollout_rows
from lmforge.training.step import Trainer

from conftest import SHARED_DATA

pytestmark = pytest.mark.e2e

TINY = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 512,
        "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "tiny.json").write_text(json.dumps(TINY))
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}) + "\n")
    # A reward a random model's completions differ in, so that every step has advantages to follow.
    (root / "vowels.py").write_text("def vowels(prompts, completions, **columns):\n"
                                    "    texts = [c[0]['content'] for c in completions]\n"
                                    "    return [sum(ch in 'aeiou' for ch in t) / max(len(t), 1) for t in texts]\n")
    assert cli(["tokenizer", "train", "--train_files", str(SHARED_DATA / "pretrain_text" / "tinyshakespeare.txt"),
                "--vocab_size", "512", "--output_dir", str(root / "tok")]) == 0
    return root


def command(root, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "grpo", "--config_name", str(root / "tiny.json"),
            "--tokenizer_name", str(root / "tok"), "--data_path", str(root / "prompts.jsonl"), "--output_dir", str(out),
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--num_generations", "4",
            "--max_completion_length", "12", "--learning_rate", "1e-2", "--logging_steps", "1", "--seed", "3",
            "--report_to", "none", "--disable_tqdm", "True", *extra]


def run(cmd: list[str], kill_after_step: int | None = None) -> tuple[int, str]:
    """Run `cmd`; with `kill_after_step`, SIGKILL it once that step's log line is printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_after_step is not None and line.startswith(f"lmforge: step {kill_after_step}/"):
                proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(lines)


TIMINGS = ("tokens_per_second", "peak_rss_gib", "peak_gpu_memory_gib")


def logged(out) -> list[dict]:
    """The logged steps, without the timings and memory readings (they differ from run to run)."""
    with open(out / "trainer_state.json") as f:
        return [{k: v for k, v in h.items() if k not in TIMINGS and not k.startswith("time/")}
                for h in json.load(f)["log_history"] if "loss" in h]


def test_packed_log_probs_equal_each_sequence_alone():
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY)).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completions = [[20, 21, 22, 23], [24, 25], [26, 27, 28]]
    batch = packed_micro_batch(prompts, completions, [True, False, True], pad_id=0, varlen=False)
    seq = batch.pop(SEQ)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "document_ids")}
    Trainer.attend_per_document(model, inputs)
    head = model.get_output_embeddings()
    with torch.no_grad():
        packed = token_log_probs(model, head, inputs, batch["labels"], batch["lmforge_label_positions"])
        alone = []
        for p, c, trained in zip(prompts, completions, [True, False, True]):
            logits = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
            if trained:  # a masked completion (truncated, --mask_truncated_completions) has no scored token
                alone += [logits[len(p) - 1 + t, token] for t, token in enumerate(c)]
    assert seq.tolist() == [0, 0, 0, 0, 2, 2, 2]
    assert torch.allclose(packed, torch.stack(alone), atol=1e-5)


def test_a_generation_batch_is_dealt_into_the_fewest_rows_that_hold_it_at_its_longest():
    assert rollout_rows(64, longest=320, row_tokens=16384, per_device=8) == 2  # 51 documents a row
    assert rollout_rows(64, longest=768, row_tokens=16384, per_device=8) == 4  # 21 a row
    assert rollout_rows(64, longest=20000, row_tokens=16384, per_device=8) == 64  # a document a row
    assert rollout_rows(64, longest=320, row_tokens=0, per_device=8) == 8  # TRL's split
    lengths = [50, 10, 40, 30, 20, 60, 5]
    dealt = deal_rows(lengths, 3)
    # Longest first, back and forth: 60 50 40 to rows 0 1 2, then 30 20 10 to rows 2 1 0, then 5 to row 0.
    assert dealt == [[1, 5, 6], [0, 4], [2, 3]]
    assert sorted(i for r in dealt for i in r) == list(range(7))
    assert max(len(r) for r in dealt) == 3 and [sum(lengths[i] for i in r) for r in dealt] == [75, 70, 70]


def test_the_compiled_entropy_a_gpu_measures_with_equals_the_eager_one():
    """The meter's fused (compiled) form, which a GPU runs, on the CPU: the same entropies,
    tokens a processor forbade (-inf) included, at two batch shapes (the second not recompiled
    for each size)."""
    from lmforge.rl.rollout import _compiled_entropy, _entropy

    torch.manual_seed(0)
    for rows, vocab in ((8, 1000), (5, 300)):
        scores = torch.randn(rows, vocab) * 3
        scores[:, :10] = float("-inf")
        assert torch.allclose(_compiled_entropy()(scores, 0.7), _entropy(scores, 0.7), atol=1e-5)


def test_rows_of_any_size_train_the_same_step(setup, tmp_path):
    """A generation batch in one packed row (the default here) or in TRL's micro-batches of
    per_device_train_batch_size completions: the same completions, rewards, loss and weights
    (within fp32 summation order)."""
    outs = {}
    for name, rows in (("one", ()), ("trl", ("--train_row_tokens", "0"))):
        outs[name] = tmp_path / name
        code, log = run(command(setup, outs[name], "--max_steps", "1", "--learning_rate", "1e-3", *rows))
        assert code == 0, log
        assert f"as {1 if name == 'one' else 2} packed row(s)" in log
    one, trl = logged(outs["one"]), logged(outs["trl"])
    assert one[0]["reward"] == trl[0]["reward"] and one[0]["completion_length"] == trl[0]["completion_length"]
    assert one[0]["loss"] == pytest.approx(trl[0]["loss"], abs=1e-6)
    assert one[0]["grad_norm"] == pytest.approx(trl[0]["grad_norm"], rel=1e-5)
    got, want = load_file(outs["one"] / "model.safetensors"), load_file(outs["trl"] / "model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_entropy_is_the_policys_at_the_temperature_over_each_completions_tokens(top_k):
    """The engine's per-completion entropy equals one computed from generate's own raw logits
    (softmax(logits / T), the positions up to and with the end of turn), top-k or not."""
    import transformers

    from lmforge.rl.rollout import Sampling, TransformersEngine

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY)).eval()
    prompts, stop, temperature = [[5, 6, 7], [8, 9, 10], [11, 12, 13]], [3, 4, 7, 9], 0.7
    sampling = Sampling(max_new_tokens=6, temperature=temperature, top_k=top_k)
    got = TransformersEngine(pad_id=0, stop_ids=stop).complete(model, prompts, sampling, seed=11)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        out = model.generate(input_ids=torch.tensor(prompts), do_sample=True, temperature=temperature,
                             top_k=top_k or None, max_new_tokens=6, eos_token_id=stop, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, dim=1).float() / temperature  # rows x positions x vocab
    p = logits.softmax(-1)
    entropy = -(p * logits.log_softmax(-1)).sum(-1)
    assert [c.ids for c in got] != [[]] * 3
    for row, completion in enumerate(got):
        n = len(completion.ids)
        assert out.sequences[row, 3:3 + n].tolist() == completion.ids  # the same draws
        assert completion.entropy == pytest.approx(entropy[row, :n].mean().item(), rel=1e-5)


def test_grpo_logs_its_rewards_and_resumes_exactly_after_sigkill(setup, tmp_path):
    """--num_iterations 2 (two steps per generation batch) and --save_steps 3: the checkpoint at
    step 3 falls between the two steps of a generation batch, which it holds."""
    extra = ("--max_steps", "6", "--save_steps", "3", "--num_iterations", "2", "--train_row_tokens", "120",
             "--reward_funcs", "accuracy", f"{setup / 'vowels.py'}:vowels")
    whole = tmp_path / "whole"
    code, log = run(command(setup, whole, *extra))
    assert code == 0, log
    assert "RoPE scaling" not in log  # the model's 512 positions hold a prompt and its 12 tokens
    rows = int(re.search(r"generation batch of 16 completions as (\d+) packed row", log).group(1))
    assert rows > 1  # the checkpoint holds a generation batch of several micro-batches
    steps = logged(whole)
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "reward_std", "rewards/accuracy", f"rewards/{setup / 'vowels.py'}:vowels",
                "completion_length", "completion_length_max", "truncated", "clip_ratio/low", "clip_ratio/high",
                "entropy"):
        assert key in steps[0], key
    assert all(h["reward_std"] > 0 and h["grad_norm"] > 0 for h in steps)  # every step learns something
    assert "lmforge: completion 1 at step 0 (reward " in log
    assert os.path.isfile(whole / "checkpoint-3" / "rollout.safetensors")
    report = (whole / "report.md").read_text()
    assert "![reward](report/reward.png)" in report and "![completion length](report/completion_length.png)" in report
    assert f"| last reward | 6 | {steps[-1]['reward']:.4g} (first {steps[0]['reward']:.4g}" in report
    assert "reward " in report and "## Sample generations" in report
    killed = tmp_path / "killed"
    code, log = run(command(setup, killed, *extra), kill_after_step=4)
    assert code == -signal.SIGKILL, log
    code, log = run(command(setup, killed, *extra))
    assert code == 0, log
    assert f"resuming from {killed / 'checkpoint-3'}" in log
    assert logged(killed) == steps  # the same rewards, completion lengths and losses, step by step
    got, want = load_file(killed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_held_out_prompts_are_rewarded_at_each_evaluation_with_the_same_draws(setup, tmp_path):
    """--val_split holds prompts out; each evaluation samples them with the same seeds, so with
    the weights unchanged (a learning rate far under the weights' fp32 resolution) two evaluations
    give the same rewards."""
    out = tmp_path / "eval"
    code, log = run(command(setup, out, "--max_steps", "4", "--val_split", "0.25", "--eval_strategy", "steps",
                            "--eval_steps", "2", "--learning_rate", "1e-20", "--reward_funcs", "accuracy",
                            f"{setup / 'vowels.py'}:vowels"))
    assert code == 0, log
    assert "--val_split 0.25: 12 of 48 prompts held out" in log
    with open(out / "trainer_state.json") as f:
        evals = [h for h in json.load(f)["log_history"] if "eval_reward" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for key in ("eval_reward_std", "eval_rewards/accuracy", f"eval_rewards/{setup / 'vowels.py'}:vowels",
                "eval_completion_length", "eval_truncated"):
        assert key in evals[0], key
    measured = [{k: v for k, v in h.items() if k.startswith("eval_") and "runtime" not in k and "per_second" not in k}
                for h in evals]
    assert measured[0] == measured[1]
    assert "lmforge: eval at step 2/4: reward " in log
    assert "| last evaluation reward | 4 |" in (out / "report.md").read_text()


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make test installs it)")


@needs_deepspeed
def test_grpo_under_zero3_trains_what_one_process_does_and_refuses_an_unsharded_reference(setup, tmp_path):
    """ZeRO-3 in one process (its CPU accelerator): sampling through the partitioned weights
    (gathered at each forward) draws what the plain model draws, and the steps train the same;
    a frozen reference copy (full parameters, --beta > 0) is refused before anything loads."""
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    port = str(20000 + os.getpid() % 20000)
    hooks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hooks.py")

    def zero3(out, *extra):
        cmd = command(setup, out, "--max_steps", "2", "--save_strategy", "no", *extra)
        cmd[:4] = ["deepspeed", "--num_gpus", "1", "--master_port", port, hooks, "grpo"]
        done = subprocess.run(cmd + ["--deepspeed", "zero3"], capture_output=True, text=True, env=env, timeout=600,
                              cwd=str(tmp_path))
        return done.returncode, done.stdout + done.stderr

    code, log = zero3(tmp_path / "beta", "--beta", "0.04")
    assert code != 0 and ("lmforge grpo: error: --beta 0.04 with full-parameter GRPO under FSDP or ZeRO-3 would keep "
                          "an unsharded frozen reference on every GPU") in log, log[-3000:]
    code, log = zero3(tmp_path / "zero3")
    assert code == 0, log[-3000:]
    code, plain_log = run(command(setup, tmp_path / "plain", "--max_steps", "2", "--save_strategy", "no"))
    assert code == 0, plain_log
    sharded, plain = logged(tmp_path / "zero3"), logged(tmp_path / "plain")
    assert [h["reward"] for h in sharded] == [h["reward"] for h in plain]  # the same draws, step after step
    for ours, theirs in zip(sharded, plain):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


def test_a_reward_function_that_raises_stops_the_run_naming_it_and_the_record(setup, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text("calls = []\n"
                      "def picky(prompts, completions, answer, **kwargs):\n"
                      "    calls.append(1)\n"
                      "    if len(calls) == 3:\n"
                      "        raise ValueError('no answer here')\n"
                      "    return [0.0 for _ in completions]\n")
    out = tmp_path / "out"
    code, log = run(command(setup, out, "--max_steps", "6", "--save_steps", "2", "--reward_funcs", f"{reward}:picky"))
    assert code == 2, log
    assert f"lmforge grpo: error: reward {reward}:picky on the completions of {setup / 'prompts.jsonl'}, line " in log
    assert "ValueError: no answer here" in log and "Traceback" not in log
    # The third generation batch (step 3) stopped it: checkpoint-2, written before, is kept.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


def test_a_missing_answer_column_is_named_before_any_generation(setup, tmp_path):
    data = tmp_path / "no_answers.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="}], "solution": "2"}) + "\n")
    cmd = command(setup, tmp_path / "out", "--max_steps", "1")
    cmd[cmd.index("--data_path") + 1] = str(data)
    code, log = run(cmd)
    assert code == 2, log
    assert "lmforge grpo: error:" in log and "'answer'" in log and "solution" in log
    assert "completion 1" not in log


@pytest.mark.parametrize("flags, message", [
    (("--num_generations", "1"), "--num_generations 1: GRPO compares each completion with the others of its group; "
                                 "it needs at least 2"),
    (("--num_generations", "3"), "--per_device_train_batch_size 8 x --gradient_accumulation_steps 2 = 16 completions "
                                 "a step: not a multiple of --num_generations 3"),
])
def test_groups_that_cannot_be_formed_are_refused_at_parsing(setup, tmp_path, flags, message):
    code, log = run(command(setup, tmp_path / "out", *flags))
    assert code == 2 and f"lmforge grpo: error: {message}" in log, log
    assert not (tmp_path / "out").exists()
