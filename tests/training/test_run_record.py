"""lmforge_run.json in one module: written, updated and read back; and light to import, so that
`lmforge report` reads a run without torch (why `train_and_save` is in training/run.py, not in
the package's __init__)."""

from __future__ import annotations

import subprocess
import sys

from lmforge.training.run_record import read_run_info, update_run_info, write_run_info


def test_written_updated_and_read_back(tmp_path):
    out = str(tmp_path / "out")
    assert read_run_info(out) == {}
    write_run_info(out, {"command": "sft", "config": {"seed": 1}})
    update_run_info(out, final_save=["model.safetensors"])
    info = read_run_info(out)
    assert info["argv"] == sys.argv
    assert (info["command"], info["config"], info["final_save"]) == ("sft", {"seed": 1}, ["model.safetensors"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lmforge_run.json"]


def test_reading_the_record_imports_no_torch():
    code = "import sys, lmforge.training.run_record, lmforge.report; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
