"""torchao float8 training against bf16, on the linear layers of decoder layers, forward + backward on one GPU.

    python bench/fp8_linear.py [--configs qwen2.5-0.5b llama-3.2-1b qwen2.5-7b] [--recipes tensorwise rowwise]
                               [--tokens 16384] [--layers 4] [--reps 20] [--json PATH]

A stack of --layers decoder layers reduced to their seven projections (q, k, v, o, gate, up,
down; shapes from bench/configs/NAME.json, all of them by default), each layer torch.compile'd
on its own as lmforge compiles decoder blocks: once in bf16, then a copy of the same weights
converted with torchao's `convert_to_float8_training` (Float8LinearConfig.from_recipe_name) and
compiled the same way. bf16 weights and activations, 16384 tokens. Prints milliseconds, the
linear layers' TFLOP/s, the extra GPU memory of a step, the ratio bf16 time / float8 time (above
1: float8 is faster) and how far float8's output and input gradient are from bf16's (norm of the
difference / norm of bf16's).

Needs a CUDA GPU of SM89 or newer (float8 matmuls: Ada, Hopper) and torchao, from .hopper/:
    pip install .hopper/torchao-0.18.0-*.whl
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cuda_timing import timed  # bench/cuda_timing.py: this script's folder is on the path

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
Row = dict[str, object]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool  # Qwen2 has biases on q, k and v (its config has no attention_bias key)


def read_shape(name: str) -> Shape:
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    return Shape(name=name, hidden=c["hidden_size"], intermediate=c["intermediate_size"], heads=heads,
                 kv_heads=c.get("num_key_value_heads") or heads,
                 head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                 qkv_bias=c.get("attention_bias", c.get("model_type") == "qwen2"))


class Projections(nn.Module):
    """One decoder layer's linear layers, wired as in the model but without attention and norms
    (not what is measured). In place of attention, q times k plus v per key-value group: one
    element-wise pass that gives all three projections a gradient, the same in both precisions."""

    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[0], self.s
        q = self.q_proj(x).view(n, s.kv_heads, -1, s.head_dim)
        k = self.k_proj(x).view(n, s.kv_heads, 1, s.head_dim)
        v = self.v_proj(x).view(n, s.kv_heads, 1, s.head_dim)
        x = x + self.o_proj((q * k + v).view(n, -1))
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def linear_weights(s: Shape) -> int:
    attn = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
    return attn + 3 * s.hidden * s.intermediate


def require_gpu_and_torchao():
    """torchao.float8, imported; or exit with what is missing or why this GPU can't do float8."""
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_linear.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__})")
    capability = torch.cuda.get_device_capability(0)
    print(f"device: {torch.cuda.get_device_name(0)}, capability {capability}; torch {torch.__version__}", flush=True)
    if capability < (8, 9):
        sys.exit(f"float8 matmuls need compute capability 8.9 or newer (Ada, Hopper); this GPU is "
                 f"{capability[0]}.{capability[1]}")
    try:
        import torchao
        import torchao.float8
    except (ImportError, OSError) as e:
        sys.exit(f"bench/fp8_linear.py needs torchao ({type(e).__name__}: {e}): "
                 "pip install .hopper/torchao-0.18.0-*.whl")
    print(f"torchao {torchao.__version__}", flush=True)
    return torchao.float8


def raise_recompile_limit(limit: int = 64) -> None:
    """Every layer is the same Python code to dynamo, so the configs x precisions x layers make
    more recompilations of it than the default limit (8), after which dynamo would run the rest
    eager without saying so. A higher limit, and an error instead of that silent fallback."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


def rel_norm(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def measure(stack: nn.Sequential, x: torch.Tensor, dy: torch.Tensor, warmup: int,
            reps: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(ms, GiB, output, input gradient) of forward + backward through `stack`."""
    def clear() -> None:
        x.grad = None
        stack.zero_grad(set_to_none=True)

    ms, gib = timed(lambda: stack(x).backward(dy), clear, warmup, reps)
    clear()
    y = stack(x)
    y.backward(dy)
    return ms, gib, y.detach(), x.grad


def bench_shape(float8, s: Shape, recipes: list[str], tokens: int, layers: int, auto_filter: bool,
                warmup: int, reps: int) -> list[Row]:
    torch._dynamo.reset()  # a fresh cache per shape: the recompile limit counts what is left over
    torch.manual_seed(0)
    with torch.device("cuda"):  # built on the GPU: the 7B layers' fp32 init on the CPU is slow
        base = nn.Sequential(*(Projections(s) for _ in range(layers))).to(torch.bfloat16)
    x = torch.randn(tokens, s.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    tflop = 6 * tokens * linear_weights(s) * layers / 1e12  # forward 2, backward 4 FLOPs per weight and token

    bf16 = copy.deepcopy(base)
    for layer in bf16:
        layer.compile()
    bf16_ms, bf16_gib, y_ref, dx_ref = measure(bf16, x, dy, warmup, reps)
    del bf16
    rows = [{"config": s.name, "recipe": "bf16", "layers": layers, "tokens": tokens, "ms": bf16_ms,
             "TFLOP/s": tflop / bf16_ms * 1e3, "GiB": bf16_gib, "bf16/fp8": None}]
    for recipe in recipes:
        row: Row = {"config": s.name, "recipe": recipe, "layers": layers, "tokens": tokens}
        try:
            fp8 = copy.deepcopy(base)
            # Without the auto filter every projection converts, its dims being multiples of 16 (what
            # float8 matmuls need); torchao's auto filter also leaves out those it finds too small to gain.
            keep = (float8._auto_filter_for_recipe(recipe, filter_fqns=[]) if auto_filter
                    else lambda m, fqn: m.in_features % 16 == 0 and m.out_features % 16 == 0)
            float8.convert_to_float8_training(fp8, module_filter_fn=keep,
                                              config=float8.Float8LinearConfig.from_recipe_name(recipe))
            converted = sum(type(m).__name__ == "Float8Linear" for m in fp8.modules())
            for layer in fp8:
                layer.compile()
            ms, gib, y, dx = measure(fp8, x, dy, warmup, reps)
            row.update({"ms": ms, "TFLOP/s": tflop / ms * 1e3, "GiB": gib, "bf16/fp8": bf16_ms / ms,
                        "out rel": rel_norm(y, y_ref), "dx rel": rel_norm(dx, dx_ref),
                        "float8 linears": f"{converted}/{7 * layers}"})
            del fp8, y, dx
        except Exception as e:  # noqa: BLE001 - reported in the table, the other recipes still run
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
    del base, x, dy, y_ref, dx_ref
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[Row]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(key: str, v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if key in ("ms", "bf16/fp8") else f"{v:.0f}" if key == "TFLOP/s" else \
                f"{v:.2f}" if key == "GiB" else f"{v:.1e}"
        return str(v)

    table = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    print("\n" + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)), flush=True)


def main() -> None:
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "*.json")))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=names, default=names, help="bench/configs/NAME.json")
    parser.add_argument("--recipes", nargs="+", choices=("tensorwise", "rowwise", "rowwise_with_gw_hp"),
                        default=["tensorwise", "rowwise"], help="torchao Float8LinearRecipeName values")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the stack, each compiled apart")
    parser.add_argument("--auto-filter", action="store_true",
                        help="convert only the linears torchao's _auto_filter_for_recipe picks (all by default)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (they compile)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()

    float8 = require_gpu_and_torchao()
    raise_recompile_limit()
    shapes = [read_shape(n) for n in args.configs]
    rows = []
    for s in shapes:
        print(f"{s.name}: {asdict(s)}", flush=True)
        rows += bench_shape(float8, s, args.recipes, args.tokens, args.layers, args.auto_filter, args.warmup,
                            args.reps)
    print_table(rows)
    if args.json:
        import torchao

        meta = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                "torch": torch.__version__, "torchao": torchao.__version__, "reps": args.reps,
                "warmup": args.warmup, "shapes": [asdict(s) for s in shapes]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
