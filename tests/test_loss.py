"""The fused loss: labelled positions only, projection and cross-entropy in chunks. It must
compute what the model's own loss computes (value and gradients), through the Trainer too."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.loss import fused_causal_lm_loss, fused_head_supported, linear_cross_entropy
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
    from lmforge.model import compile_blocks

    model = tiny_model("sdpa")
    batch = packed_batch(records(12), capacity=64, attn="sdpa")
    ref = model(**batch).loss
    ref.backward()
    expected = grads(model)
    model.zero_grad()
    assert compile_blocks(model, log=lambda *_: None) == 2
    ours = fused_causal_lm_loss(model, model.get_output_embeddings(), batch, None)
    ours.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for name, grad in grads(model).items():
        assert torch.allclose(grad, expected[name], rtol=1e-3, atol=1e-6), name
