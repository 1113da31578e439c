"""lmforge.training.graphs: what makes two batches one graph, the gradient buffers a recorded backward
adds into (kept, zeroed where the Trainer dropped them, refilled where it replaced them), and
the padding of a batch's varying sizes, which must leave its loss and gradients unchanged. The
recording itself needs a CUDA GPU: the GPU tests here and in tests/test_dpo.py train with it."""

from __future__ import annotations

import pytest
import torch

from lmforge.training.graphs import StepGraphs, batch_key


def test_batch_key_separates_shapes_dtypes_and_plain_values():
    a = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "n": 2}
    assert batch_key(a) == batch_key({"n": 2, "input_ids": torch.ones(2, 8, dtype=torch.long)})
    assert batch_key(a) != batch_key({**a, "input_ids": torch.zeros(2, 16, dtype=torch.long)})
    assert batch_key(a) != batch_key({**a, "input_ids": torch.zeros(2, 8, dtype=torch.int32)})
    assert batch_key(a) != batch_key({**a, "n": 1})


def test_gradient_buffers_keep_their_storage_and_the_gradient_so_far():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    params[0].grad = torch.full((3,), 5.0)  # an eager step's gradient: adopted as the buffer
    graphs = StepGraphs(params)
    graphs._attach_grads()
    buffers = [p.grad for p in params]
    assert buffers[0].tolist() == [5.0] * 3 and torch.equal(buffers[1], torch.zeros(2, 2))

    buffers[1].add_(7.0)
    params[0].grad = None  # the Trainer's zero_grad(set_to_none=True)
    params[1].grad = torch.full((2, 2), 3.0)  # a gradient put there by someone else
    graphs._attach_grads()
    assert all(p.grad is b for p, b in zip(params, buffers))  # the storage a graph writes into
    assert torch.equal(buffers[0], torch.zeros(3)) and torch.equal(buffers[1], torch.full((2, 2), 3.0))


def test_weighted_rows_count_for_nothing_in_the_chunked_cross_entropy():
    """Rows of weight 0 (a graphed step's padding) change neither the loss nor any gradient,
    across chunks (3 rows each here)."""
    from lmforge.modeling.loss import _ChunkedLinearCrossEntropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 20, (10,), generator=gen)
    keep = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    loss = _ChunkedLinearCrossEntropy.apply(hidden, weight, target, 3, keep)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    real = keep.bool()
    want = torch.nn.functional.cross_entropy(hidden[real] @ weight.T, target[real], reduction="sum")
    want.backward()
    assert torch.allclose(got[0], want.detach(), rtol=1e-12)
    assert torch.allclose(got[1], hidden.grad, atol=1e-12) and (got[1][~real] == 0).all()
    assert torch.allclose(got[2], weight.grad, atol=1e-12)


def test_bucketed_batch_trains_as_the_batch(tmp_path):
    """`bucketed` pads the labelled positions (and the documents' offsets) to fixed sizes; the
    fused loss of the padded batch and its gradients are the batch's own."""
    import transformers

    from lmforge.data.collate import CU_SEQLENS, LABEL_POSITIONS, label_positions
    from lmforge.modeling.loss import fused_causal_lm_loss
    from lmforge.training.graphs import OFFSET_BUCKET, PADDED_POSITIONS, POSITION_BUCKET, bucketed

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[0, :5] = labels[1, :3] = -100
    batch = {"input_ids": ids, "labels": labels, LABEL_POSITIONS: label_positions(labels),
             CU_SEQLENS: torch.tensor([0, 7, 12, 24], dtype=torch.int32)}
    padded = bucketed(batch)
    assert padded[PADDED_POSITIONS] and padded[LABEL_POSITIONS].shape == (POSITION_BUCKET,)
    assert (padded[LABEL_POSITIONS][batch[LABEL_POSITIONS].numel():] == labels.numel()).all()
    assert padded[CU_SEQLENS].tolist() == [0, 7, 12] + [24] * (OFFSET_BUCKET - 3)
    head = model.get_output_embeddings()

    results = []
    for given in (batch, padded):
        inputs = {k: v for k, v in given.items() if k not in (CU_SEQLENS, PADDED_POSITIONS, LABEL_POSITIONS)}
        loss = fused_causal_lm_loss(model, head, inputs, None, positions=given[LABEL_POSITIONS],
                                    padded=given.get(PADDED_POSITIONS, False))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (want, want_grads), (got, got_grads) = results
    assert torch.allclose(got, want, rtol=1e-6)
    for n, g in want_grads.items():
        assert torch.allclose(got_grads[n], g, rtol=1e-5, atol=1e-7), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphed_sft_trains_as_eager_sft(tmp_path, capsys):
    """`lmforge sft --cuda_graphs True` on packed rows (varlen attention, its offsets padded with
    empty sequences; the labelled positions padded and weighted 0): the losses and gradient norms
    of eager steps, and graphs replayed after the first batch of each shape."""
    import json

    from lmforge.cli import main as cli

    from conftest import DUMMY_CONVERSATIONS, QWEN_TOKENIZER

    config, data = tmp_path / "tiny.json", tmp_path / "d.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "vocab_size": 151936, "max_position_embeddings": 512}))
    data.write_text(json.dumps(json.loads(DUMMY_CONVERSATIONS.read_text())[:200]))
    logs = {}
    for graphs in ("False", "True"):
        out = tmp_path / f"graphs-{graphs}"
        assert cli(["sft", "--config_name", str(config), "--tokenizer_name", str(QWEN_TOKENIZER), "--data_path",
                    str(data), "--output_dir", str(out), "--bf16", "True", "--max_steps", "6",
                    "--model_max_length", "256", "--per_device_train_batch_size", "2", "--report_to", "none",
                    "--disable_tqdm", "True", "--logging_steps", "1", "--save_strategy", "no",
                    "--compile_blocks", "False", "--data_cache_dir", str(tmp_path / "cache"),
                    "--cuda_graphs", graphs]) == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        logs[graphs] = [(h["loss"], h["grad_norm"]) for h in history if "loss" in h]
    said = capsys.readouterr().out
    assert "lmforge: CUDA graphs:" in said and " 0 micro-steps replayed" not in said
    assert len(logs["True"]) == 6
    for got, want in zip(logs["True"], logs["False"]):
        assert got == pytest.approx(want, rel=2e-2, abs=1e-3)
