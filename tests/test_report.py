"""Watching a run: the run report (its PNGs and its numbers against trainer_state.json),
`lmforge report` on a finished and on a partial run, the pre-flight check's highlighted
example against the record's labels, --val_split, tokens/s and perplexity in the logs, and
`lmforge prepare --show`."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct

import pytest

from lmforge.cli import main as cli
from lmforge.data.render import IGNORE_INDEX, Renderer
from lmforge.data.split import held_out_count, held_out_indices, record_lengths, split_dataset, trained_counts
from lmforge.errors import LmforgeError
from lmforge.report import PLOT_PIXELS
from lmforge.training.preflight import (
    TRAINED_CLOSE,
    TRAINED_OPEN,
    estimate_memory,
    highlight,
    label_spans,
    optimizer_steps,
)

from conftest import DUMMY_CONVERSATIONS, QWEN_TOKENIZER

TINY_QWEN = {
    "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151936, "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
RECORDS = 40


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished run: 40 records, 10 % held out by --val_split, one epoch, a checkpoint every
    3 steps and an evaluation every 3, its output and the log it printed."""
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "data.json"
    data.write_text(json.dumps(json.loads(DUMMY_CONVERSATIONS.read_text())[:RECORDS]))
    config = tmp / "config.json"
    config.write_text(json.dumps(TINY_QWEN))
    out = tmp / "out"
    flags = ["--config_name", str(config), "--tokenizer_name", str(QWEN_TOKENIZER), "--data_path", str(data),
             "--model_max_length", "128", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
             "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True",
             "--dataloader_pin_memory", "False", "--val_split", "0.1", "--seed", "3"]
    run_flags = flags + ["--output_dir", str(out), "--logging_steps", "1", "--save_steps", "3",
                         "--eval_strategy", "steps", "--eval_steps", "3", "--data_cache_dir", str(tmp / "cache"),
                         "--eval_samples", "2", "--eval_sample_tokens", "6"]
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmforge", "sft", *run_flags], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"out": out, "log": proc.stdout, "flags": flags, "cache": tmp / "cache"}


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def table_value(report: str, name: str) -> tuple[str, str]:
    """(step, value) of a row of the report's curves table."""
    m = re.search(rf"^\| {re.escape(name)} \| (\d+) \| ([^|]+) \|$", report, re.M)
    assert m, f"no row {name!r} in the report"
    return m.group(1), m.group(2).strip()


def test_report_has_its_plots_and_the_numbers_of_trainer_state(small_run):
    out = small_run["out"]
    state = json.loads((out / "trainer_state.json").read_text())
    report = (out / "report.md").read_text()
    for name in ("loss.png", "learning_rate.png"):
        png = out / "report" / name
        assert f"](report/{name})" in report
        assert png_size(png) == PLOT_PIXELS
        from matplotlib.image import imread

        pixels = imread(str(png))
        assert pixels.shape[:2] == (PLOT_PIXELS[1], PLOT_PIXELS[0])
        assert pixels[..., :3].std() > 0.01  # something is drawn on it, not a blank canvas

    history = state["log_history"]
    losses = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert f"**finished**: {state['global_step']} optimizer steps" in report
    assert table_value(report, "final training loss") == (str(losses[-1]["step"]), f"{losses[-1]['loss']:.4f}")
    step, value = table_value(report, "last evaluation loss")
    assert step == str(evals[-1]["step"]) == str(state["global_step"])  # evaluated at the end too
    assert value == f"{evals[-1]['eval_loss']:.4f} (perplexity {math.exp(evals[-1]['eval_loss']):.3f})"
    best = min(evals, key=lambda h: h["eval_loss"])
    assert table_value(report, "best evaluation loss")[0] == str(best["step"])
    summary = history[-1]
    assert f"| optimizer steps/s | {summary['train_steps_per_second']:.3g} |" in report
    assert "| peak memory | " in report and "| wall time (command start to the final save) | " in report


def test_logs_carry_tokens_per_second_perplexity_and_memory(small_run):
    out = small_run["out"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    info = json.loads((out / "lmforge_run.json").read_text())
    losses = [h for h in history if "loss" in h]
    assert all(h["tokens_per_second"] > 0 and h["peak_rss_gib"] > 0 for h in losses)
    tokens = [h["tokens"] for h in losses]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    # One epoch: the meter saw every useful token of the records trained on, and every
    # trained one, exactly as counted from the cache.
    assert losses[-1]["tokens"] == info["training"]["tokens"]
    assert losses[-1]["trained_tokens"] == info["training"]["trained_tokens"]
    for h in (h for h in history if "eval_loss" in h):
        assert h["eval_perplexity"] == pytest.approx(math.exp(h["eval_loss"]))
    assert history[-1]["useful_tokens_per_second"] > 0


def test_val_split_holds_out_the_counted_records(small_run):
    info = json.loads((small_run["out"] / "lmforge_run.json").read_text())
    held = held_out_count(RECORDS, 0.1)
    assert held == 4
    assert info["val_split"]["records"] == held and info["val_split"]["seed"] == 3
    assert info["training"]["records"] == RECORDS - held
    assert info["training"]["tokens"] + info["val_split"]["tokens"] == info["train_data"]["tokens"]
    assert info["training"]["trained_tokens"] + info["val_split"]["trained_tokens"] == \
        info["train_data"]["trained_tokens"]
    assert f"{held} of {RECORDS} records held out for evaluation (drawn by --seed 3)" in small_run["log"]
    report = (small_run["out"] / "report.md").read_text()
    assert f"| held out by --val_split 0.1 (seed 3) |  | {held} |" in report


def test_val_split_is_a_function_of_the_seed():
    first = held_out_indices(1000, 0.05, seed=7)
    assert first == held_out_indices(1000, 0.05, seed=7)
    assert first != held_out_indices(1000, 0.05, seed=8)
    assert len(first) == 50 and len(set(first)) == 50 and first == sorted(first)
    assert held_out_count(10, 0.01) == 1  # a split asked for is never empty
    assert held_out_count(2, 0.9) == 1  # and leaves something to train on
    with pytest.raises(LmforgeError, match="cannot be split"):
        held_out_count(1, 0.5)


def test_split_views_count_their_own_rows():
    """Packing reads lengths from the Arrow offsets; of a select()ed view it must read the
    view's rows, not the whole file's."""
    import datasets

    ids = [[1] * n for n in (3, 5, 7, 9, 11, 13)]
    labels = [[IGNORE_INDEX] * (n - 2) + [1, 1] for n in (3, 5, 7, 9, 11, 13)]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    train, held = split_dataset(ds, 0.34, seed=0)
    assert len(train) + len(held) == 6 and len(held) == 2
    assert record_lengths(held).tolist() == [len(r["input_ids"]) for r in held]
    assert record_lengths(train).tolist() == [len(r["input_ids"]) for r in train]
    assert trained_counts(train).tolist() == [2] * len(train)
    assert sorted(record_lengths(train).tolist() + record_lengths(held).tolist()) == [3, 5, 7, 9, 11, 13]


def test_report_rebuilds_identically_and_works_on_a_partial_run(small_run, tmp_path, capsys):
    out = small_run["out"]
    written = (out / "report.md").read_text()
    assert cli(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == written

    # A run without its final save: only a checkpoint (and the run's lmforge_run.json).
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copytree(out / "checkpoint-3", partial / "checkpoint-3")
    shutil.copy(out / "lmforge_run.json", partial / "lmforge_run.json")
    assert cli(["report", str(partial)]) == 0
    report = (partial / "report.md").read_text()
    state = json.loads((partial / "checkpoint-3" / "trainer_state.json").read_text())
    assert f"**not finished**: step 3 of {state['max_steps']}" in report
    losses = [h for h in state["log_history"] if "loss" in h]
    assert table_value(report, "final training loss") == ("3", f"{losses[-1]['loss']:.4f}")
    assert png_size(partial / "report" / "loss.png") == PLOT_PIXELS
    assert "| wall time to this state | " in report

    # A checkpoint alone, as copied off a cluster: no lmforge_run.json at all.
    (partial / "lmforge_run.json").unlink()
    assert cli(["report", str(partial)]) == 0
    assert "(not recorded: no lmforge_run.json)" in (partial / "report.md").read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["report", str(empty)]) == 2
    assert "nothing to report yet" in capsys.readouterr().err


def test_preflight_check_is_printed_before_training(small_run):
    log = small_run["log"]
    state = json.loads((small_run["out"] / "trainer_state.json").read_text())
    pre = log.index("lmforge: pre-flight check")
    assert pre < log.index("lmforge: step ")
    assert f"optimizer steps: {state['max_steps']} " in log
    assert f"{TRAINED_OPEN}" in log and "estimated memory: " in log
    # With --disable_tqdm, a progress line follows every training log.
    lines = [line for line in log.splitlines() if line.startswith("lmforge: step ")]
    assert len(lines) == state["global_step"]
    assert lines[-1].startswith(f"lmforge: step {state['global_step']}/{state['max_steps']} (100 %), loss ")
    assert "tok/s" in lines[-1] and "ETA 0:00" in lines[-1]


def test_highlight_marks_exactly_the_labelled_tokens(qwen_tokenizer):
    renderer = Renderer(qwen_tokenizer, qwen_tokenizer.chat_template)
    from lmforge.data.schema import Message, validate

    conversation = validate([Message("system", "Be brief."), Message("user", "Hi!"), Message("assistant", "Hello."),
                             Message("user", "2+2?"), Message("assistant", "4, as in [four].")])
    r = renderer(conversation)
    text = highlight(qwen_tokenizer, r.input_ids, r.labels)
    marked = re.findall(re.escape(TRAINED_OPEN) + r"(.*?)" + re.escape(TRAINED_CLOSE), text, re.S)
    # The marked text is the text of the labelled tokens, run by run...
    runs = [(a, b) for a, b, trained in label_spans(r.labels) if trained]
    assert marked == [qwen_tokenizer.decode(r.input_ids[a:b]) for a, b in runs]
    assert "".join(marked) == qwen_tokenizer.decode([t for t in r.labels if t != IGNORE_INDEX])
    # ... which is each assistant reply with the end-of-turn token closing it, and nothing else.
    assert marked == ["Hello.<|im_end|>", "4, as in [four].<|im_end|>"]
    unmarked = text.replace(TRAINED_OPEN, "").replace(TRAINED_CLOSE, "")
    assert unmarked == qwen_tokenizer.decode(r.input_ids)
    colored = highlight(qwen_tokenizer, r.input_ids, r.labels, color=True)
    assert TRAINED_OPEN not in colored and colored.count("\x1b[0m") == len(runs)


def test_memory_estimate_counts_weights_gradients_and_adamw():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5).to(torch.bfloat16))
    model[0].weight.requires_grad_(False)
    m = estimate_memory(model)
    fp32_trained, bf16_trained = 20, 20 * 5 + 5
    assert m.parameters == 10 * 20 + 20 + bf16_trained
    assert m.trainable == fp32_trained + bf16_trained
    gib = 2**30
    assert m.weights_gib * gib == (10 * 20 + 20) * 4 + bf16_trained * 2
    assert m.gradients_gib * gib == fp32_trained * 4 + bf16_trained * 2
    # Two fp32 moments per trained weight, and an fp32 master copy of the bf16 ones.
    assert m.optimizer_gib * gib == fp32_trained * 8 + bf16_trained * 12


def test_prepare_show_prints_what_the_run_did(small_run, capsys):
    state = json.loads((small_run["out"] / "trainer_state.json").read_text())
    assert cli(["prepare", *small_run["flags"], "--data_cache_dir", str(small_run["cache"]), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("lmforge: training record ") == 2 and "training record 1 of 36 " in out
    assert out.count(TRAINED_OPEN) >= 2
    assert f"optimizer steps: {state['max_steps']} " in out
    assert "estimated memory: " in out and "an estimate" in out


@pytest.mark.parametrize("rows,batch,accumulation,world,epochs,max_steps,expected", [
    (100, 4, 1, 1, 1.0, -1, 25), (101, 4, 1, 1, 1.0, -1, 26), (101, 4, 3, 1, 2.0, -1, 18),
    (101, 4, 1, 2, 1.0, -1, 13), (100, 4, 1, 1, 0.5, -1, 13), (100, 4, 1, 1, 3.0, 7, 7),
])
def test_optimizer_steps_as_the_trainer_counts(rows, batch, accumulation, world, epochs, max_steps, expected):
    assert optimizer_steps(rows, batch, accumulation, world, epochs, max_steps)[0] == expected


def test_val_split_flag_is_checked(tmp_path):
    from lmforge.flags import DataArguments

    with pytest.raises(LmforgeError, match=r"--val_split must be a fraction in \[0, 1\), got 1.5"):
        DataArguments(data_path=["x.json"], val_split=1.5)
    with pytest.raises(LmforgeError, match="--val_split and --eval_data_path both name evaluation data"):
        DataArguments(data_path=["x.json"], eval_data_path=["y.json"], val_split=0.1)


def test_held_out_prompts_split_at_the_first_labelled_token():
    from lmforge.training.samples import held_out_prompts

    X = -100
    records = [{"input_ids": [1, 2, 3], "labels": [X, X, X]},  # nothing trained: skipped
               {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [X, X, 7, 8, X, 10]},
               {"input_ids": [4, 4], "labels": [X, 4]}]
    prompts = held_out_prompts(records, 5)
    assert [(p.prompt_ids, p.reference_ids) for p in prompts] == [([5, 6], [7, 8]), ([4], [4])]
    assert len(held_out_prompts(records, 1)) == 1


def test_eval_samples_are_written_at_each_evaluation_and_reported(small_run):
    from lmforge.training.samples import read_samples

    out = small_run["out"]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    state = json.loads((out / "trainer_state.json").read_text())
    eval_steps = sorted({h["step"] for h in state["log_history"] if "eval_loss" in h})
    assert sorted({line["step"] for line in lines}) == eval_steps and len(lines) == 2 * len(eval_steps)
    for line in lines:
        # the prompt is the conversation up to the first trained answer, its header included
        assert line["prompt"].endswith("<|im_start|>assistant\n"), line["prompt"]
        assert line["reference"].endswith("<|im_end|>") and line["reference"] != "<|im_end|>"
        assert line["stopped"] == line["generation"].endswith("<|im_end|>")
    newest = read_samples(str(out))
    assert [s["step"] for s in newest] == [eval_steps[-1]] * 2
    report = (out / "report.md").read_text()
    assert f"## Sample generations (step {eval_steps[-1]})" in report
    assert report.count("   - reference: ") == 2
    assert "lmforge: sample 1 at step" in small_run["log"]


def test_data_section_says_what_was_cut_and_what_changed_on_resume():
    from lmforge.report import _data_section

    info = {"train_data": {"records": 300, "kept": 300, "tokens": 9, "trained_tokens": 5, "truncated": 92,
                           "prompts_cut": 86, "answers_cut": 40, "skipped": {}},
            "resumed_on_changed_data": ["d.jsonl is not the training data the run started with: 10 bytes now"]}
    lines = _data_section(info)
    assert "- pairs cut to --model_max_length: 86 prompts at their start, 40 with answers cut at their end" in lines
    assert ("- resumed on changed data (--resume_changed_data True): d.jsonl is not the training data the run started "
            "with: 10 bytes now; the position in the epoch was recomputed from the new data's size") in lines


def test_memory_estimate_follows_the_optimizer():
    """Low-bit optimizers keep a few bits of state a weight and no fp32 master; torch's AdamW over
    16-bit weights keeps masters; DeepSpeed keeps masters of its own."""
    import types

    import torch

    model = torch.nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    n, gib = 16 * 16, 2**30

    def args(optim: str, deepspeed=None):
        return types.SimpleNamespace(optim=optim, deepspeed=deepspeed, fsdp="")

    assert estimate_memory(model, args("adamw_torch")).optimizer_gib * gib == n * 12
    assert estimate_memory(model, args("adamw_torch_8bit")).optimizer_gib * gib == n * 2
    assert estimate_memory(model, args("adamw_torch_4bit")).optimizer_gib * gib == n * 1
    assert estimate_memory(model, args("adamw_bnb_8bit")).optimizer_gib * gib == n * 2
    assert estimate_memory(model, args("adafactor")).optimizer_gib * gib == n * 8  # counted as AdamW's
    assert estimate_memory(model, args("adamw_torch", deepspeed="zero3")).optimizer_gib * gib == n * 12
