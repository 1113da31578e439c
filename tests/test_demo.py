"""The embedded default: `lmforge demo` builds a tiny chat model from nothing and
answers held-out questions exactly, every answer ending at the end-of-turn token."""

from __future__ import annotations

import json

from lmforge.cli import main as cli
from lmforge.demo import make_task


def test_held_out_questions_are_new_phrasings_of_trained_facts():
    train, held_out = make_task(seed=0, n_countries=12)
    train_questions = {qa.question for qa in train}
    assert not train_questions & {qa.question for qa in held_out}
    train_answers = {qa.answer for qa in train}
    assert all(qa.answer in train_answers for qa in held_out)


def test_demo_reaches_90_percent(tmp_path):
    out = tmp_path / "demo"
    assert cli(["demo", "--output_dir", str(out), "--min_accuracy", "0.9"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["accuracy"] >= 0.9
    assert result["stopped_at_end_of_turn"] == 1.0


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert cli(["demo", "--output_dir", str(tmp_path)]) == 2
    assert "was not written by lmforge demo" in capsys.readouterr().err
