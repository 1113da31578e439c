"""Where a training step's time goes: torch.profiler over a few steps of the bench's runs.

    python bench/profile_sft.py --shape qwen2.5-0.5b

For each variant: wall time per step, GPU kernel time per step (their ratio says whether the
GPU or the host is the bottleneck), kernel launches per step, and the kernels that take the
most time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import transformers

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cli_throughput import install_profile  # noqa: E402
from sft_throughput import MAX_LEN, Variant, run, synthetic_records  # noqa: E402

from lmforge.data.pack import best_fit_decreasing, pack_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--variants", nargs="+", default=["eager-liger", "eager-chunked", "compile-chunked"])
    args = parser.parse_args()
    config = transformers.AutoConfig.for_model(**json.load(open(f"bench/configs/{args.shape}.json")))
    batch, steps = 8, 10
    records = synthetic_records(batch * steps * 6, config.vocab_size)
    lengths = [len(r["input_ids"]) for r in records]
    bins = best_fit_decreasing(lengths, MAX_LEN, seed=0)[:batch * steps]
    rows = [pack_records([records[i] for i in b]) for b in bins]
    useful = [len(r["input_ids"]) for r in rows]
    context = [1.0] * len(rows)
    named = {
        "eager-liger": Variant("eager-liger", extra={"loss_kernel": "liger"}),
        "eager-chunked": Variant("eager-chunked", extra={"loss_kernel": "chunked"}),
        "compile-chunked": Variant("compile-chunked", compile_blocks=True, extra={"loss_kernel": "chunked"}),
        "compile-liger": Variant("compile-liger", compile_blocks=True, extra={"loss_kernel": "liger"}),
        "model-loss": Variant("model-loss", lmforge=False),
        "compile-flex-chunked": Variant("compile-flex-chunked", compile_blocks=True, attn="flex_attention",
                                        extra={"loss_kernel": "chunked"}),
    }
    os.makedirs("/tmp/lmforge-prof", exist_ok=True)
    for name in args.variants:
        print(f"== {args.shape} {name}", flush=True)
        r = run(args.shape, "full", named[name], config, rows, useful, context, batch, steps, "/tmp/lmforge-prof",
                None, callbacks=[install_profile(first=6, steps=3, path=f"/tmp/lmforge-prof/{name}.profile")])
        print(open(f"/tmp/lmforge-prof/{name}.profile.txt").read(), end="")
        print(f"  {r['tokens_per_s']:,.0f} useful tokens/s, peak {r['peak_gib']:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
