"""The training loss without the full logits tensor.

A causal LM computes logits for every position, (batch x length x vocab), upcasts them to
fp32 and takes the cross-entropy over the positions that carry labels. With Qwen's 151,936
tokens and 8 x 2048 positions that is 10 GB in fp32, written, read, and again for its gradient;
it made most of the peak memory and a large share of the step time of a 0.5B model. In SFT
only the assistant tokens carry labels, often half of them or fewer.

lmforge computes the loss from the final hidden states instead: only at the labelled
positions, vocabulary projection and cross-entropy fused chunk by chunk (the function below,
or Liger's Triton kernel with --loss_kernel liger), so at most one chunk of logits exists at a
time. The model still runs through its own `forward` (so DDP,
FSDP and DeepSpeed hooks fire as usual): for the duration of one call the output head's
`forward` is redirected to compute the loss from what it is given.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
from torch import nn

from lmforge.data.collate import label_positions
from lmforge.data.render import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.kernels import loss_kernel

CHUNK_LOGITS = 2**28  # fp32 logits per chunk: 1 GiB


def has_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _summed(rows: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return (rows if w is None else rows * w).sum()


def _logit_loss(logits: torch.Tensor, target: torch.Tensor, acc: torch.dtype,
                w: torch.Tensor | None = None) -> torch.Tensor:
    x = logits.to(acc)
    return _summed(torch.logsumexp(x, dim=-1) - x.gather(1, target[:, None]).squeeze(1), w)


def _logit_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, acc: torch.dtype,
                         w: torch.Tensor | None = None):
    """Summed cross-entropy of one chunk of logits (each row weighted by `w`, when given) and its
    unweighted gradient, softmax - one-hot, in the logits' dtype; computed in `acc` (fp32)."""
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    loss = _summed(lse - x.gather(1, target[:, None]).squeeze(1), w)
    g = torch.exp(x - lse[:, None])
    g = g.scatter_add(1, target[:, None], torch.full((target.shape[0], 1), -1.0, dtype=acc, device=g.device))
    return loss, g.to(logits.dtype)


_compiled_loss_and_grad = None


def logit_loss_and_grad(device: torch.device):
    """`_logit_loss_and_grad`, compiled on a GPU: in eager it is six passes over a chunk of
    fp32 logits (cast, logsumexp, gather, exp, scatter, cast back), a measurable share of a
    small model's step on the GPU (docs/bench_results.md); compiled it is one fused reduction
    and one pointwise pass. On CPU the eager function (no compile time in tests)."""
    global _compiled_loss_and_grad
    if device.type != "cuda":
        return _logit_loss_and_grad
    if _compiled_loss_and_grad is None:
        _compiled_loss_and_grad = torch.compile(_logit_loss_and_grad, dynamic=True)
    return _compiled_loss_and_grad


def add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, for an fp32 `acc` and 16-bit `a`, `b` too: on CUDA the matmul adds its fp32
    result into `acc` itself (cuBLAS's beta = 1, `out_dtype`) instead of writing a 16-bit product
    and then reading and writing the whole fp32 [V, H] sum again for every chunk (measured:
    docs/bench_results.md, 2026-12-02 (evening))."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _addmm_takes_out_dtype(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


@functools.cache
def _addmm_takes_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch sums a 16-bit product into an fp32 matrix in place (`out_dtype`, newer
    than the oldest torch lmforge supports), checked once on a small case against the plain sum."""
    a = torch.arange(6, device=device, dtype=dtype).reshape(2, 3)
    acc = torch.ones(2, 2, device=device)
    try:
        torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return torch.equal(acc, 1 + a.float() @ a.float().T)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, target), gradients computed in the
    forward pass chunk by chunk (the backward only scales them), so no more than one chunk of
    logits is ever held. The fallback where liger-kernel is not installed (CPU included).
    `hidden` and `weight` come in one dtype; logits and the weight gradient sum in fp32.
    `rows` (optional, 0 or 1 per row): rows of weight 0 count for nothing, neither in the loss nor
    in a gradient (padding of a fixed-size batch, lmforge.training.graphs)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int,
                rows: torch.Tensor | None = None):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                   device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        total = torch.zeros((), dtype=acc, device=hidden.device)
        step = logit_loss_and_grad(hidden.device)
        wants_grad = grad_hidden is not None or grad_weight is not None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = target[start:start + chunk]
            w = None if rows is None else rows[start:start + chunk].to(acc)
            logits = h @ weight.T
            if loss_kernel.usable(logits):  # the gradient, when wanted, replaces the logits
                lse, picked = loss_kernel.softmax_rows(logits, t, write_grad=wants_grad)
                total += _summed(lse - picked, w)
                g = logits
            elif not wants_grad:
                total += _logit_loss(logits, t, acc, w)
            else:
                loss, g = step(logits, t, acc, w)
                total += loss
            if grad_hidden is not None:
                out = grad_hidden[start:start + chunk]
                torch.mm(g, weight, out=out)
                if w is not None:  # a [chunk, hidden] product, not the [chunk, vocab] gradient
                    out.mul_(w[:, None].to(out.dtype))
            if grad_weight is not None:
                add_matmul(grad_weight, g.T, h if w is None else h * w[:, None].to(h.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            # Scaled and rounded in one pass: the head's gradient is the size of the vocabulary
            # times the width, and two passes over it cost a measurable share of a small model's
            # step (docs/bench_results.md, 2026-12-02 (evening)).
            out = torch.empty(grad_weight.shape, dtype=ctx.weight_dtype, device=grad_weight.device)
            grad_weight = torch.mul(grad_weight, grad_output, out=out)
        return grad_hidden, grad_weight, None, None, None


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the tensor's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def use_liger(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` (auto, liger or chunked) means Liger's kernel on `device`. auto means
    chunked: measured faster than Liger's fused kernel on both bench shapes
    (bench/sft_throughput.py, figures in docs/bench_results.md) — cuBLAS matmuls over chunks of
    ~1,800 rows beat Liger's smaller chunks."""
    if kernel == "liger":
        if not has_liger():
            raise LmforgeError("--loss_kernel liger needs liger-kernel: pip install 'lmforge[liger]'")
        return True
    return False


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int | None = None, kernel: str = "auto",
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `target` ([N, H], [V, H], [N]):
    Liger's fused kernel or the chunked function above (`use_liger`); rows of `rows` 0 (padding)
    count for nothing, in the chunked function."""
    dtype = compute_dtype(hidden)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if use_liger(kernel, hidden.device) and chunk is None and rows is None:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy(hidden, weight, target, reduction="sum")
        chunk = chunk or max(256, CHUNK_LOGITS // weight.shape[0])
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, target, chunk, rows)


def head_weight(head: nn.Module) -> torch.Tensor:
    """The (vocab, hidden) matrix of an output head; a 4-bit head (QLoRA) is dequantised."""
    weight = head.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, state)
    return weight


def fused_head_supported(model) -> str | None:
    """Why the fused loss cannot be used with this model, or None when it can."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        return "the model has no plain output head (it may be wrapped by --modules_to_save)"
    if getattr(head, "bias", None) is not None:
        return "the output head has a bias"
    return None


def labelled_targets(labels: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat indices of the positions whose next-token label is not -100 (computed here when
    the caller has not, on the CPU, beforehand) on the labels' device, and those labels."""
    if positions is None:
        positions = label_positions(labels)
    positions = positions.to(labels.device, non_blocking=True)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return positions, shifted.reshape(-1).index_select(0, positions)


@contextlib.contextmanager
def _head_replaced(head: nn.Module, labels: torch.Tensor, positions: torch.Tensor | None, what: str, compute):
    """Within this block, `head(hidden)` returns `compute(hidden, selected, target)` instead of the
    logits: `selected` are the hidden states at the labelled positions (`positions`, from
    `label_positions`, when the caller has them), `target` their next tokens. Yields a list that
    receives what the head returned."""
    positions, target = labelled_targets(labels, positions)
    returned: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != labels.shape:
            raise RuntimeError(f"{what}: the head got hidden states of shape {tuple(hidden.shape)}, "
                               f"labels are {tuple(labels.shape)}")
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        out = compute(hidden, selected, target)
        returned.append(out)
        return out

    head.forward = forward  # an instance attribute: the module's hooks still run around it
    try:
        yield returned
    finally:
        del head.forward


def head_computes_loss(head: nn.Module, labels: torch.Tensor, kernel: str = "auto",
                       positions: torch.Tensor | None = None, rows: torch.Tensor | None = None):
    """Within this block, `head(hidden)` returns the summed next-token cross-entropy of the
    positions whose shifted label is not -100, instead of the logits (`_head_replaced`); with
    `rows`, only of the positions where it is 1."""

    def loss(hidden: torch.Tensor, selected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.numel() == 0:
            # No labelled token in this micro-batch: zero, with the head's weight still in the
            # graph (DDP expects a gradient for every parameter it manages).
            return (hidden.sum() + head_weight(head).sum()) * 0.0
        return linear_cross_entropy(selected, head_weight(head), target, kernel=kernel, rows=rows)

    return _head_replaced(head, labels, positions, "fused loss", loss)


def without_padding(positions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled positions padded past the batch (`lmforge.training.graphs.bucketed`) as (positions with
    the padding replaced by the first position, a real target; which entries are real). Where a
    padding entry is scored, its score is then weighted 0 or dropped."""
    real = positions < labels.numel()
    return torch.where(real, positions, positions[:1]), real


def fused_causal_lm_loss(model: nn.Module, head: nn.Module, inputs: dict,
                         num_items_in_batch: torch.Tensor | int | None, kernel: str = "auto",
                         positions: torch.Tensor | None = None, padded: bool = False) -> torch.Tensor:
    """The model's next-token loss from `inputs` (which hold labels), summed over the labelled
    positions and divided by `num_items_in_batch` (the labelled tokens of the whole
    accumulation window, as the Trainer counts them) or, when None, by this batch's count.
    `padded`: `positions` end with padding past the batch (`lmforge.training.graphs.bucketed`), scored as
    the first position and weighted 0.

    The model must pass what its head returned through. Wrappers may hand back another tensor
    of the same value (DDP's output sink, FSDP's and DeepSpeed ZeRO-3's backward hooks are
    identity autograd functions), so the model's output is used, and checked to be one scalar
    from one head call (comparing values would cost a device sync every step)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    rows = None
    if padded:
        positions, real = without_padding(positions.to(labels.device), labels)
        rows = real.to(torch.float32)
    with head_computes_loss(head, labels, kernel, positions, rows) as returned:
        outputs = model(**inputs)
    # The model's output, not `returned[0]`: FSDP and DeepSpeed re-wrap module outputs to hook
    # their gradient reduction into the backward pass. Models known to transform their logits
    # after the head (soft-capping) are refused up front by `fused_head_supported`.
    loss = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if len(returned) != 1 or loss.dim() != 0:
        raise RuntimeError("fused loss: the model did not return what its output head computed (called "
                           f"{len(returned)} times, output shape {tuple(loss.shape)}); train with --fused_loss False")
    if num_items_in_batch is None:
        num_items_in_batch = (labels[:, 1:] != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities (DPO) without the full logits tensor
# ---------------------------------------------------------------------------------------------
#
# Preference training needs log p(answer | prompt) for every sequence of a batch: a sum of
# token log-probabilities, whose gradient weight per token is not known until the loss has
# compared the chosen and the rejected sequences. So, unlike the cross-entropy above, the
# gradient cannot be finished in the forward pass: the forward keeps only each row's
# log-sum-exp (one float per labelled token), and the backward recomputes one chunk of logits at
# a time. A chunk is at most 1 GiB of fp32 logits, where materialising the logits of a batch of
# 2 x 8 sequences of 512 tokens over Qwen's 151,936 tokens would take 10 GB (and again for
# their gradient): the reason lmforge computes these log-probs itself rather than from
# `model(...).logits` as preference trainers usually do.


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[row, target[row]] for each row ([N, H], [V, H], [N] -> [N]),
    at most `chunk` rows of logits at a time, in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            x = hidden[start:start + chunk] @ weight.T
            t = target[start:start + chunk]
            if loss_kernel.usable(x):
                chunk_lse, picked = loss_kernel.softmax_rows(x, t, write_grad=False)
                lse[start:start + chunk] = chunk_lse
                out[start:start + chunk] = picked - chunk_lse
                continue
            x = x.to(acc)
            lse[start:start + chunk] = torch.logsumexp(x, dim=-1)
            out[start:start + chunk] = x.gather(1, t[:, None]).squeeze(1) - lse[start:start + chunk]
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        chunk = ctx.chunk
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = target[start:start + chunk]
            go = grad_out[start:start + chunk].to(acc)
            x = h @ weight.T
            # d logp / d logits = one_hot(target) - softmax, scaled by the upstream gradient.
            if loss_kernel.usable(x):
                loss_kernel.softmax_rows(x, t, grad_scale=-go)  # x becomes the gradient
                g = x
            else:
                x = x.to(acc)
                g = -torch.exp(x - lse[start:start + chunk, None]) * go[:, None]
                g = g.scatter_add(1, t[:, None], go[:, None]).to(hidden.dtype)
            if need_h:
                torch.mm(g, weight, out=grad_hidden[start:start + chunk])
            if need_w:
                add_matmul(grad_weight, g.T, h)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                           chunk: int | None = None) -> torch.Tensor:
    """Log-probability of `target` under `hidden @ weight.T` for each row, in fp32 (fp64 for
    fp64 inputs), chunked (`_ChunkedLinearLogProbs`); the matmul runs in autocast's dtype."""
    dtype = compute_dtype(hidden)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    chunk = chunk or max(256, CHUNK_LOGITS // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearLogProbs.apply(hidden, weight, target, chunk)


def head_computes_log_probs(head: nn.Module, labels: torch.Tensor, positions: torch.Tensor | None = None,
                            chunk: int | None = None):
    """Within this block, `head(hidden)` returns the log-probability of each labelled next token
    (the positions whose shifted label is not -100, in row-major order), a 1-D tensor, instead
    of the logits (`_head_replaced`)."""

    def log_probs(hidden: torch.Tensor, selected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logps = linear_token_log_probs(selected, head_weight(head), target, chunk)
        if target.numel() == 0:
            logps = logps + (hidden.sum() + head_weight(head).sum()) * 0.0  # keep every weight in the graph
        return logps

    return _head_replaced(head, labels, positions, "log-probs", log_probs)


def sequence_log_probs(model: nn.Module, head: nn.Module | None, inputs: dict,
                       positions: torch.Tensor | None = None, chunk: int | None = None,
                       starts: torch.Tensor | None = None, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the labelled tokens' log-probabilities per sequence, number of labelled tokens per
    sequence) for a batch holding `labels` (-100 where nothing is scored). A sequence is a row, or
    with `starts` (each sequence's first index in the flattened batch, ascending: packed
    sequences) the stretch from its start to the next. With `head` (the model's output head) the
    logits are never materialised (`head_computes_log_probs`); with None, the model's own logits
    are used (models whose head is not a plain linear layer).

    `padded`: `positions` end with entries past the batch (labels.numel()), which count for
    nothing: a fixed number of positions for a CUDA graph (lmforge.training.graphs). They are scored as the
    first position (a real target), into a sequence that is dropped, so their gradient is zero."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    if positions is None:
        positions = label_positions(labels)
    positions = positions.to(labels.device)
    if starts is None:
        rows = torch.div(positions, labels.shape[1], rounding_mode="floor")
        n = labels.shape[0]
    else:
        starts = starts.to(labels.device)
        rows = torch.searchsorted(starts, positions, right=True) - 1  # on the device: no sync
        n = starts.shape[0]
    if padded:
        positions, real = without_padding(positions, labels)
        rows = torch.where(real, rows, n)  # sequence n: one past the last, dropped below
    token_logps = token_log_probs(model, head, inputs, labels, positions, chunk)
    slots = n + 1 if padded else n
    sums = torch.zeros(slots, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(slots, dtype=torch.long, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps)
    counts = counts.index_add(0, rows, torch.ones_like(rows))
    return sums[:n], counts[:n]


def token_log_probs(model: nn.Module, head: nn.Module | None, inputs: dict, labels: torch.Tensor,
                    positions: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The log-probability of each labelled token [P], in the order of `positions` (flat indices
    into batch x length of the positions whose next token is labelled): through the output head
    a chunk at a time when `head` is given (the logits never built), else from the model's logits.
    `inputs` are the model's inputs without the labels."""
    if head is None:
        logits = model(**inputs).logits
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1).reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float()
        token_logps = flat.log_softmax(-1).gather(1, shifted.index_select(0, positions)[:, None]).squeeze(1)
    else:
        with head_computes_log_probs(head, labels, positions, chunk) as returned:
            outputs = model(**inputs)
        # The model's output, not `returned[0]`: wrappers (FSDP, DeepSpeed) re-wrap it for their hooks.
        token_logps = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if len(returned) != 1 or token_logps.shape != positions.shape:
            raise RuntimeError("log-probs: the model did not return what its output head computed (called "
                               f"{len(returned)} times, output shape {tuple(token_logps.shape)}); train with "
                               "--fused_loss False")
    return token_logps
