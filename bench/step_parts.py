"""Parts of a training step, timed alone on the GPU: the chunked loss with and without lmforge's
softmax-rows kernel, that kernel's block sizes, variable-length attention (PyTorch's flash
kernel against cuDNN's) on the 0.5B shape's packed batch, the master-weight AdamW step (torch's
passes against lmforge's one kernel) over the 0.5B shape's parameters, and LoRA's input dropout
in a compiled block (with and without it: what Inductor's random numbers cost), and the
chunked loss against cut-cross-entropy.

    python bench/step_parts.py [loss] [attention] [optimizer] [dropout] [cce]

Each part: median of 10 timed repetitions after 3 untimed ones (CUDA events), and the largest
difference to the reference it replaces.
"""

from __future__ import annotations

import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cuda_timing  # noqa: E402 - bench/cuda_timing.py, beside this script
from lmforge.kernels import loss_kernel  # noqa: E402
from lmforge.modeling import loss  # noqa: E402


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of `fn()` (bench/cuda_timing.py's clock, 3 warm-up runs)."""
    return cuda_timing.timed(fn, lambda: None, 3, reps)[0]


def old_path():
    """The loss as it was: compiled torch ops for the softmax rows, a 16-bit weight-gradient
    product added to the fp32 sum."""
    usable, add = loss_kernel.usable, loss.add_matmul

    def add_then(acc, a, b):
        acc += a @ b

    loss_kernel.usable, loss.add_matmul = (lambda x: False), add_then
    return lambda: (setattr(loss_kernel, "usable", usable), setattr(loss, "add_matmul", add))


def loss_parts(rows: int, hidden: int, vocab: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device="cuda")

    def step(fn):
        def run():
            h.grad = w.grad = None
            fn(h, w, t).backward()
        return run

    ce = step(lambda h, w, t: loss.linear_cross_entropy(h, w, t))
    lp = step(lambda h, w, t: loss.linear_token_log_probs(h, w, t).sum())
    results = {}
    for name, fn in (("loss", ce), ("log-probs", lp)):
        new_ms = timed(fn)
        new = (h.grad.clone(), w.grad.clone())
        restore = old_path()
        old_ms = timed(fn)
        old = (h.grad.clone(), w.grad.clone())
        restore()
        diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(new, old))
        results[name] = (old_ms, new_ms)
        print(f"{name} fwd+bwd {rows} x {hidden} -> {vocab}: torch ops {old_ms:.2f} ms, kernel {new_ms:.2f} ms "
              f"({old_ms / new_ms:.2f}x); largest gradient difference / largest gradient {diff:.2e}", flush=True)
    chunk = loss.CHUNK_LOGITS // vocab
    logits = (torch.randn(chunk, vocab, device="cuda") * 3).to(torch.bfloat16)
    target = t[:chunk]
    gbytes = logits.numel() * 2 * 3 / 1e9  # read twice, written once
    block_then, warps_then = loss_kernel.BLOCK, loss_kernel.NUM_WARPS
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            loss_kernel.BLOCK, loss_kernel.NUM_WARPS = block, warps
            try:
                ms = timed(lambda: loss_kernel.softmax_rows(logits, target))
            except Exception as e:  # noqa: BLE001 - a configuration the compiler refuses
                print(f"  block {block} warps {warps}: {type(e).__name__}")
                continue
            print(f"  softmax rows, one chunk {chunk} x {vocab}: block {block:>5} warps {warps:>2}: "
                  f"{ms:.3f} ms ({gbytes / ms:.2f} TB/s)", flush=True)
    loss_kernel.BLOCK, loss_kernel.NUM_WARPS = block_then, warps_then


def cce_parts(rows: int = 8192, hidden: int = 896, vocab: int = 151936) -> None:
    """lmforge's chunked loss (its softmax-rows kernel) against Apple's cut-cross-entropy (CCE:
    the logits never leave on-chip memory; `pip install cut-cross-entropy`, a 22 kB wheel) on
    the 0.5B shape's head, summed loss, forward + backward; both against an fp64 reference."""
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        print("  cut-cross-entropy is not installed (its wheel goes in .whl/)", flush=True)
        return
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device="cuda")
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, t, reduction="sum")
    ref.backward()
    want = (ref.item(), h64.grad, w64.grad)
    del h64, w64
    torch.cuda.reset_peak_memory_stats()
    variants = {"lmforge chunked + kernel": lambda: loss.linear_cross_entropy(h, w, t)}
    for name, impl, eps in (("CCE (default: filtered gradient)", "cce", "high"), ("CCE, exact gradient", "cce", None)):
        variants[name] = lambda impl=impl, eps=eps: cce(h, w, t, reduction="sum", impl=impl, filter_eps=eps)
    for name, fn in variants.items():
        def run():
            h.grad = w.grad = None
            fn().backward()

        try:
            ms = timed(run)
            h.grad = w.grad = None
            value = fn()
            value.backward()
        except Exception as e:  # noqa: BLE001 - report what this build does not take
            print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        errs = [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip((h.grad, w.grad), want[1:])]
        print(f"  {name}: {ms:.2f} ms fwd+bwd ({rows} x {hidden} -> {vocab}); loss off fp64 by "
              f"{abs(value.item() - want[0]) / abs(want[0]):.1e}; gradients (largest error / largest value) "
              f"h {errs[0]:.1e}, w {errs[1]:.1e}; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats()


def doc_lengths(total: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out, left = [], total
    while left > 0:
        n = min(left, max(16, min(2000, int(rng.lognormvariate(math.log(450), 0.8)))))
        out.append(n)
        left -= n
    return out


def attention_parts(tokens: int = 16384, heads: int = 14, kv_heads: int = 2, dim: int = 64) -> None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        print(f"attention: this torch ({torch.__version__}) has no varlen_attn")
        return
    torch.manual_seed(0)
    lengths = doc_lengths(tokens)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    longest = max(lengths)
    print(f"attention: {tokens} tokens in {len(lengths)} documents (longest {longest}), {heads} / {kv_heads} heads "
          f"of {dim}", flush=True)

    def expand(x):
        return x.repeat_interleave(heads // kv_heads, dim=1)

    def flash(bound):
        def run():
            q.grad = k.grad = v.grad = None
            out = varlen_attn(q, expand(k), expand(v), cu, cu, bound, bound, window_size=(-1, 0))
            out.backward(up)
            return out
        return run

    def cudnn(bound, gqa_native):
        def run():
            q.grad = k.grad = v.grad = None
            kk, vv = (k, v) if gqa_native else (expand(k), expand(v))
            out = torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu, cu, bound, bound, True, 0.0, True,
                                                          False, scale=dim ** -0.5)[0]
            out.backward(up)
            return out
        return run

    ref = flash(tokens)()
    ref_grads = [x.grad.clone() for x in (q, k, v)]
    for name, fn in (("flash, max length = all tokens", flash(tokens)), ("flash, max length = longest", flash(longest)),
                     ("cudnn, heads expanded", cudnn(longest, False)), ("cudnn, gqa", cudnn(longest, True))):
        try:
            out = fn()
            grads = [x.grad for x in (q, k, v)]
            diff = max([(out.float() - ref.float()).abs().max().item()] +
                       [(a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref_grads)])
            ms = timed(fn)
            print(f"  {name}: fwd+bwd {ms:.3f} ms per layer; largest difference to flash {diff:.3e}", flush=True)
        except Exception as e:  # noqa: BLE001 - report what this PyTorch does not take
            print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def qwen_05b_shapes() -> list[tuple[int, ...]]:
    """The trained tensors of Qwen2.5-0.5B (494M parameters, the embedding tied to the head)."""
    hidden, inner, kv, vocab = 896, 4864, 128, 151936
    layer = [(hidden, hidden), (hidden,), (kv, hidden), (kv,), (kv, hidden), (kv,), (hidden, hidden),
             (inner, hidden), (inner, hidden), (hidden, inner), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * 24 + [(hidden,)]


def optimizer_parts() -> None:
    """One step of AdamW over fp32 masters of bf16 weights, clipping included: torch's passes
    (gradients copied to fp32, their norm, the scaling, fused AdamW, the copy back) against
    lmforge's kernel (the norm of the bf16 gradients, then one kernel a group)."""
    from lmforge.kernels import optim_kernel
    from lmforge.modeling.optim import MasterWeightAdamW

    shapes = qwen_05b_shapes()
    runs = {}
    for kernel, block, warps in ((False, 0, 0), (True, 1024, 4), (True, 2048, 8), (True, 4096, 8)):
        optim_kernel.BLOCK, optim_kernel.NUM_WARPS = block or optim_kernel.BLOCK, warps or optim_kernel.NUM_WARPS
        optim_kernel._blocks.cache_clear()
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(torch.bfloat16)) for s in shapes]
        grads = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
        decay = [p for p in params if p.dim() > 1]
        rest = [p for p in params if p.dim() == 1]
        opt = MasterWeightAdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=1e-5, fused=True)
        opt._kernel = opt._kernel and kernel

        def step():
            for p, g in zip(params, grads):
                p.grad = g
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()

        ms = timed(step)
        runs[kernel] = (ms, opt.master_params())
        n = sum(p.numel() for p in params)
        how = f"one kernel, blocks of {block} x {warps} warps" if opt._kernel else "torch passes"
        print(f"  master AdamW, {n / 1e6:.0f}M parameters, {how}: {ms:.3f} ms a step", flush=True)
    diff = max((a - b).abs().max().item() for a, b in zip(runs[True][1], runs[False][1]))
    print(f"  largest difference between the masters after 13 steps: {diff:.3e}", flush=True)


def dropout_parts(tokens: int = 16384, hidden: int = 2048, rank: int = 16) -> None:
    """A block's input to q, k and v under LoRA: RMSNorm, then three adapters, each with its own
    dropout of the normed input (PEFT's layout), compiled; forward and backward."""
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    adapters = [torch.randn(rank, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]

    def block(x, p):
        y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight
        return sum((torch.nn.functional.dropout(y, p, training=True) @ a.t()).float().sum() for a in adapters)

    for p in (0.0, 0.05):
        torch._dynamo.reset()
        fn = torch.compile(block)

        def run():
            fn(x, p).backward()

        ms = timed(run)
        print(f"  RMSNorm + 3 LoRA inputs ({tokens} x {hidden}), dropout {p}: {ms:.3f} ms fwd+bwd", flush=True)


def main() -> None:
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    parts = sys.argv[1:] or ["loss", "attention", "optimizer", "dropout", "cce"]
    if "loss" in parts:
        loss_parts(8192, 896, 151936)
    if "attention" in parts:
        attention_parts()
    if "optimizer" in parts:
        optimizer_parts()
    if "dropout" in parts:
        dropout_parts()
    if "cce" in parts:
        cce_parts()


if __name__ == "__main__":
    main()
