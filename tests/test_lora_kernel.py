"""LoRA's input dropout inside lora_A (lmforge.lora_kernel): the kernels against torch with the
same mask, the mask's rate and its redraw from the seed, and the folded layers against PEFT's
own modules (the same draws, losses and gradients where the kernel does not run)."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge import lora_kernel
from lmforge.config import LoraArguments
from lmforge.model import apply_lora

from conftest import KERNEL_DEVICES

TINY_LLAMA = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)


def _mask(x: torch.Tensor, r: int, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The kept elements of x for `seed`, read back through the backward: with a gradient and a
    weight of ones, x's gradient is r / (1 - p) where an element was kept and 0 where dropped."""
    ones_grad = torch.ones(*x.shape[:-1], r, dtype=x.dtype, device=x.device)
    grad_x, _ = lora_kernel.dropout_lora_a_backward(ones_grad, x, torch.ones(r, x.shape[-1], dtype=x.dtype,
                                                                            device=x.device), seed, p)
    kept = grad_x != 0
    assert torch.allclose(grad_x[kept].float(), torch.tensor(r / (1 - p), device=x.device), rtol=1e-3)
    return kept


@pytest.mark.parametrize("kernel_device", KERNEL_DEVICES, indirect=True)
@pytest.mark.parametrize("rows,cols,rank", [(70, 200, 8), (3, 64, 16), (130, 96, 32)])
def test_kernels_compute_dropout_then_lora_a(kernel_device, rows, cols, rank):
    """Forward and both gradients equal torch's dropout(x) @ A.T with the kernel's own mask, in
    fp32 (tolerance: 16-bit inputs, fp32 sums). Shapes that are not multiples of the blocks,
    ranks below, at and above the 16 tl.dot needs. On a GPU in bf16; under Triton's interpreter
    in fp16 (its dot product does not take bf16)."""
    device = kernel_device
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    p = 0.3
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(rank, cols, device=device) * 0.1).to(dtype).requires_grad_()
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    out = lora_kernel.dropout_lora_a(x.view(1, rows, cols), weight, seed, p)
    assert out.shape == (1, rows, rank) and out.dtype == dtype
    grad = torch.randn(1, rows, rank, device=device).to(dtype)
    out.backward(grad)

    keep = _mask(x.detach(), rank, seed, p).float()
    dropped = x.detach().float() * keep / (1 - p)
    want_out = dropped @ weight.detach().float().T
    want_x = (grad[0].float() @ weight.detach().float()) * keep / (1 - p)
    want_w = grad[0].float().T @ dropped
    for got, want in ((out[0], want_out), (x.grad, want_x), (weight.grad, want_w)):
        assert got.dtype == dtype
        assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-3


@pytest.mark.parametrize("kernel_device", KERNEL_DEVICES, indirect=True)
def test_mask_keeps_one_minus_p_and_follows_the_seed(kernel_device):
    """Each element is kept with probability 1 - p (20,000 draws: within 5 standard deviations);
    the same seed draws the same mask (the backward relies on it), another seed another one."""
    device = kernel_device
    x = torch.ones(100, 200, dtype=torch.float16, device=device)
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    for p in (0.05, 0.5):
        keep = _mask(x, 16, seed, p)
        assert abs(keep.float().mean().item() - (1 - p)) <= 5 * ((p * (1 - p)) / x.numel()) ** 0.5
        assert torch.equal(keep, _mask(x, 16, seed, p))
        other = _mask(x, 16, seed + 1, p)
        assert not torch.equal(keep, other)


def _peft_model(p: float, fold: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_LLAMA))
    torch.manual_seed(1)
    model = apply_lora(model, LoraArguments(lora=True, lora_r=4, lora_dropout=p, lora_dropout_kernel=fold))
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to differ by
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model.train()


def test_folded_layers_are_peft_layers_where_the_kernel_does_not_run():
    """On a CPU a folded model draws the same masks as PEFT's dropout modules, in the same order:
    the same loss and gradients, bit for bit. Every adapted linear layer is folded (seven a
    block), the parameter names are PEFT's, and dropout 0 or --lora_dropout_kernel False leave
    PEFT's modules as they are."""
    from peft.tuners.lora import LoraLayer

    ours, theirs = _peft_model(0.2, True), _peft_model(0.2, False)
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(isinstance(m.lora_A["default"], lora_kernel.DropoutLoraA) and m.lora_A["default"].p == 0.2
               and isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)
    assert all(type(m.lora_dropout["default"]) is torch.nn.Dropout for m in theirs.modules() if isinstance(m, LoraLayer))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())

    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12))
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads and all(torch.equal(p.grad, grads[n]) for n, p in ours.named_parameters() if p.requires_grad)

    ours.eval()  # no dropout in evaluation: the adapter's plain matmul
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)
    assert lora_kernel.fold_lora_dropout(_peft_model(0.0, True)) == 0


@pytest.mark.gpu
def test_folded_layers_compile_on_a_gpu():
    """On a GPU, compiled blocks run the folded layers as the eager model does: with Inductor
    drawing its random numbers as eager mode does (fallback_random), the same seeds, so the same
    loss and gradients within bf16 rounding. The draws change with the seed, and evaluation has
    no dropout."""
    import copy

    from lmforge.model import compile_blocks

    eager = _peft_model(0.1, True).to("cuda", torch.bfloat16)
    compiled = copy.deepcopy(eager)
    layer = next(m for m in eager.modules() if isinstance(m, lora_kernel.DropoutLoraA))
    x = torch.randn(4, 64, TINY_LLAMA["hidden_size"], device="cuda", dtype=torch.bfloat16)
    assert lora_kernel.kernel_takes(x, layer.weight)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (4, 64), device="cuda")

    def loss_and_grads(model, seed):
        torch.manual_seed(seed)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.float(), [p.grad.float() for p in model.parameters() if p.requires_grad]

    with torch._inductor.config.patch(fallback_random=True):
        compile_blocks(compiled, log=lambda *_: None)
        got, got_grads = loss_and_grads(compiled, 5)
    want, want_grads = loss_and_grads(eager, 5)
    assert torch.allclose(got, want, rtol=1e-2)
    for g, w in zip(got_grads, want_grads):
        assert (g - w).abs().max() <= 2e-2 * w.abs().max() + 1e-4
    assert not torch.equal(loss_and_grads(eager, 6)[0], want)
    with torch.no_grad():
        plain = eager.eval()(input_ids=ids, labels=ids).loss.float()
    assert not torch.equal(plain, want)
