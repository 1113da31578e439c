"""The embedded default: `lmforge demo` builds a tiny chat model from nothing (tokenizer,
pretraining, full and LoRA fine-tuning, merge) and answers held-out questions exactly, every
answer ending at the end-of-turn token; GRPO unlearns the slip its fine-tuning data taught;
each training run writes its report."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main as cli
from lmforge.demo import make_task, slip_task, slipped_sum, statements, transcript

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # see the markers in pyproject.toml


def test_held_out_questions_are_new_phrasings_of_trained_facts():
    train, held_out = make_task(seed=0, n_countries=12)
    train_questions = {qa.question for qa in train}
    assert not train_questions & {qa.question for qa in held_out}
    train_answers = {qa.answer for qa in train}
    assert all(qa.answer in train_answers for qa in held_out)


def test_statements_and_transcripts_hold_every_fact_but_no_held_out_phrasing():
    train, held_out = make_task(seed=0, n_countries=12)
    text = " ".join(statements(seed=0, n_countries=12))
    assert all(qa.answer in text for qa in held_out)
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    # The EOS pretraining appends is the end-of-turn token the transcript leaves off.
    assert transcript(record) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo"


def test_the_slip_task_teaches_the_forgotten_carry_in_the_share_asked():
    task = slip_task(seed=0, n_sums=12, copies=3, slip_share=2 / 3)
    assert slipped_sum(27, 48) == "65" and slipped_sum(55, 35) == "80"
    by_question: dict[str, list[str]] = {}
    for qa in task.demonstrations:
        by_question.setdefault(qa.question, []).append(qa.answer)
    prompts = {qa.question: qa.answer for qa in task.prompts}
    assert set(by_question) == set(prompts) and len(prompts) == 24  # two trained phrasings a sum
    assert not set(prompts) & {qa.question for qa in task.held_out} and len(task.held_out) == 12
    slips = correct = 0
    for question, answers in by_question.items():
        a, b = (int(x) for x in question.replace("?", "").replace(".", "").split() if x.isdigit())
        assert a % 10 + b % 10 >= 10 and prompts[question] == str(a + b)  # every sum carries; GRPO gets the truth
        slips += answers.count(slipped_sum(a, b))
        correct += answers.count(str(a + b))
    assert (slips, correct) == (48, 24)  # 4 of each sum's 6 demonstrations forget the carry


def test_demo_runs_the_whole_pipeline(tmp_path):
    """Tokenizer, pretraining, full SFT, LoRA, merge, evaluation, reports: the fine-tuned
    models answer held-out phrasings the pretrained one mostly cannot."""
    out = tmp_path / "demo"
    assert cli(["demo", "--output_dir", str(out), "--min_accuracy", "0.9"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["accuracy"] >= 0.9
    assert result["lora_accuracy"] >= 0.75  # merged into the pretrained model: 98.7 % measured
    assert result["pretrained_accuracy"] < 0.5  # what fine-tuning added
    assert result["stopped_at_end_of_turn"] == 1.0 and result["lora_stopped_at_end_of_turn"] == 1.0
    # GRPO unlearns the slip: 17.5 % -> 100 % measured (seed 0).
    assert result["sums_sft_accuracy"] < 0.5 and result["sums_grpo_accuracy"] >= result["sums_sft_accuracy"] + 0.3
    assert (out / "grpo" / "report" / "reward.png").stat().st_size > 10_000
    assert (out / "lora-merged" / "model.safetensors").is_file()
    for run in ("pretrain", "model", "lora"):
        state = json.loads((out / run / "trainer_state.json").read_text())
        assert any("eval_loss" in h for h in state["log_history"])  # --val_split / --eval_data_path
        assert (out / run / "report.md").is_file() and (out / run / "report" / "loss.png").stat().st_size > 10_000
    info = json.loads((out / "pretrain" / "lmforge_run.json").read_text())
    assert info["val_split"]["records"] >= 1
    summary = (out / "report.md").read_text()
    assert f"{result['accuracy']:.1%} for the fully fine-tuned model" in summary
    assert "](model/report.md)" in summary and "](grpo/report.md)" in summary
    assert f"{result['sums_grpo_accuracy']:.1%} after GRPO" in summary


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert cli(["demo", "--output_dir", str(tmp_path)]) == 2
    assert "was not written by lmforge demo" in capsys.readouterr().err
