"""GRPO's sampling, alone: transformers' `generate` under the caches lmforge can choose, and
lmforge's engine (`rollout.TransformersEngine`, which adds the entropy meter, left padding to
a 64-token bucket and a forked RNG), on one batch of a GRPO step; with --lora, the engine on a
LoRA r16 model (all linear layers) with the adapters unmerged, as lmforge samples, and merged
into the weights for the call (the base weights copied before and restored after, so that the
training weights stay exact).

    python bench/grpo_generation.py --tokenizer .devdata/tokenizers/qwen2.5-0.5b-instruct

The model is the 0.5B shape, randomly initialised, bf16: it never ends a turn, so each of the
64 completions runs to --tokens tokens. Each row: --warmup untimed calls (the static cache
compiles its decode step in the first), then the median of --calls timed ones (CUDA
synchronised), and completion tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def main() -> None:
    import torch
    import transformers

    from lmforge.rl.rollout import EntropyMeter, Sampling, TransformersEngine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--config", default=os.path.join(HERE, "configs", "qwen2.5-0.5b.json"))
    p.add_argument("--completions", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--lora", action="store_true", help="only the LoRA rows: unmerged and merged")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**json.load(open(a.config)))
    model = transformers.AutoModelForCausalLM.from_config(config).to(device, torch.bfloat16).eval()
    tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = [[1000 + (i * 7 + k) % 5000 for k in range(a.prompt_tokens)] for i in range(a.completions)]
    ids = torch.tensor(prompts, device=device)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                  max_new_tokens=a.tokens, eos_token_id=stop, pad_token_id=stop[0])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = {
        "generate, dynamic cache": lambda: model.generate(**common),
        "generate, static cache": lambda: model.generate(**common, cache_implementation="static"),
        "generate, static + entropy meter": lambda: model.generate(
            **common, cache_implementation="static", logits_processor=[EntropyMeter(1.0)]),
        "lmforge engine, static": lambda: TransformersEngine(stop[0], stop, static_cache=True).complete(
            model, prompts, Sampling(a.tokens), seed=0),
        "lmforge engine, dynamic": lambda: TransformersEngine(stop[0], stop, static_cache=False).complete(
            model, prompts, Sampling(a.tokens), seed=0),
    }
    if a.lora:
        rows = lora_rows(model, prompts, stop, Sampling(a.tokens))
    results = []
    for name, call in rows.items():
        sync()
        t = time.perf_counter()
        for _ in range(a.warmup):
            call()
        sync()
        first = time.perf_counter() - t
        times = []
        for _ in range(a.calls):
            t = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        results.append((name, s, a.completions * a.tokens / s, first))
        print(f"{name:<36}{s:>8.2f} s{a.completions * a.tokens / s:>10.0f} tok/s   (warm-up {first:.1f} s)", flush=True)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")


def lora_rows(model, prompts, stop, sampling) -> dict:
    """lmforge's engine on a LoRA r16 model: adapters unmerged, or merged for the call. The
    adapters' B matrices are random (not PEFT's zeros), so that merging changes the weights."""
    import peft
    import torch

    from lmforge.rl.rollout import TransformersEngine

    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    engine = TransformersEngine(stop[0], stop, static_cache=True)
    bases = [m for m in lora.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]

    def merged():
        saved = [m.base_layer.weight.detach().clone() for m in bases]
        lora.merge_adapter()
        try:
            return engine.complete(lora, prompts, sampling, seed=0)
        finally:
            lora.unmerge_adapter()
            with torch.no_grad():
                for m, w in zip(bases, saved):
                    m.base_layer.weight.copy_(w)

    return {"lmforge engine, static, LoRA unmerged": lambda: engine.complete(lora, prompts, sampling, seed=0),
            "lmforge engine, static, LoRA merged": merged}


if __name__ == "__main__":
    main()
