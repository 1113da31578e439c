"""Helpers of scripts/gpu_multi.sh: builds the base model, and reads
what the runs left behind into one compact table.

    python3 scripts/gpu_multi_check.py base SHAPE TOKENIZER OUT
    python3 scripts/gpu_multi_check.py report WORK

`report` reads WORK/runs/NAME (the output directories), WORK/logs/NAME.log, WORK/rc/NAME
("returncode seconds") and WORK/logits/NAME.pt (the in-memory model's logits, written by the
run itself through tests/hooks.py --record_logits). For each run: did it finish; its per-step losses
against its reference run (max |diff| over the common steps); is the saved model (or adapter)
complete — the same tensor names and full shapes as the base model (or the 1-GPU adapter);
do the saved weights compute the logits the in-memory model computed; and how far they are
from the reference run's saved model.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch

# name: (reference run for losses and logits, kind of output)
RUNS = {
    "ref": (None, "model"),
    "ddp": ("ref", "model"),
    "fsdp": ("ref", "model"),
    "fsdp_offload": ("ref", "model"),
    "zero2": ("ref", "model"),
    "zero3": ("ref", "model"),
    "zero3_offload": ("ref", "model"),
    "accelerate_ddp": ("ref", "model"),
    "multinode": ("ddp", "model"),
    "fsdp_resume": ("fsdp", "model"),
    "lora_ref": (None, "adapter"),
    "lora_zero3": ("lora_ref", "adapter"),
    "lora_zero3_resume": ("lora_zero3", "adapter"),
    "lora_zero3_merged": ("lora_zero3", "merged"),
}
# bf16 tolerances: the per-step loss within 2 % of the reference's, logits within 5 % of their
# largest magnitude (the 1-GPU runs use fp32 weights under bf16 autocast, DeepSpeed bf16 weights,
# FSDP bf16 compute over fp32 shards: the same training, not the same rounding).
LOSS_RTOL = float(os.environ.get("LOSS_RTOL", "0.02"))
LOGITS_RTOL = float(os.environ.get("LOGITS_RTOL", "0.05"))


def device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def build_base(shape: str, tokenizer_dir: str, out: str) -> None:
    """A random-init model of `shape` (a config JSON, or "tiny" for a CPU dry run) with the
    tokenizer's vocabulary, saved in bf16 with the tokenizer: every run starts from it."""
    import transformers

    if shape == "tiny":
        config = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, vocab_size=151936)
    else:
        with open(shape) as f:
            config = json.load(f)
    config.pop("architectures", None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                          dtype=torch.bfloat16)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {shape}, {n / 1e6:.1f}M parameters, {len(model.state_dict())} tensors -> {out}")


def losses(run_dir: str) -> dict[int, float]:
    path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        history = json.load(f)["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def saved_shapes(run_dir: str) -> dict[str, tuple]:
    from lmforge.training.verify_save import saved_shapes as read

    return read(run_dir) if os.path.isdir(run_dir) else {}


def load_for_logits(work: str, name: str, kind: str):
    """The saved model of run `name` on the device: a full model, or the base with the adapter."""
    import transformers

    run_dir = os.path.join(work, "runs", name)
    if kind == "adapter":
        import peft

        base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(work, "base"), dtype=torch.float32)
        return peft.PeftModel.from_pretrained(base, run_dir).to(device()).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(run_dir).to(device()).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits under bf16 autocast when the run trained in bf16 (as the in-memory model did)."""
    bf16 = os.environ.get("GPU_MULTI_BF16", "True") == "True"
    with torch.no_grad(), torch.autocast(device().type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids.to(device()), use_cache=False).logits.float().cpu()


def status(work: str, name: str) -> tuple[str, float]:
    path = os.path.join(work, "rc", name)
    if not os.path.isfile(path):
        return "not run", 0.0
    rc, seconds = open(path).read().split()[:2]
    return ("ok" if rc == "0" else f"rc={rc}"), float(seconds)


def peak_gib(work: str, name: str) -> str:
    path = os.path.join(work, "logs", f"{name}.log")
    found = re.findall(r"peak GPU memory ([\d.]+) GiB", open(path, errors="replace").read()) \
        if os.path.isfile(path) else []
    return found[-1] if found else "-"


def resumed_from(work: str, name: str) -> str:
    path = os.path.join(work, "logs", f"{name}.log")
    text = open(path, errors="replace").read() if os.path.isfile(path) else ""
    found = re.findall(r"resuming from \S*?(checkpoint-\d+)", text)
    return found[-1] if found else "-"


def failure_tail(work: str, name: str, lines: int = 6) -> list[str]:
    """The last error-looking lines of a failed run's log (warnings left out)."""
    paths = [os.path.join(work, "logs", n) for n in sorted(os.listdir(os.path.join(work, "logs")))
             if n.startswith(name) and n.endswith(".log")]
    picked: list[str] = []
    for path in paths:
        text = open(path, errors="replace").read().splitlines()
        hits = [l for l in text if re.search(r"Error|error:|Traceback|FAILED|Killed|Timeout|timed out", l)
                and "Warning" not in l]
        picked += [f"  {os.path.basename(path)}: {l.strip()[:240]}" for l in (hits or text)[-lines:]]
    return picked


def compare_losses(mine: dict[int, float], ref: dict[int, float], from_step: int = 1) -> tuple[str, bool]:
    common = [s for s in mine if s in ref and s >= from_step]
    if not common:
        return "-", False
    diff = max(abs(mine[s] - ref[s]) for s in common)
    rel = max(abs(mine[s] - ref[s]) / max(abs(ref[s]), 1e-6) for s in common)
    return f"{diff:.2e} ({len(common)} steps)", rel <= LOSS_RTOL


def report(work: str) -> int:
    # The token sequence the runs' RecordLogits used (tests/hooks.py, next to the other test callbacks).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from hooks import fixed_input_ids

    base_shapes = saved_shapes(os.path.join(work, "base"))
    vocab = json.load(open(os.path.join(work, "base", "config.json")))["vocab_size"]
    ids = torch.tensor([fixed_input_ids(vocab)])
    run_losses = {name: losses(os.path.join(work, "runs", name)) for name in RUNS}
    saved_logits: dict[str, torch.Tensor] = {}
    rows, failures, verdicts = [], [], []
    for name, (ref, kind) in RUNS.items():
        state, seconds = status(work, name)
        if state == "not run":
            continue
        run_dir = os.path.join(work, "runs", name)
        row = {"run": name, "status": state, "s": f"{seconds:.0f}", "peak": peak_gib(work, name)}
        steps = run_losses.get(name, {})
        row["steps"] = str(max(steps)) if steps else "-"
        row["final loss"] = f"{steps[max(steps)]:.3f}" if steps else "-"
        from_step = 1
        if name.endswith("_resume"):
            row["resumed"] = resumed_from(work, name)
            m = re.search(r"(\d+)$", row["resumed"])
            from_step = int(m.group(1)) + 1 if m else 1
        loss_ok = True
        if ref is not None and kind != "merged":
            row["loss d"], loss_ok = compare_losses(steps, run_losses.get(ref, {}), from_step)
        shapes = saved_shapes(run_dir)
        if kind == "model" or kind == "merged":
            expected = base_shapes
        else:
            expected = saved_shapes(os.path.join(work, "runs", "lora_ref")) if name != "lora_ref" else shapes
        # Whole: every tensor of the base (or the 1-GPU adapter) under its name at its shape.
        # Extra tensors are counted, not failed: a ZeRO-2 save of a tied model repeats the head.
        whole = sum(1 for k, v in expected.items() if shapes.get(k) == v)
        complete = bool(shapes) and whole == len(expected)
        extra = len(set(shapes) - set(expected))
        row["saved"] = (f"{whole}/{len(expected)} " + ("whole" if complete else "INCOMPLETE") +
                        (f" +{extra}" if extra else "")) if shapes else "none"
        logits_ok = True
        if shapes and state == "ok":
            try:
                model = load_for_logits(work, name, "model" if kind == "merged" else kind)
                saved_logits[name] = logits_of(model, ids)
                del model
            except Exception as e:  # a save that does not load is itself the finding
                row["logits"] = f"load failed: {type(e).__name__}: {str(e)[:80]}"
                logits_ok = False
            mem_name = ref if kind == "merged" else name
            mem_path = os.path.join(work, "logits", f"{mem_name}.pt")
            if name in saved_logits and os.path.isfile(mem_path):
                mem = torch.load(mem_path)["logits"]
                d = (saved_logits[name] - mem).abs().max().item()
                scale = mem.abs().max().item()
                row["logits d(mem)"] = f"{d:.3f}/{scale:.1f}"
                logits_ok = d <= LOGITS_RTOL * scale
            if name in saved_logits and ref in saved_logits and kind != "merged":
                d = (saved_logits[name] - saved_logits[ref]).abs().max().item()
                row["logits d(ref)"] = f"{d:.3f}"
        resumed_ok = not name.endswith("_resume") or row.get("resumed", "-") != "-"  # it did resume
        ok = state == "ok" and complete and loss_ok and logits_ok and resumed_ok
        row["verdict"] = "PASS" if ok else "FAIL"
        verdicts.append(ok)
        rows.append(row)
        if state != "ok":
            failures += [f"{name}: {state}"] + failure_tail(work, name)
    if "ref" in saved_logits:
        # The scale of training: a save that silently kept the base weights would sit this far away.
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(work, "base")).to(device()).eval()
        moved = (logits_of(base, ids) - saved_logits["ref"]).abs().max().item()
        del base
    else:
        moved = None
    columns = ["run", "status", "steps", "final loss", "loss d", "resumed", "saved", "logits d(mem)",
               "logits d(ref)", "peak", "s", "verdict"]
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")).ljust(widths[c]) for c in columns))
    print(f"loss d: max |loss - reference's| over common steps (after the resumed checkpoint for *_resume), "
          f"PASS within {LOSS_RTOL:.0%} of the loss; saved: tensors with the base's (adapter: the 1-GPU "
          f"adapter's) names and full shapes, +extra ones; logits d(mem): max |saved - in-memory| / max |logits|, PASS "
          f"within {LOGITS_RTOL:.0%}; logits d(ref): max |saved - reference run's saved|; peak: GiB on rank 0; "
          f"s: wall seconds (runs overlapped).")
    if moved is not None:
        print(f"training moved the logits: max |ref's saved - base| = {moved:.3f}")
    if "ref" in run_losses and run_losses["ref"]:
        ref = run_losses["ref"]
        print("ref losses: " + " ".join(f"{ref[s]:.3f}" for s in sorted(ref)))
    for line in failures:
        print(line)
    print(f"{sum(verdicts)}/{len(verdicts)} runs PASS")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "base":
        build_base(sys.argv[2], sys.argv[3], sys.argv[4])
    elif command == "report":
        sys.exit(report(sys.argv[2]))
    else:
        sys.exit(f"unknown command {command}")
