"""scripts/gpu_scaling_report.py's arithmetic, from a made-up work directory: the timed rate,
MFU and scaling efficiency of scripts/gpu_scaling.sh's table, read from trainer_state.json and
from the log file lmforge appends to alike."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_scaling_report", ROOT / "scripts" / "gpu_scaling_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

STATS = {"params": 1_000_000_000, "num_hidden_layers": 10, "hidden_size": 1000, "mean_context": 500.0,
         "max_length": 2048, "records": 10, "tokens": 5000, "vocab_size": 32000}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def log_entries(*entries: tuple[int, int, float, float]) -> str:
    """lmforge_log.jsonl: each log as lmforge appends it (step, tokens so far, rate, memory)."""
    return "".join(json.dumps({"step": step, "loss": 11.93, "learning_rate": 2e-05, "tokens_per_second": rate,
                               "tokens": tokens, "trained_tokens": tokens // 2, "peak_gpu_memory_gib": memory,
                               "epoch": 0.05}) + "\n" for step, tokens, rate, memory in entries)


@pytest.fixture
def work(tmp_path):
    write(tmp_path / "stats.json", json.dumps(STATS))
    write(tmp_path / "plan", "fsdp-2 2\nfsdp-4 4\nzero3-4 4\nzero3-8 8\nlora_zero2-8 8\n")
    # fsdp-2 saved: trainer_state.json. Step 4 is warm-up; then 4,000 tokens in 2 s, 4,000 in 4 s.
    history = [{"loss": 12.0, "tokens_per_second": 500.0, "tokens": 4000, "peak_gpu_memory_gib": 70.0, "step": 4},
               {"loss": 11.0, "tokens_per_second": 2000.0, "tokens": 8000, "peak_gpu_memory_gib": 71.5, "step": 8},
               {"loss": 10.0, "tokens_per_second": 1000.0, "tokens": 12000, "peak_gpu_memory_gib": 71.0, "step": 12},
               {"train_runtime": 9.0, "step": 12}]
    write(tmp_path / "runs" / "fsdp-2" / "trainer_state.json", json.dumps({"log_history": history}))
    write(tmp_path / "runs" / "fsdp-2" / "lmforge_run.json", json.dumps({"world_size": 2, "device": "NVIDIA H200"}))
    write(tmp_path / "rc" / "fsdp-2", "0 95\n")
    # fsdp-4 stopped before its save: its log file (the last line cut short by the kill, step 8
    # logged twice, the later entry counts). After step 4: 9,600 tokens in 2 s, then 9,600 in 2 s.
    write(tmp_path / "runs" / "fsdp-4" / "lmforge_log.jsonl",
          log_entries((4, 9600, 100, 40.0), (8, 19200, 9, 40.5), (8, 19200, 4800, 40.5), (12, 28800, 4800, 41.25))
          + '{"step": 13, "tok')
    write(tmp_path / "runs" / "fsdp-4" / "lmforge_run.json", json.dumps({"world_size": 4}))
    write(tmp_path / "rc" / "fsdp-4", "0 80 stopped once step 12 was logged\n")
    write(tmp_path / "logs" / "zero3-4.log", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    write(tmp_path / "rc" / "zero3-4", "1 60\n")
    # lora LoRA 8: done, timed from its log; zero3-8: not run yet.
    write(tmp_path / "runs" / "lora_zero2-8" / "lmforge_log.jsonl", log_entries((4, 1000, 10, 20.0), (8, 9000, 2000, 20.0)))
    write(tmp_path / "rc" / "lora_zero2-8", "0 50\n")
    return tmp_path


def test_rates_mfu_and_scaling(work):
    rows = {r["name"]: r for r in report.run_rows(str(work), warmup=4)}

    fsdp2 = rows["fsdp-2"]
    assert fsdp2["source"] == "trainer_state.json" and fsdp2["steps"] == 8
    # 8,000 tokens over 2 + 4 s: time-weighted, not the mean of the two logged rates (1,500).
    assert fsdp2["tokens_per_second"] == pytest.approx(8000 / 6)
    assert fsdp2["per_gpu"] == pytest.approx(8000 / 6 / 2)
    flops = 6 * 1e9 + 6 * 10 * 1000 * 500  # 6N + attention
    assert fsdp2["mfu"] == pytest.approx(8000 / 6 * flops / (2 * 989e12))
    assert fsdp2["peak_gib"] == 71.5
    assert fsdp2["scaling"] == pytest.approx(1.0)

    fsdp4 = rows["fsdp-4"]
    assert fsdp4["source"] == "lmforge_log.jsonl" and fsdp4["steps"] == 8 and fsdp4["nproc"] == 4
    assert fsdp4["tokens_per_second"] == pytest.approx(4800)
    assert fsdp4["peak_gib"] == 41.25
    # Per GPU 1,200 at 4 against 666.7 at 2.
    assert fsdp4["scaling"] == pytest.approx(1200 / (8000 / 6 / 2))

    lora = rows["lora_zero2-8"]
    assert lora["tokens_per_second"] == pytest.approx(2000)
    assert lora["mfu"] == pytest.approx(2000 * (4 * 1e9 + 6 * 10 * 1000 * 500) / (8 * 989e12))  # 4N: frozen base
    assert lora["scaling"] is None  # no 2-GPU LoRA run to compare with

    assert rows["zero3-4"]["status"].startswith("failed (rc 1")
    assert "OutOfMemoryError" in rows["zero3-4"]["status"]
    assert "tokens_per_second" not in rows["zero3-4"]
    assert rows["zero3-8"]["status"] == "pending"


def test_table_prints_every_run(work, capsys):
    assert report.report(str(work), 4) == 1  # a failed and a pending run
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in ("fsdp-2", "fsdp-4", "zero3-4", "zero3-8", "lora_zero2-8"):
        assert sum(line.startswith(name + " ") for line in lines) == 1
    assert "device NVIDIA H200" in out
    assert "1 run(s) pending" in out
    assert (work / "table.txt").read_text() == out


def test_no_timed_interval_without_steps_after_warmup():
    logs = [{"step": 4, "tokens": 100, "tokens_per_second": 10.0}]
    assert report.timed_rate(logs, warmup=4) == (None, 0)
    assert report.scaling_efficiency(500.0, None) is None
    assert report.scaling_efficiency(450.0, 500.0) == pytest.approx(0.9)
