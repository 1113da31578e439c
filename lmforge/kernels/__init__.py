"""lmforge's own Triton kernels, each written where the field's libraries leave time on the chip
(docs/bench_results.md has the measurements that kept them), and the bridge to one it takes from
a wheel:

    loss_kernel.py     the fused head's cross-entropy over a chunk of positions (log-sum-exp,
                       the target's logit and the gradient in one pass)
    optim_kernel.py    AdamW over fp32 master weights, one launch a parameter group
    triton_launch.py   what the two share: whether they can run here, the device a launch goes to
    flash4.py          flash-attn-4's varlen attention (Hopper / Blackwell) as a PyTorch custom
                       op, so that compiled blocks keep one graph

Each has a torch path beside it that runs wherever the kernel cannot; the CPU tests run the
kernels' own code under Triton's interpreter.
"""
