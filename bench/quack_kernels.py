"""quack-kernels (Tri Dao's CuTe-DSL kernels) against what lmforge runs now, forward + backward on one GPU.

    python bench/quack_kernels.py [--parts rmsnorm ce lce] [--reps 20] [--warmup 5] [--json PATH]

- rmsnorm: `quack.rmsnorm` against transformers' Qwen2RMSNorm, eager and torch.compile'd (lmforge
  compiles each decoder block, so in training Inductor fuses the norm), 16384 tokens x 896 / 2048 /
  3584 (the 0.5B, 1B and 7B widths), bf16 input and weight.
- ce: cross-entropy on given bf16 logits (vocab 151936 / 128256, 8192 / 16384 tokens, ~30 % labels
  -100). On all rows, as a Hugging Face model hands them over: torch's F.cross_entropy (eager and
  compiled) and `quack.cross_entropy` (autograd: a forward pass, then a backward pass). On the
  labelled rows only, as lmforge's fused loss sees them (it drops the -100 positions before the
  head): quack's one-pass loss + gradient written over the logits (`cross_entropy_fwd`, what its
  chunked head loss runs per chunk) and lmforge's softmax-rows kernel, which does the same job.
- lce: the fused head + loss, `lmforge.modeling.loss.linear_cross_entropy` (what lmforge's fused loss calls)
  against quack's `chunked_linear_cross_entropy`, at the 0.5B, 1B and 7B heads (bench/configs).

Summed loss everywhere (lmforge sums, then divides by the labelled tokens of the window). Times: CUDA
events, median of --reps after --warmup untimed runs (which also compile and autotune). Beside each:
the extra GPU memory a run allocates and the largest absolute difference to fp32 math of the output
and of each gradient (the loss: relative difference); the bf16 baselines show what bf16 itself costs.

Needs a CUDA GPU (quack's fastest paths are for SM90, the H100) and quack-kernels with its
dependencies, from the wheels in .hopper/ (einops too, from PyPI):
    pip install .hopper/quack_kernels-*.whl .hopper/nvidia_cutlass_dsl*.whl .hopper/apache_tvm_ffi-*.whl \
        .hopper/torch_c_dlpack_ext-*.whl einops
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cuda_timing import timed  # noqa: E402 - bench/cuda_timing.py, beside this script

IGNORE = -100  # lmforge.data.render.IGNORE_INDEX
EPS = 1e-6  # Qwen2's rms_norm_eps
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
Row = dict[str, object]


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def require_gpu_and_quack():
    """quack, imported; or exit with what is missing (both only exist on the GPU machine)."""
    if not torch.cuda.is_available():
        sys.exit("bench/quack_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__})")
    try:
        import quack
    except (ImportError, OSError) as e:
        sys.exit(f"bench/quack_kernels.py needs quack-kernels ({type(e).__name__}: {e}); install the wheels "
                 "in .hopper/ (quack_kernels, nvidia_cutlass_dsl*, apache_tvm_ffi, torch_c_dlpack_ext) and einops")
    return quack


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


def rel(a: float, ref: float) -> float:
    return abs(a - ref) / abs(ref)


def labels(tokens: int, vocab: int, ignored: float = 0.3) -> torch.Tensor:
    """Targets with about `ignored` of them -100; the labelled count a multiple of 8, which quack's
    chunked head loss asserts (its GEMMs load rows with TMA)."""
    labelled = round(tokens * (1 - ignored) / 8) * 8
    target = torch.full((tokens,), IGNORE, device="cuda", dtype=torch.long)
    target[torch.randperm(tokens, device="cuda")[:labelled]] = torch.randint(0, vocab, (labelled,), device="cuda")
    return target


def print_table(title: str, rows: list[Row]) -> None:
    """Plain aligned columns: milliseconds and GB/s fixed-point, differences in e-notation."""
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(key: str, v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if key.endswith("ms") else f"{v:.0f}" if key == "GB/s" else \
                f"{v:.2f}" if key == "GiB" else f"{v:.1e}"
        return str(v)

    table = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)), flush=True)


def attempt(row: Row, body: Callable[[], Row]) -> Row:
    """`row` with what `body()` measured, or with the error in `note`: a shape or GPU a kernel
    refuses should not stop the other measurements."""
    try:
        return {**row, **body()}
    except Exception as e:  # noqa: BLE001 - reported in the table
        torch.cuda.synchronize()
        return {**row, "note": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


def rmsnorm_reference(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """y, dx, dw of w * x / rms(x) in fp32."""
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = w32 * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    y.backward(dy.float())
    return y.detach(), x32.grad, w32.grad


def rmsnorm_part(quack, tokens: int, widths: list[int], warmup: int, reps: int) -> list[Row]:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    rows = []
    for hidden in widths:
        torch.manual_seed(0)
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
        dy = torch.randn_like(x)
        ref = rmsnorm_reference(x, w, dy)
        hf = Qwen2RMSNorm(hidden, eps=EPS).to("cuda", torch.bfloat16)
        hf.weight.data.copy_(w)
        qw = w.clone().requires_grad_()
        # dynamic=False: one kernel specialised to each width, as a compiled block of a model gets.
        variants = {"hf Qwen2RMSNorm eager": (hf, hf.weight),
                    "hf Qwen2RMSNorm compiled": (torch.compile(hf, dynamic=False), hf.weight),
                    "quack.rmsnorm": (lambda x: quack.rmsnorm(x, qw, eps=EPS), qw)}
        # The least traffic: the forward reads x and writes y, the backward reads x and dy, writes dx.
        gbytes = 5 * x.numel() * x.element_size() / 1e9
        for name, (norm, weight) in variants.items():
            def clear(weight=weight):
                x.grad = weight.grad = None

            def body(norm=norm, weight=weight, clear=clear) -> Row:
                fwd_ms, _ = timed(lambda: norm(x), clear, warmup, reps)
                ms, gib = timed(lambda: norm(x).backward(dy), clear, warmup, reps)
                clear()
                y = norm(x)
                y.backward(dy)
                return {"fwd ms": fwd_ms, "fwd+bwd ms": ms, "GB/s": gbytes / ms * 1e3, "GiB": gib,
                        "y diff": max_abs(y, ref[0]), "dx diff": max_abs(x.grad, ref[1]),
                        "dw diff": max_abs(weight.grad, ref[2])}

            rows.append(attempt({"tokens": tokens, "hidden": hidden, "variant": name}, body))
        del x, dy, ref, hf, variants
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Cross-entropy on logits
# ---------------------------------------------------------------------------------------------


def ce_reference_diff(logits: torch.Tensor, target: torch.Tensor, loss: float, grad: torch.Tensor,
                      chunk: int = 2048) -> tuple[float, float]:
    """(relative difference of `loss`, largest absolute difference of `grad`) to the summed
    cross-entropy in fp32 and its gradient softmax - one_hot (zero on ignored rows), chunk by chunk
    so no fp32 copy of all the logits is made."""
    ref_loss = torch.zeros((), device="cuda", dtype=torch.float64)
    worst = torch.zeros((), device="cuda")
    for start in range(0, logits.shape[0], chunk):
        z = logits[start:start + chunk].float()
        t = target[start:start + chunk]
        valid, t = (t != IGNORE)[:, None], t.clamp(min=0)[:, None]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        ref_loss += ((lse - z.gather(1, t)) * valid).sum(dtype=torch.float64)
        g = torch.exp(z - lse).scatter_add_(1, t, torch.full_like(t, -1, dtype=z.dtype)) * valid
        worst = torch.maximum(worst, (grad[start:start + chunk].float() - g).abs().max())
    return rel(loss, ref_loss.item()), worst.item()


def torch_ce(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x, target, ignore_index=IGNORE, reduction="sum")


def ce_part(quack, vocabs: list[int], token_counts: list[int], warmup: int, reps: int) -> list[Row]:
    from quack.cross_entropy import cross_entropy_fwd

    from lmforge.kernels import loss_kernel

    compiled_ce = torch.compile(torch_ce, dynamic=False)
    rows = []
    for vocab in vocabs:
        for tokens in token_counts:
            torch.manual_seed(0)
            # Logits of a std of 2, about what a trained head gives; made in bf16 (no fp32 copy).
            logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16).mul_(2).requires_grad_()
            target = labels(tokens, vocab)
            keep = (target != IGNORE).nonzero().squeeze(1)
            # lmforge's head only computes the labelled rows' logits: taken here outside the timing.
            picked, picked_target = logits.detach().index_select(0, keep), target.index_select(0, keep)
            scratch = torch.empty_like(picked)

            def clear_logits():
                logits.grad = None

            def autograd_case(fn):
                def body() -> Row:
                    ms, gib = timed(lambda: fn(logits, target).backward(), clear_logits, warmup, reps)
                    clear_logits()
                    loss = fn(logits, target)
                    loss.backward()
                    loss_diff, grad_diff = ce_reference_diff(logits.detach(), target, loss.item(), logits.grad)
                    return {"ms": ms, "GB/s": 3 * logits.numel() * 2 / ms / 1e6, "GiB": gib,
                            "loss diff": loss_diff, "grad diff": grad_diff}
                return body

            def in_place_case(fn):
                """`fn(x, t)` -> summed loss, overwriting x with its gradient. Timed over and over on
                one scratch copy: after the first run it holds gradients, not logits, but the
                kernels' work does not depend on the values. Checked on a fresh copy."""
                def body() -> Row:
                    scratch.copy_(picked)
                    ms, gib = timed(lambda: fn(scratch, picked_target), lambda: None, warmup, reps)
                    scratch.copy_(picked)
                    loss = fn(scratch, picked_target)
                    loss_diff, grad_diff = ce_reference_diff(picked, picked_target, loss.item(), scratch)
                    # Read twice (the log-sum-exp, then the gradient), written once.
                    return {"ms": ms, "GB/s": 3 * picked.numel() * 2 / ms / 1e6, "GiB": gib,
                            "loss diff": loss_diff, "grad diff": grad_diff}
                return body

            def quack_fused(x, t):
                loss, _ = cross_entropy_fwd(x, t, ignore_index=IGNORE, return_dx=True, inplace_backward=True)
                return loss.sum()

            def lmforge_kernel(x, t):
                lse, target_logit = loss_kernel.softmax_rows(x, t, write_grad=True)
                return (lse - target_logit).sum()

            cases = [
                ("all", "torch F.cross_entropy eager", autograd_case(torch_ce)),
                ("all", "torch F.cross_entropy compiled", autograd_case(compiled_ce)),
                ("all", "quack.cross_entropy (fwd, bwd)",
                 autograd_case(lambda x, t: quack.cross_entropy(x, t, ignore_index=IGNORE, reduction="sum"))),
                ("labelled", "quack cross_entropy_fwd, grad in place", in_place_case(quack_fused)),
                ("labelled", "lmforge loss_kernel.softmax_rows", in_place_case(lmforge_kernel)),
            ]
            for which, name, body in cases:
                n = tokens if which == "all" else len(keep)
                rows.append(attempt({"vocab": vocab, "tokens": tokens, "rows": n, "variant": name}, body))
            del logits, picked, scratch
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Fused head + loss
# ---------------------------------------------------------------------------------------------


def head_reference(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                   chunk: int = 2048) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of h @ w.T (ignored rows count for nothing) and its gradients, in fp32."""
    h32, w32 = h.detach().float(), w.detach().float()
    dh, dw = torch.zeros_like(h32), torch.zeros_like(w32)
    loss = torch.zeros((), device="cuda", dtype=torch.float64)
    for start in range(0, h.shape[0], chunk):
        z = h32[start:start + chunk] @ w32.T
        t = target[start:start + chunk]
        valid, t = (t != IGNORE)[:, None], t.clamp(min=0)[:, None]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        loss += ((lse - z.gather(1, t)) * valid).sum(dtype=torch.float64)
        g = torch.exp(z - lse).scatter_add_(1, t, torch.full_like(t, -1, dtype=z.dtype)) * valid
        dh[start:start + chunk] = g @ w32
        dw += g.T @ h32[start:start + chunk]
    return loss.item(), dh, dw


def lce_part(quack, tokens: int, shapes: list[str], warmup: int, reps: int) -> list[Row]:
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    from lmforge.modeling import loss as lmforge_loss

    rows = []
    for shape in shapes:
        with open(os.path.join(CONFIGS, f"{shape}.json")) as f:
            config = json.load(f)
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        torch.manual_seed(0)
        h_all = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(vocab, hidden, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
        target = labels(tokens, vocab)
        keep = (target != IGNORE).nonzero().squeeze(1)
        ref_loss, ref_dh, ref_dw = head_reference(h_all, w, target)
        # lmforge's fused loss gathers the labelled positions' hidden states before the head.
        inputs = {"all": (h_all.requires_grad_(), target, ref_dh),
                  "labelled": (h_all.detach().index_select(0, keep).requires_grad_(), target.index_select(0, keep),
                               ref_dh.index_select(0, keep))}

        cases = [
            ("labelled", "lmforge linear_cross_entropy", lambda h, t: lmforge_loss.linear_cross_entropy(h, w, t)),
            # use_scaled_exp=None: quack picks its scaled-exp pipeline where eligible (SM90, bf16, V % 128).
            ("labelled", "quack chunked_linear_cross_entropy",
             lambda h, t: chunked_linear_cross_entropy(h, w, t, ignore_index=IGNORE, reduction="sum")),
            ("labelled", "quack chunked_linear_ce, use_scaled_exp=False",
             lambda h, t: chunked_linear_cross_entropy(h, w, t, ignore_index=IGNORE, reduction="sum",
                                                       use_scaled_exp=False)),
            ("all", "quack chunked_linear_cross_entropy",
             lambda h, t: chunked_linear_cross_entropy(h, w, t, ignore_index=IGNORE, reduction="sum")),
        ]
        for which, name, fn in cases:
            h, t, want_dh = inputs[which]

            def clear(h=h):
                h.grad = w.grad = None

            def body(fn=fn, h=h, t=t, want_dh=want_dh, clear=clear) -> Row:
                ms, gib = timed(lambda: fn(h, t).backward(), clear, warmup, reps)
                clear()
                loss = fn(h, t)
                loss.backward()
                return {"ms": ms, "GiB": gib, "loss diff": rel(loss.item(), ref_loss),
                        "dh diff": max_abs(h.grad, want_dh), "dw diff": max_abs(w.grad, ref_dw)}

            rows.append(attempt({"head": f"{shape} {hidden}->{vocab}", "tokens": tokens, "rows": len(h),
                                 "variant": name}, body))
        del h_all, w, inputs, ref_dh, ref_dw
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("rmsnorm", "ce", "lce"), default=["rmsnorm", "ce", "lce"])
    parser.add_argument("--reps", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (compile, autotune)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of the rmsnorm and lce parts")
    parser.add_argument("--widths", type=int, nargs="+", default=[896, 2048, 3584], help="rmsnorm hidden sizes")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[151936, 128256], help="ce vocabulary sizes")
    parser.add_argument("--ce-tokens", type=int, nargs="+", default=[8192, 16384], help="ce token counts")
    parser.add_argument("--heads", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-7b"],
                        help="lce shapes: bench/configs/NAME.json (hidden_size, vocab_size)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()

    quack = require_gpu_and_quack()
    print(f"device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}; "
          f"torch {torch.__version__}, quack {quack.__version__}", flush=True)
    results: dict[str, list[Row]] = {}
    if "rmsnorm" in args.parts:
        results["rmsnorm"] = rmsnorm_part(quack, args.tokens, args.widths, args.warmup, args.reps)
        print_table("RMSNorm, forward and forward + backward (diffs: max |x - fp32|)", results["rmsnorm"])
    if "ce" in args.parts:
        results["ce"] = ce_part(quack, args.vocabs, args.ce_tokens, args.warmup, args.reps)
        print_table("Cross-entropy on bf16 logits, loss + gradient (loss diff relative, grad diff max |g - fp32|)",
                    results["ce"])
    if "lce" in args.parts:
        results["lce"] = lce_part(quack, args.tokens, args.heads, args.warmup, args.reps)
        print_table("Fused head + cross-entropy, forward + backward (loss diff relative, others max |g - fp32|)",
                    results["lce"])
    if args.json:
        meta = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                "torch": torch.__version__, "quack": quack.__version__, "reps": args.reps, "warmup": args.warmup}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **results}, f, indent=1)


if __name__ == "__main__":
    main()
