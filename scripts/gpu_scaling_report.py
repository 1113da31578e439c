"""Helpers of scripts/gpu_scaling.sh: writes the synthetic
conversations the runs train on, and reads what the runs logged into one table.

    python3 scripts/gpu_scaling_report.py check SHAPE TOKENIZER
    python3 scripts/gpu_scaling_report.py data BASE RECORDS MAXLEN WORK
    python3 scripts/gpu_scaling_report.py report WORK WARMUP

`check` stops when the shape's vocabulary is smaller than the tokenizer (lmforge would grow the
embeddings, and the runs would train another shape). `data` writes WORK/data.json, ShareGPT conversations whose token lengths are drawn as
bench/sft_throughput.py draws its records (log-normal, median ~450 tokens, heavy tail): each
record's token ids, decoded with the base's tokenizer, the first half as the human turn and the
second as the gpt turn (which carries the loss, as the bench records' second half does). It
also writes WORK/stats.json: the base's parameter count, layers and hidden size, and the mean
attention context of a token (documents attend only within themselves when packed), which the
FLOP count of the MFU needs.

`report` reads WORK/plan (the runs, one NAME NPROC a line, in order), WORK/rc/NAME ("returncode
seconds [note]"), WORK/runs/NAME (lmforge's trainer_state.json and lmforge_run.json) and
WORK/logs/NAME.log, and prints one row per run: processes, engine, useful tokens/s of all
processes and per process over the steps after WARMUP, MFU, the first process' peak memory, and
the scaling efficiency against the same engine on 2 processes (tokens/s per GPU at N / at 2).
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PEAK_FLOPS = 989e12  # dense bf16 per GPU, H100 SXM and H200 alike
REFERENCE_NPROC = 2


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def count_parameters(config) -> int:
    """Parameters of the model `config` builds, counted on the meta device (no memory, no init)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def mean_context(lengths: list[int]) -> float:
    """The mean number of positions a token attends to, over all tokens, when each document
    attends only within itself: sum(L^2 / 2) / sum(L), as bench/sft_throughput.py counts it."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / 2 / total if total else 0.0


def check_vocabulary(tokenizer, vocab_size: int, shape: str) -> None:
    """lmforge grows a model's embeddings to its tokenizer's size: with a larger tokenizer the runs
    would not train the shape asked for (nor count its FLOPs)."""
    if len(tokenizer) > vocab_size:
        sys.exit(f"gpu_scaling: {shape} has a vocabulary of {vocab_size:,}, the tokenizer {len(tokenizer):,} tokens: "
                 f"lmforge would grow the embeddings; pass a tokenizer of at most {vocab_size:,} tokens (TOKENIZER=...)")


def check_shape(shape: str, tokenizer_dir: str) -> None:
    """Before the base is built (minutes for a 7B shape): the shape's vocabulary holds the tokenizer."""
    import transformers

    if not os.path.isfile(shape):
        return  # "tiny": gpu_multi_check.py's shape, sized for the Qwen2.5 tokenizer
    with open(shape) as f:
        vocab_size = json.load(f)["vocab_size"]
    check_vocabulary(transformers.AutoTokenizer.from_pretrained(tokenizer_dir), vocab_size, shape)


def write_data(base: str, records: int, max_length: int, work: str) -> None:
    import transformers

    sys.path.insert(0, ROOT)
    from bench.sft_throughput import synthetic_records

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    config = transformers.AutoConfig.from_pretrained(base)
    check_vocabulary(tokenizer, config.vocab_size, base)
    # tokenizer.vocab_size leaves out the added (special) tokens: no decoded text holds a
    # template's control token.
    drawn = synthetic_records(records, tokenizer.vocab_size, seed=0)
    firsts = [r["input_ids"][: len(r["input_ids"]) // 2] for r in drawn]
    seconds = [r["input_ids"][len(r["input_ids"]) // 2:] for r in drawn]
    texts = tokenizer.batch_decode(firsts + seconds)
    conversations = [{"id": f"synthetic-{i}",
                      "conversations": [{"from": "human", "value": texts[i]},
                                        {"from": "gpt", "value": texts[records + i]}]} for i in range(records)]
    with open(os.path.join(work, "data.json"), "w") as f:
        json.dump(conversations, f, ensure_ascii=False)
    # The lengths as trained: rendered with the chat template (decoded text re-tokenizes to
    # about 10 % more tokens, the template adds its own), cut at model_max_length as lmforge cuts.
    rendered = tokenizer.apply_chat_template(
        [[{"role": "user", "content": c["conversations"][0]["value"]},
          {"role": "assistant", "content": c["conversations"][1]["value"]}] for c in conversations],
        tokenize=True, return_dict=False)
    lengths = [min(len(ids), max_length) for ids in rendered]
    stats = {"records": records, "tokens": sum(lengths), "mean_context": mean_context(lengths),
             "params": count_parameters(config), "num_hidden_layers": config.num_hidden_layers,
             "hidden_size": config.hidden_size, "vocab_size": config.vocab_size, "max_length": max_length}
    with open(os.path.join(work, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"data: {records} conversations, {stats['tokens']:,} tokens (mean {stats['tokens'] / records:.0f}), "
          f"mean attention context {stats['mean_context']:.0f}; model {stats['params'] / 1e9:.3f}B parameters")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

MEMORY_KEYS = ("peak_gpu_memory_gib", "peak_rss_gib")


def training_logs(run_dir: str) -> tuple[list[dict], str]:
    """The run's training logs (those with lmforge's token fields), each with its step, and
    where they were read: trainer_state.json when the run got to its final save, else
    lmforge_log.jsonl, which lmforge appends every log to as it happens (a step logged twice,
    by a resumed run, counts once: the later entry)."""
    state = os.path.join(run_dir, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as f:
            history = json.load(f).get("log_history", [])
        return [h for h in history if "tokens_per_second" in h and "tokens" in h], "trainer_state.json"
    path = os.path.join(run_dir, "lmforge_log.jsonl")
    if not os.path.isfile(path):
        return [], "no log"
    by_step: dict[int, dict] = {}
    with open(path, errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if isinstance(entry, dict) and "tokens_per_second" in entry and "tokens" in entry:
                by_step[int(entry["step"])] = entry
    return [by_step[step] for step in sorted(by_step)], "lmforge_log.jsonl"


def timed_rate(logs: list[dict], warmup: int) -> tuple[float | None, int]:
    """Useful tokens/s of all processes over the log intervals that start at step `warmup` or
    later: each interval's tokens (the difference of the running totals) over its seconds
    (those tokens / the interval's tokens_per_second). Returns the rate and the steps timed."""
    tokens = seconds = 0.0
    steps = 0
    previous_step, previous_tokens = 0, 0
    for entry in sorted(logs, key=lambda h: h["step"]):
        interval = entry["tokens"] - previous_tokens
        if previous_step >= warmup and entry["tokens_per_second"] > 0:
            tokens += interval
            seconds += interval / entry["tokens_per_second"]
            steps += entry["step"] - previous_step
        previous_step, previous_tokens = entry["step"], entry["tokens"]
    return (tokens / seconds if seconds > 0 else None), steps


def flops_per_token(stats: dict, lora: bool) -> float:
    """bench/sft_throughput.py's count: 6N (4N for LoRA, whose frozen weights get no weight
    gradient) plus causal attention over the mean context."""
    from types import SimpleNamespace

    sys.path.insert(0, ROOT)
    from bench.sft_throughput import flops_per_token as bench_flops

    config = SimpleNamespace(num_hidden_layers=stats["num_hidden_layers"], hidden_size=stats["hidden_size"])
    return bench_flops(config, stats["params"], stats["mean_context"], lora)


def mfu(tokens_per_second: float, nproc: int, flops: float, peak: float = PEAK_FLOPS) -> float:
    return tokens_per_second * flops / (nproc * peak)


def scaling_efficiency(per_gpu: float, reference_per_gpu: float | None) -> float | None:
    """Tokens/s per GPU at N over tokens/s per GPU at the reference count: 1.0 is linear scaling."""
    if not reference_per_gpu:
        return None
    return per_gpu / reference_per_gpu


def engine_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def read_plan(work: str) -> list[tuple[str, int]]:
    plan = []
    path = os.path.join(work, "plan")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    name, nproc = line.split()[:2]
                    plan.append((name, int(nproc)))
    return plan


def read_rc(work: str, name: str) -> tuple[int | None, str]:
    path = os.path.join(work, "rc", name)
    if not os.path.isfile(path):
        return None, ""
    with open(path) as f:
        words = f.read().split(maxsplit=2)
    rc = int(words[0]) if words else None
    seconds = f"{words[1]} s" if len(words) > 1 else ""
    note = words[2].strip() if len(words) > 2 else ""
    return rc, ", ".join(x for x in (seconds, note) if x)


def last_error(log_file: str) -> str:
    """The log's last line that names an error, shortened: what a failed row shows."""
    if not os.path.isfile(log_file):
        return ""
    found = ""
    with open(log_file, errors="replace") as f:
        for line in f:
            if re.search(r"Error|error:|out of memory|killed past", line) and "Warning" not in line:
                found = line.strip()
    return found[:110]


def row_log(work: str, name: str) -> str:
    return os.path.join(work, "logs", f"{name}.log")


def run_rows(work: str, warmup: int) -> list[dict]:
    with open(os.path.join(work, "stats.json")) as f:
        stats = json.load(f)
    rows = []
    for name, nproc in read_plan(work):
        engine = engine_of(name)
        row = {"name": name, "engine": engine, "nproc": nproc}
        rc, detail = read_rc(work, name)
        run_dir = os.path.join(work, "runs", name)
        info_path = os.path.join(run_dir, "lmforge_run.json")
        if os.path.isfile(info_path):
            with open(info_path) as f:
                info = json.load(f)
            row["nproc"] = int(info.get("world_size", nproc))
            row["device"] = info.get("device")
        logs, source = training_logs(run_dir)
        rate, steps = timed_rate(logs, warmup)
        memory = [h[k] for h in logs for k in MEMORY_KEYS if k in h]
        row.update(rc=rc, detail=detail, steps=steps, source=source)
        if rate is not None:
            row["tokens_per_second"] = rate
            row["per_gpu"] = rate / row["nproc"]
            row["mfu"] = mfu(rate, row["nproc"], flops_per_token(stats, lora=engine.startswith("lora")))
        if memory:
            row["peak_gib"] = max(memory)
            row["memory_kind"] = "GPU" if any("peak_gpu_memory_gib" in h for h in logs) else "RSS"
        if rc is None:
            row["status"] = "pending"
        elif rc != 0:
            row["status"] = f"failed (rc {rc}{', ' + detail if detail else ''}): {last_error(row_log(work, name))}"
        elif rate is None:
            row["status"] = f"no timed steps (fewer than {warmup} + 1 logged)"
        else:
            row["status"] = "ok"
        rows.append(row)
    for row in rows:
        reference = next((r for r in rows if r["engine"] == row["engine"] and r["nproc"] == REFERENCE_NPROC
                          and r.get("per_gpu")), None)
        if row.get("per_gpu"):
            row["scaling"] = scaling_efficiency(row["per_gpu"], reference["per_gpu"] if reference else None)
    return rows


def format_table(rows: list[dict], stats: dict, warmup: int) -> str:
    device = next((r["device"] for r in rows if r.get("device")), "not known yet")
    kinds = {r["memory_kind"] for r in rows if r.get("memory_kind")}
    memory = "the first process' peak RSS" if kinds == {"RSS"} else "the first GPU's peak (PyTorch allocations)"
    lines = [
        (f"scaling: {stats['params'] / 1e9:.2f}B parameters ({stats['num_hidden_layers']} layers, hidden "
         f"{stats['hidden_size']}), packed rows of {stats['max_length']} tokens, mean attention context "
         f"{stats['mean_context']:.0f}; device {device}"),
        (f"tok/s: useful tokens of all GPUs from step {warmup} on; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s per "
         f"GPU; peak: {memory}; scaling: tok/s per GPU at N / at {REFERENCE_NPROC} GPUs, same engine"),
        (f"{'run':<16}{'GPUs':>5}  {'engine':<11}{'tok/s':>11}{'tok/s/GPU':>11}{'MFU':>7}{'peak GiB':>10}"
         f"{'scaling':>9}  status"),
    ]
    for r in rows:
        head = f"{r['name']:<16}{r['nproc']:>5}  {r['engine']:<11}"
        if "tokens_per_second" in r:
            scaling = f"{r['scaling']:.2f}" if r.get("scaling") is not None else "-"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            lines.append(f"{head}{r['tokens_per_second']:>11,.0f}{r['per_gpu']:>11,.0f}{100 * r['mfu']:>6.1f}%"
                         f"{peak:>10}{scaling:>9}  {r['status']} ({r['steps']} steps timed, from {r['source']}"
                         f"{', ' + r['detail'] if r['detail'] else ''})")
        else:
            lines.append(f"{head}{'':>11}{'':>11}{'':>7}{'':>10}{'':>9}  {r['status']}")
    pending = sum(r["status"] == "pending" for r in rows)
    if pending:
        lines.append(f"{pending} run(s) pending: run the same command again (runs done are kept in the work directory)")
    return "\n".join(lines)


def report(work: str, warmup: int) -> int:
    stats_path = os.path.join(work, "stats.json")
    if not os.path.isfile(stats_path):
        print(f"report: {stats_path} missing: the data step did not run")
        return 1
    with open(stats_path) as f:
        stats = json.load(f)
    rows = run_rows(work, warmup)
    table = format_table(rows, stats, warmup)
    print(table)
    with open(os.path.join(work, "table.txt"), "w") as f:
        f.write(table + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "check":
        check_shape(argv[2], argv[3])
        return 0
    if len(argv) == 6 and argv[1] == "data":
        write_data(argv[2], int(argv[3]), int(argv[4]), argv[5])
        return 0
    if len(argv) == 4 and argv[1] == "report":
        return report(argv[2], int(argv[3]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
