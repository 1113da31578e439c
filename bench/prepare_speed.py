"""Data preparation speed and memory (CPU), side by side in one run.

    python bench/prepare_speed.py                                   # all three parts
    python bench/prepare_speed.py --scaling_records 100000 --memory_records 1000000

1. Rendering, one process, one thread (TOKENIZERS_PARALLELISM=false), the FastChat dummy
   conversations with the tokenizer's own template: conversations/s of (a) HF
   `apply_chat_template` once per conversation, tokenized (no masks), (b) the same in one
   batched call, (c) lmforge's renderer as it was at --baseline_rev (read from git, skipped
   without it), (d) lmforge's renderer now (masks on the
   rendered text; `Renderer.render_batch`, 256 per batch, what `prepare` uses). Before timing,
   (d)'s ids are checked to equal (a)'s, and (c) and (d) are compared record by record. Each
   figure is the best of --rounds, the methods interleaved: conversations per second of wall
   time, and per second of the process's CPU time (what one process does with a core to
   itself, the figure to read on a machine shared with other work); the ratio is of the
   latter, to (a).
2. End to end, `prepare()` (read, validate, render, write the Arrow cache) of --scaling_records
   synthetic ShareGPT-like conversations with 1 and with 2 processes, or the --workers counts
   (`--preprocessing_num_workers`; 0 is the default count), in conversations/s and tokens/s.
3. Memory: `prepare()` of --memory_records synthetic conversations in a fresh process; peak RSS
   (getrusage) of the main process and of the largest worker.

Synthetic conversations (a JSON list, as ShareGPT is shipped): each joins 1 to 3 dummy
conversations picked at random (2 to 18 turns) and appends a random number to every message,
so that no two records are the same text. They are shorter than real ShareGPT (mean ≈ 180
tokens against ≈ 630): per-conversation costs weigh more here than they would there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LMFORGE_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
DEFAULT_TOKENIZER = os.path.join(SHARED, "tokenizers", "qwen2.5-0.5b-instruct")
DEFAULT_DATA = os.path.join(SHARED, "fastchat_dummy_conversation.json")


def load_conversations(path: str):
    from lmforge.data.records import iter_conversations

    return [conversation for _, conversation in iter_conversations(path)]


def renderer_at(rev: str):
    """lmforge's `render.py` as it was at git revision `rev`, as a module (None where git or
    the revision is not there): the previous renderer timed beside today's in one run."""
    import importlib.util

    try:
        source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:lmforge/data/render.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = os.path.join(tempfile.mkdtemp(prefix="lmforge-render-"), "render_at_rev.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("render_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_at_rev"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def render_rates(tokenizer, conversations, rounds: int, baseline_rev: str) -> dict[str, tuple[float, float]]:
    from lmforge.data.render import Renderer
    from lmforge.errors import RecordError

    renderer = Renderer(tokenizer, tokenizer.chat_template)
    messages = [c.as_dicts() for c in conversations]
    spans = renderer.render_batch(conversations)
    assert not any(isinstance(r, RecordError) for r in spans)
    assert [r.input_ids for r in spans] == [tokenizer.apply_chat_template(m)["input_ids"] for m in messages]

    methods = {
        "HF apply_chat_template, once per conversation (no masks)":
            lambda: [tokenizer.apply_chat_template(m) for m in messages],
        "HF apply_chat_template, one batched call (no masks)": lambda: tokenizer.apply_chat_template(messages),
    }
    previous = renderer_at(baseline_rev)
    if previous is not None:
        old = previous.Renderer(tokenizer, tokenizer.chat_template)
        before = old.render_batch(conversations)
        same = sum(not isinstance(b, Exception) and (b.input_ids, b.labels) == (a.input_ids, a.labels)
                   for a, b in zip(spans, before))
        print(f"lmforge at {baseline_rev} and now: "
              f"{same} of {len(conversations)} records identical")
        methods[f"lmforge at {baseline_rev}"] = \
            lambda: [old.render_batch(conversations[i : i + 256]) for i in range(0, len(conversations), 256)]
    methods["lmforge now"] = \
        lambda: [renderer.render_batch(conversations[i : i + 256]) for i in range(0, len(conversations), 256)]
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for r in range(rounds):  # interleaved, so that a busy moment on the machine hits every method,
        for name, fn in order if r % 2 == 0 else order[::-1]:  # each in turn first and last
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    n = len(conversations)
    return {name: (n / min(wall[name]), n / min(cpu[name])) for name in methods}


def write_synthetic(path: str, source: str, n: int, seed: int = 0) -> None:
    """`n` ShareGPT records, streamed to `path` as one JSON list."""
    records = json.load(open(source))
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            turns = []
            for record in rng.sample(records, rng.randint(1, 3)):
                for turn in record["conversations"]:
                    turns.append({"from": turn["from"], "value": f"{turn['value']} ({rng.randrange(10**6)})"})
            f.write(("" if i == 0 else ",\n") + json.dumps({"id": f"synthetic_{i}", "conversations": turns}))
        f.write("\n]\n")


PREPARE_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from lmforge.data.encode import CHAT, prepare
from lmforge.data.options import ChatOptions
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
start = time.perf_counter()
cache = prepare(CHAT, [{data!r}], tokenizer, ChatOptions(), tokenizer.chat_template, cache_dir={cache!r},
                num_workers={workers})
seconds = time.perf_counter() - start
size = sum(os.path.getsize(os.path.join(cache.path, f)) for f in os.listdir(cache.path))
print(json.dumps({{"seconds": seconds, "kept": cache.stats.kept, "tokens": cache.stats.tokens,
                   "trained_tokens": cache.stats.trained_tokens, "cache_bytes": size,
                   "main_cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
                   "workers_cpu_s": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]),
                   "main_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "worker_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""


CAPACITY_CHILD = r"""
import os, sys, time
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from lmforge.data.records import iter_conversations
from lmforge.data.render import Renderer
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
conversations = [c for _, c in iter_conversations({data!r})]
renderer = Renderer(tokenizer, tokenizer.chat_template)
renderer.render_batch(conversations)
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()
start, n = time.perf_counter(), 0
while time.perf_counter() - start < {seconds}:
    renderer.render_batch(conversations)
    n += len(conversations)
print(n / (time.perf_counter() - start))
"""


def capacity(copies: int, data: str, tokenizer: str, seconds: float = 8.0) -> float:
    """Conversations/s of `copies` renderer loops run at once (summed): how much parallel work the
    machine takes at this moment, other users' work included."""
    code = CAPACITY_CHILD.format(root=ROOT, tokenizer=tokenizer, data=data, seconds=seconds)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # start together
        p.stdin.write("go\n")
        p.stdin.flush()
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def prepare_in_child(data: str, tokenizer: str, workers: int, scratch: str) -> dict:
    """`prepare()` in a fresh interpreter (so its peak RSS is its own), into a fresh cache."""
    cache = tempfile.mkdtemp(dir=scratch, prefix="cache-")
    code = PREPARE_CHILD.format(root=ROOT, tokenizer=tokenizer, data=data, cache=cache, workers=workers or None)
    try:
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    said = re.search(r"lmforge: tokenizing .* in (\d+ process(?:es)?) \((.*)\)", out)
    return {**json.loads(out.strip().splitlines()[-1]), "processes": ": ".join(said.groups()) if said else "?"}


def versions() -> str:
    import tokenizers
    import transformers

    return (f"python {platform.python_version()}, transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    parser.add_argument("--data", default=DEFAULT_DATA, help="ShareGPT JSON list (default: FastChat's dummy data)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--baseline_rev", default="1f99034",
                        help="git revision whose renderer is timed beside today's (default: the last before the "
                             "data path became one chain of stage modules, 2026-12-02; 5dea9bc is the last with "
                             "token-prefix masks, whose render.py needs that revision's lmforge.data.formats)")
    parser.add_argument("--scaling_records", type=int, default=50_000, help="0 skips the 1 vs 2 process run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="process counts to run prepare() with; 0: lmforge's default (one per 4 MiB of data, "
                             "at most the usable cores)")
    parser.add_argument("--memory_records", type=int, default=200_000, help="0 skips the memory run")
    parser.add_argument("--memory_workers", type=int, default=2)
    parser.add_argument("--scratch", default=None, help="directory for the synthetic data and caches")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    print(f"# {versions()}; load average {os.getloadavg()[0]:.2f}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    conversations = load_conversations(args.data)
    print(f"\n## Rendering: {len(conversations)} conversations, one process, one thread, best of {args.rounds}")
    rates = render_rates(tokenizer, conversations, args.rounds, args.baseline_rev)
    baseline = rates["HF apply_chat_template, once per conversation (no masks)"]
    print(f"{'':58s} {'conv/s':>8s}  {'per CPU-s':>9s}  {'ratio':>5s}")
    for name, (rate, per_cpu_second) in rates.items():
        print(f"{name:58s} {rate:8,.0f}  {per_cpu_second:9,.0f}  {per_cpu_second / baseline[1]:5.2f}x")

    scratch = tempfile.mkdtemp(prefix="lmforge-prep-bench-", dir=args.scratch)
    try:
        if args.scaling_records:
            data = os.path.join(scratch, "scaling.json")
            write_synthetic(data, args.data, args.scaling_records)
            alone, together = (capacity(n, args.data, args.tokenizer) for n in (1, 2))
            print(f"\n## Machine capacity now: 2 renderer loops at once give {together / alone:.2f}x one loop "
                  f"({alone:,.0f} vs {together:,.0f} conv/s)")
            print(f"\n## prepare(), {args.scaling_records:,} synthetic conversations, end to end")
            one = None
            for workers in args.workers:
                r = prepare_in_child(data, args.tokenizer, workers, scratch)
                rate = r["kept"] / r["seconds"]
                one = one or rate
                name = f"{workers} process(es)" if workers else f"default ({r['processes']})"
                print(f"{name}: {rate:8,.0f} conv/s, {r['tokens'] / r['seconds']:10,.0f} tokens/s  "
                      f"({r['seconds']:.1f} s, {rate / one:.2f}x; "
                      f"CPU s: main {r['main_cpu_s']:.1f}, workers {r['workers_cpu_s']:.1f}; "
                      f"{r['tokens'] / r['kept']:.0f} tokens/conv)")
        if args.memory_records:
            data = os.path.join(scratch, "memory.json")
            write_synthetic(data, args.data, args.memory_records)
            size = os.path.getsize(data)
            print(f"\n## Memory: prepare() of {args.memory_records:,} synthetic conversations "
                  f"({size / 2**20:,.0f} MiB of JSON), {args.memory_workers} worker(s)")
            r = prepare_in_child(data, args.tokenizer, args.memory_workers, scratch)
            print(f"{r['kept']:,} records, {r['tokens']:,} tokens in {r['seconds']:.0f} s "
                  f"({r['kept'] / r['seconds']:,.0f} conv/s); cache {r['cache_bytes'] / 2**20:,.0f} MiB")
            print(f"peak RSS: main process {r['main_rss_kib'] / 2**20:.2f} GiB, "
                  f"largest worker {r['worker_rss_kib'] / 2**20:.2f} GiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
