"""The fused loss: labelled positions only, projection and cross-entropy in chunks. It must
compute what the model's own loss computes (value and gradients), through the Trainer too."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import KERNEL_DEVICES
from lmforge.modeling.loss import fused_causal_lm_loss, fused_head_supported, linear_cross_entropy
from tests.data.test_pack import one_step, packed_batch, records, tiny_model


def test_chunked_linear_cross_entropy_equals_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (300,))
    ours = linear_cross_entropy(hidden, weight, target, chunk=64)  # 5 chunks, the last partial
    ours.backward(torch.tensor(0.5, dtype=torch.float64))
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ w.T, target, reduction="sum")
    ref.backward(torch.tensor(0.5, dtype=torch.float64))
    assert torch.allclose(ours, ref, rtol=1e-12)
    assert torch.allclose(hidden.grad, h.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(weight.grad, w.grad, rtol=1e-10, atol=1e-12)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_equals_the_models_own_on_a_packed_batch(tied):
    model = tiny_model("sdpa")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    batch = packed_batch(records(12), capacity=64, attn="sdpa")
    ref = model(**batch).loss
    ref.backward()
    expected = grads(model)
    model.zero_grad()
    ours = fused_causal_lm_loss(model, model.get_output_embeddings(), batch, None)
    ours.backward()
    assert "labels" in batch  # the caller's inputs are not consumed
    assert abs(ours.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for name, grad in grads(model).items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), name
    # Normalised by the count the caller gives (the labelled tokens of a whole accumulation window).
    total = (batch["labels"][:, 1:] != -100).sum()
    halved = fused_causal_lm_loss(model, model.get_output_embeddings(), batch, 2 * total)
    assert torch.allclose(halved, ours / 2)
    # The head is itself again afterwards.
    assert "forward" not in vars(model.get_output_embeddings())
    assert model(**batch).logits.shape[-1] == model.config.vocab_size


def test_a_batch_without_labels_gives_zero_loss_in_the_graph():
    model = tiny_model("sdpa")
    batch = packed_batch(records(2), capacity=64, attn="sdpa")
    batch["labels"][:] = -100
    loss = fused_causal_lm_loss(model, model.get_output_embeddings(), batch, 5)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_trainer_steps_equal_with_and_without_fused_loss(tmp_path):
    fused = one_step(tmp_path / "a", 2, 4, fused_loss=True)
    plain = one_step(tmp_path / "b", 2, 4, fused_loss=False)
    for name in fused:
        assert torch.allclose(fused[name], plain[name], rtol=1e-5, atol=1e-7), name


def test_soft_capped_logits_keep_the_models_own_loss():
    config = transformers.AutoConfig.for_model(
        "gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=97, final_logit_softcapping=30.0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert fused_head_supported(model) == "the model soft-caps its logits"
    assert fused_head_supported(tiny_model("sdpa")) is None


def test_compiled_blocks_compute_the_same_loss_and_gradients():
    from lmforge.modeling.load import compile_blocks

    model = tiny_model("sdpa")
    batch = packed_batch(records(12), capacity=64, attn="sdpa")
    ref = model(**batch).loss
    ref.backward()
    expected = grads(model)
    model.zero_grad()
    assert compile_blocks(model) == 2
    ours = fused_causal_lm_loss(model, model.get_output_embeddings(), batch, None)
    ours.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for name, grad in grads(model).items():
        assert torch.allclose(grad, expected[name], rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("kernel_device", KERNEL_DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_softmax_rows_kernel_equals_torch(dtype, kernel_device):
    """lmforge.kernels.loss_kernel against torch in fp64: log-sum-exp, the target's logit, and the gradient
    it writes over the logits, with and without a per-row scale; a vocabulary that is not a
    multiple of the kernel's block. On a GPU, and on a CPU under Triton's interpreter."""
    from lmforge.kernels import loss_kernel

    torch.manual_seed(0)
    vocab = 3 * loss_kernel.BLOCK + 1000
    rows = 37 if kernel_device == "cuda" else 6
    logits = (torch.randn(rows, vocab, device=kernel_device) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=kernel_device)
    target[:4] = torch.tensor([vocab - 1, 0, 3 * loss_kernel.BLOCK, loss_kernel.BLOCK - 1])  # block edges, the tail
    scale = torch.randn(rows, device=kernel_device)
    x = logits.double()
    ref_lse = torch.logsumexp(x, -1)
    ref_grad = torch.softmax(x, -1) - torch.nn.functional.one_hot(target, vocab).double()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for grad_scale in (None, scale):
        out = logits.clone()
        lse, picked = loss_kernel.softmax_rows(out, target, grad_scale=grad_scale)
        assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
        assert torch.equal(picked.double(), x.gather(1, target[:, None]).squeeze(1))
        want = ref_grad * (1 if grad_scale is None else scale.double()[:, None])
        assert torch.allclose(out.double(), want.to(dtype).double(), **tol)
    kept = logits.clone()
    loss_kernel.softmax_rows(kept, target, write_grad=False)
    assert torch.equal(kept, logits)


@pytest.mark.gpu
def test_chunked_loss_and_log_probs_on_the_gpu_equal_the_fp64_reference():
    """The chunked loss and DPO's log-probs as they run on a GPU (the kernel, the fp32-accumulated
    weight gradient) against fp64 torch on the same bf16 inputs."""
    from lmforge.modeling.loss import linear_token_log_probs

    torch.manual_seed(0)
    hidden = torch.randn(700, 64, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(20000, 64, device="cuda") * 0.1).to(torch.bfloat16)
    target = torch.randint(0, 20000, (700,), device="cuda")
    for which in ("loss", "log_probs"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        if which == "loss":
            ours = linear_cross_entropy(h, w, target, chunk=256)
            ref = torch.nn.functional.cross_entropy(h64 @ w64.T, target, reduction="sum")
            ours.backward(), ref.backward()
        else:
            up = torch.randn(700, device="cuda")
            ours = linear_token_log_probs(h, w, target, chunk=256)
            ref = torch.log_softmax(h64 @ w64.T, -1).gather(1, target[:, None]).squeeze(1)
            ours.backward(up), ref.backward(up.double())
        assert torch.allclose(ours.double(), ref, rtol=1e-3, atol=1e-3)
        for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
            cos = torch.nn.functional.cosine_similarity(got.double().flatten(), want.flatten(), dim=0)
            assert cos > 0.9999, (which, cos)
            assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
