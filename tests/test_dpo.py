"""`lmforge dpo`: preference formats, exact masks with identical prompt tokens, per-sequence
log-probabilities against a direct HF computation, the losses, a DPO run that separates the
pairs, LoRA (base untouched, reference = adapter disabled), precomputed reference
log-probabilities, bad pairs, resume and the final save.

    python -m pytest -q tests/test_dpo.py

Tiny models over a 300-token vocabulary (trained here) keep it fast; the mask tests use the
Qwen2.5 tokenizer and its own chat template.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers

from lmforge.cli import main as cli
from lmforge.data.collate import LABEL_POSITIONS, SEQUENCE_STARTS, PackedPairCollator, PairCollator
from lmforge.data.encode import PAIRS, PairKind, check_pair, prepare
from lmforge.data.options import ChatOptions as PrepareOptions
from lmforge.data.options import PreferenceFormat
from lmforge.data.records import Pair, iter_pairs
from lmforge.data.render import IGNORE_INDEX, Rendered
from lmforge.data.schema import Message
from lmforge.errors import RecordError
from lmforge.flags import DpoLoss
from lmforge.training.dpo_trainer import batch_log_probs, preference_loss
from lmforge.training.step import Trainer

from conftest import ROOT

FLAGS = ["--report_to", "none", "--disable_tqdm", "True", "--dataloader_pin_memory", "False",
         "--model_max_length", "128"]


def addition_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        pairs.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
                      "rejected": "I do not know."})
    return pairs


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> str:
    """A tiny Llama-style model with weights, beside a 300-token BPE tokenizer (ChatML)."""
    from lmforge.tokenizer import train_bpe_tokenizer

    path = str(tmp_path_factory.mktemp("dpo") / "base")
    texts = [f"What is {a} plus {b}? The answer is {a + b}. I do not know." for a in range(10) for b in range(10)]
    tok = train_bpe_tokenizer(texts, 300)
    config = transformers.AutoConfig.for_model(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dpo_argv(base: str, data: str, out: str, *extra: str) -> list[str]:
    return ["dpo", "--model_name_or_path", base, "--data_path", data, "--output_dir", out, *FLAGS, *extra]


def cached_batch(base: str, data: str) -> dict:
    """All pairs of `data` as one PairCollator batch (chosen rows, then rejected rows)."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    cached = prepare(PAIRS, [data], tok, PairKind.fixed(PrepareOptions(model_max_length=128)), tok.chat_template)
    ds = cached.dataset()
    return PairCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


def direct_log_probs(model, batch: dict) -> torch.Tensor:
    """HF's full logits → log_softmax → the label tokens → summed over the labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].float().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    token = logps.gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (token * mask).sum(1)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_every_format_gives_the_same_pair(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Capital of France?"}
    records = {
        "prompt": {"system": "Be brief.", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        "question": {"system": "Be brief.", "question": "Capital of France?", "chosen": "Paris.",
                     "rejected": "Rome."},
        "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "Capital of France?"}],
                     "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Rome."}},
        "openai": {"chosen": [system, user, {"role": "assistant", "content": "Paris."}],
                   "rejected": [system, user, {"role": "assistant", "content": "Rome."}]},
        "openai_prompt": {"prompt": [system, user], "chosen": [{"role": "assistant", "content": "Paris."}],
                          "rejected": [{"role": "assistant", "content": "Rome."}]},
    }
    expected = Pair((Message("system", "Be brief."), Message("user", "Capital of France?")),
                    Message("assistant", "Paris."), Message("assistant", "Rome."))
    formats = {"prompt": "prompt", "question": "prompt", "sharegpt": "sharegpt", "openai": "openai",
               "openai_prompt": "openai"}
    for name, record in records.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [record])
        assert list(iter_pairs(path)) == [("line 1", expected)], name
        assert list(iter_pairs(path, PreferenceFormat(formats[name]))) == [("line 1", expected)], name


def test_masks_score_only_the_answers_and_prompt_tokens_are_identical(tmp_path, qwen_tokenizer):
    """Qwen2.5's own template: the prompt (system, user, assistant header) is -100 and the same
    tokens on both sides; each side's labels are exactly its answer's tokens and <|im_end|>."""
    multi_turn = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "Paris."}],
                  "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Capital of France?"},
                               {"role": "assistant", "content": "I think it is Rome."}]}
    data = write_jsonl(tmp_path / "pairs.jsonl", [multi_turn])
    entry = prepare(PAIRS, [data], qwen_tokenizer, PairKind.fixed(PrepareOptions()), qwen_tokenizer.chat_template)
    row = entry.dataset()[0]
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for side, answer in (("chosen", "Paris."), ("rejected", "I think it is Rome.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        messages = multi_turn[side]
        prompt = qwen_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
        answer_ids = qwen_tokenizer.encode(answer, add_special_tokens=False)
        assert ids[:len(prompt)] == prompt
        # The earlier assistant turn ("Hello!") is context: only the last answer is scored.
        assert labels == [IGNORE_INDEX] * len(prompt) + answer_ids + [im_end] + [IGNORE_INDEX]  # "\n" after
    assert row["chosen_input_ids"][:len(prompt)] == row["rejected_input_ids"][:len(prompt)]


def test_check_pair_refuses_differing_prompt_tokens_and_identical_answers():
    chosen = Rendered([1, 2, 3, 4, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 9])
    assert check_pair(chosen, Rendered([1, 2, 3, 5, 9], [IGNORE_INDEX] * 3 + [5, 9]))
    with pytest.raises(RecordError, match="the prompt renders to different tokens") as e:
        check_pair(chosen, Rendered([1, 7, 3, 5, 9], [IGNORE_INDEX] * 3 + [5, 9]))
    assert e.value.kind == "prompt_tokens_differ"
    with pytest.raises(RecordError, match="render to the same scored tokens"):
        check_pair(chosen, Rendered([1, 2, 3, 4, 9], [IGNORE_INDEX] * 3 + [4, 9]))


BAD_PAIRS = {
    "missing_side": ({"prompt": "Q?", "chosen": "A."}, "field 'rejected' is missing (keys: ['chosen', 'prompt'])"),
    "identical_answers": ({"prompt": "Q?", "chosen": "A.", "rejected": "A."},
                          "'chosen' and 'rejected' are the same answer: the pair prefers nothing"),
    "prompt_mismatch": ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                         "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B."}]},
                        "'chosen' and 'rejected' differ before their last turn (first at message 0): a pair must "
                        "share its prompt"),
    "empty_answer": ({"prompt": "Q?", "chosen": "  ", "rejected": "B."}, "the 'chosen' answer is empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PAIRS))
def test_bad_pair_names_file_record_and_problem(kind, tmp_path, small_base, capsys):
    record, message = BAD_PAIRS[kind]
    good = addition_pairs(1)[0] if kind != "prompt_mismatch" else {
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, record])
    assert cli(dpo_argv(small_base, data, str(tmp_path / "out"), "--max_steps", "1")) == 2
    assert capsys.readouterr().err.strip() == f"lmforge dpo: error: {data}, line 2: {message}"


def test_bad_pairs_are_counted_when_skipping(tmp_path, small_base):
    good = addition_pairs(2)
    data = write_jsonl(tmp_path / "pairs.jsonl", [good[0], *[r for r, _ in BAD_PAIRS.values()
                                                             if "prompt" in r and isinstance(r["prompt"], str)],
                                                  good[1]])
    tok = transformers.AutoTokenizer.from_pretrained(small_base)
    stats = prepare(PAIRS, [data], tok, PairKind.fixed(PrepareOptions(on_bad_record="skip")), tok.chat_template).stats
    assert (stats.records, stats.kept) == (5, 2)
    assert stats.skipped == {"missing_side": 1, "identical_answers": 1, "empty_answer": 1}
    assert stats.skip_examples["missing_side"] == f"{data}, line 2: {BAD_PAIRS['missing_side'][1]}"


# ---------------------------------------------------------------------------------------------
# Log-probabilities and losses
# ---------------------------------------------------------------------------------------------


def test_sequence_log_probs_equal_a_direct_hf_computation(tmp_path, small_base):
    """The chunked head path (3 rows of logits at a time) gives HF's log-probs and gradients."""
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(4, seed=1))
    batch = cached_batch(small_base, data)
    model = transformers.AutoModelForCausalLM.from_pretrained(small_base, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    weights = torch.linspace(-1, 1, batch["input_ids"].shape[0])

    direct = direct_log_probs(model, batch)
    (direct * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    from lmforge.modeling.loss import sequence_log_probs

    ours, counts = sequence_log_probs(model, head, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                                      chunk=3)
    assert torch.allclose(ours, direct, rtol=0, atol=1e-5), (ours, direct)
    assert counts.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
    assert counts.min() > 0 and (ours < 0).all()
    (ours * weights).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected_grads[n], rtol=1e-4, atol=1e-6), n
    # Without the fused head (the model's own logits) the same values.
    with torch.no_grad():
        assert torch.allclose(batch_log_probs(model, None, batch)[0], direct, atol=1e-5)


def test_packed_pairs_score_as_padded_pairs(tmp_path, small_base):
    """--packing True: a batch's sides one after another in one row, each in its own attention
    (here sdpa with the per-document mask the trainer builds): the padded rows' log-probs, answer
    token counts and gradients, with no padding but the row's end."""
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(5, seed=3))
    tok = transformers.AutoTokenizer.from_pretrained(small_base)
    ds = prepare(PAIRS, [data], tok, PairKind.fixed(PrepareOptions(model_max_length=128)), tok.chat_template).dataset()
    pairs = [ds[i] for i in range(len(ds))]
    padded = PairCollator(tok.pad_token_id)(pairs)
    packed = PackedPairCollator(tok.pad_token_id, label_positions=True)(pairs)
    sides = [len(p[f"{side}_input_ids"]) for side in ("chosen", "rejected") for p in pairs]
    assert packed["input_ids"].shape == (1, sum(sides))
    assert packed[SEQUENCE_STARTS].tolist() == [sum(sides[:i]) for i in range(len(sides))]
    assert packed["document_ids"][0].unique(return_counts=True)[1].tolist() == sides

    model = transformers.AutoModelForCausalLM.from_pretrained(small_base, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    weights = torch.linspace(-1, 1, len(sides))
    want, want_counts = batch_log_probs(model, head, padded)
    (want * weights).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    inputs = dict(packed)
    Trainer.attend_per_document(model, inputs)
    got, got_counts = batch_log_probs(model, head, inputs, inputs.pop(LABEL_POSITIONS))
    assert got_counts.tolist() == want_counts.tolist()
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    (got * weights).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("packing", [False, True])
def test_padded_positions_score_as_the_labelled_positions(tmp_path, small_base, packing):
    """What a CUDA-graphed DPO step takes (`lmforge.training.graphs.bucketed`): the labelled positions padded
    to a bucket with positions past the batch. The log-probs, counts and gradients are those of the
    positions alone, padded rows and packed sides alike."""
    from lmforge.training.graphs import PADDED_POSITIONS, POSITION_BUCKET, bucketed

    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(5, seed=3))
    tok = transformers.AutoTokenizer.from_pretrained(small_base)
    ds = prepare(PAIRS, [data], tok, PairKind.fixed(PrepareOptions(model_max_length=128)), tok.chat_template).dataset()
    collator = (PackedPairCollator if packing else PairCollator)(tok.pad_token_id, label_positions=True)
    batch = collator([ds[i] for i in range(len(ds))])
    model = transformers.AutoModelForCausalLM.from_pretrained(small_base, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    Trainer.attend_per_document(model, batch)
    weights = torch.linspace(-1, 1, 10)

    results = []
    for graphed in (False, True):
        inputs = bucketed(dict(batch)) if graphed else dict(batch)
        positions = inputs.pop(LABEL_POSITIONS)
        padded = inputs.pop(PADDED_POSITIONS, False)
        if graphed:
            real = batch[LABEL_POSITIONS]
            assert padded and positions.numel() % POSITION_BUCKET == 0 and positions.numel() > real.numel()
            assert torch.equal(positions[:real.numel()], real)
            assert (positions[real.numel():] == batch["labels"].numel()).all()
        logps, counts = batch_log_probs(model, head, inputs, positions, padded)
        (logps * weights).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (want, want_counts, want_grads), (got, got_counts, got_grads) = results
    assert got_counts.tolist() == want_counts.tolist() and got.shape == (10,)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    for n, g in want_grads.items():
        assert torch.allclose(got_grads[n], g, rtol=1e-5, atol=1e-7), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU; the GPU test below trains")
def test_cuda_graphs_without_a_gpu_are_refused_before_anything_is_read(tmp_path, small_base, capsys):
    assert cli(dpo_argv(small_base, str(tmp_path / "missing.jsonl"), str(tmp_path / "o"), "--lora", "True",
                        "--cuda_graphs", "True")) == 2
    assert "--cuda_graphs True: CUDA graphs need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphed_steps_train_as_eager_steps(tmp_path, small_base, capsys):
    """`--cuda_graphs True`: after the first batch of a shape, LoRA DPO's micro-steps replay a
    recorded graph, with the losses and rewards of eager steps (gradient accumulation included:
    the graph adds into the gradients the Trainer then clips and steps with)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(48, seed=5))
    logs = {}
    for graphs in ("False", "True"):
        out = tmp_path / f"graphs-{graphs}"
        assert cli(dpo_argv(small_base, data, str(out), "--lora", "True", "--lora_dropout", "0", "--max_steps", "5",
                            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
                            "--bf16", "True", "--compile_blocks", "False", "--cuda_graphs", graphs)) == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        logs[graphs] = [(h["loss"], h["rewards/margins"], h["grad_norm"]) for h in history if "loss" in h]
    said = capsys.readouterr().out
    assert "lmforge: CUDA graphs: 1 recorded, 9 micro-steps replayed, 1 run eagerly" in said
    assert len(logs["True"]) == 5
    for got, want in zip(logs["True"], logs["False"]):
        assert got == pytest.approx(want, rel=2e-2, abs=1e-3)


def test_packed_pairs_train_as_padded_pairs(tmp_path, small_base):
    """`lmforge dpo --packing True` (LoRA) logs the losses and rewards the padded run logs."""
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(24, seed=4))
    logs = {}
    for packing in ("False", "True"):
        out = tmp_path / f"packing-{packing}"
        assert cli(dpo_argv(small_base, data, str(out), "--lora", "True", "--lora_dropout", "0", "--max_steps", "3",
                            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
                            "--save_strategy", "no", "--packing", packing)) == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        logs[packing] = [(h["loss"], h["rewards/margins"]) for h in history if "loss" in h]
        assert json.loads((out / "lmforge_run.json").read_text())["packing"] is (packing == "True")
    assert len(logs["True"]) == 3
    for (loss, margin), (want_loss, want_margin) in zip(logs["True"], logs["False"]):
        assert loss == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
        assert margin == pytest.approx(want_margin, rel=1e-3, abs=1e-5)


def test_losses_follow_their_formulas():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -4.5])
    margin = torch.tensor([1.5, -1.5])  # (c - ref_c) - (r - ref_r)
    beta = 0.5
    losses, rc, rr = preference_loss(chosen, rejected, ref_c, ref_r, beta, DpoLoss.SIGMOID)
    assert torch.allclose(losses, torch.log1p(torch.exp(-beta * margin)))
    assert torch.allclose(rc, beta * (chosen - ref_c)) and torch.allclose(rr, beta * (rejected - ref_r))
    smoothed, _, _ = preference_loss(chosen, rejected, ref_c, ref_r, beta, DpoLoss.SIGMOID, 0.2)
    assert torch.allclose(smoothed, 0.8 * torch.log1p(torch.exp(-beta * margin))
                          + 0.2 * torch.log1p(torch.exp(beta * margin)))
    ones = torch.ones(2)
    ipo, _, _ = preference_loss(chosen, rejected, ref_c, ref_r, beta, DpoLoss.IPO, 0.0, ones, ones)
    assert torch.allclose(ipo, (margin - 1.0) ** 2)
    # IPO averages each log-ratio over its answer's tokens: chosen ratios 0.5 / -1, rejected -1 / 0.5.
    ipo, _, _ = preference_loss(chosen, rejected, ref_c, ref_r, beta, DpoLoss.IPO, 0.0, torch.tensor([2.0, 4.0]),
                                torch.tensor([5.0, 1.0]))
    assert torch.allclose(ipo, torch.tensor([(0.25 + 0.2 - 1.0) ** 2, (-0.25 - 0.5 - 1.0) ** 2]))
    hinge, _, _ = preference_loss(chosen, rejected, ref_c, ref_r, beta, DpoLoss.HINGE)
    assert torch.allclose(hinge, torch.tensor([0.25, 1.75]))


class _OneProcess:
    """What TRL's DPO loss asks of accelerate, for one process on the CPU."""

    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (optional cross-check)")
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_batch_loss_and_rewards_equal_trl(loss_type, tmp_path, small_base):
    """One batch of pairs through TRL's DPOTrainer loss (its own fused head on its own copy of
    the model, reference log-probs given) and through lmforge's: the same loss and rewards."""
    from collections import defaultdict

    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this trl version computes its DPO loss elsewhere")
    batch = cached_batch(small_base, write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(4, seed=2)))
    ours_model = transformers.AutoModelForCausalLM.from_pretrained(small_base).train()
    trl_model = transformers.AutoModelForCausalLM.from_pretrained(small_base).train()
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    reference = torch.linspace(-30, -10, batch["input_ids"].shape[0])
    b = reference.shape[0] // 2

    trainer = DPOTrainer.__new__(DPOTrainer)  # the loss alone: no dataset, no optimizer
    trainer.__dict__.update(
        accelerator=_OneProcess(), model=trl_model, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=0.3, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    completion = (batch["labels"] != IGNORE_INDEX).long()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion, "ref_chosen_logps": reference[:b], "ref_rejected_logps": reference[b:]}
    theirs = trainer._compute_loss(trl_model, inputs, False)

    logps, counts = batch_log_probs(ours_model, ours_model.get_output_embeddings(), batch)
    losses, rc, rr = preference_loss(logps[:b], logps[b:], reference[:b], reference[b:], 0.3, DpoLoss(loss_type),
                                     0.0, counts[:b], counts[b:])
    assert torch.allclose(losses.mean(), theirs, rtol=1e-5, atol=1e-6), (losses.mean(), theirs)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/chosen"][0] == pytest.approx(rc.mean().item(), rel=1e-5)
    assert metrics["rewards/margins"][0] == pytest.approx((rc - rr).mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["logps/rejected"][0] == pytest.approx(logps[b:].mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def margins_and_accuracy(model, batch: dict, reference: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logps, _ = batch_log_probs(model, None, batch)
    b = logps.shape[0] // 2
    margins = (logps[:b] - reference[:b]) - (logps[b:] - reference[b:])
    return margins.mean().item(), (margins > 0).float().mean().item()


def test_full_dpo_raises_margin_and_accuracy(tmp_path, small_base, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(8))
    out = str(tmp_path / "out")
    assert cli(dpo_argv(small_base, data, out, "--max_steps", "12", "--per_device_train_batch_size", "4",
                        "--learning_rate", "5e-3", "--logging_steps", "4", "--save_strategy", "no")) == 0
    assert "reference: a frozen copy of the starting model" in capsys.readouterr().out
    batch = cached_batch(small_base, data)
    base = transformers.AutoModelForCausalLM.from_pretrained(small_base).eval()
    trained = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        reference, _ = batch_log_probs(base, None, batch)
    assert margins_and_accuracy(base, batch, reference) == (0.0, 0.0)  # the policy starts as the reference
    margin, accuracy = margins_and_accuracy(trained, batch, reference)
    assert margin > 1.0 and accuracy == 1.0, (margin, accuracy)
    logs = [h for h in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"] if "loss" in h]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(logs[0])
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] > 0
    assert logs[-1]["loss"] < logs[0]["loss"] < 0.6931472  # below log 2, the loss at margin 0


def test_lora_dpo_keeps_base_and_disabled_adapter_is_the_base(tmp_path, small_base):
    from lmforge.config import TrainingArguments
    from lmforge.flags import DpoArguments, LoraArguments, ModelArguments
    from lmforge.modeling.load import apply_lora, load_model, load_tokenizer
    from lmforge.training.dpo_trainer import DpoTrainer
    from lmforge.training.run import train_and_save

    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(8))
    batch = cached_batch(small_base, data)
    tok = load_tokenizer(ModelArguments(model_name_or_path=small_base))
    lora_args = LoraArguments(lora=True, lora_dropout=0.0)
    model = apply_lora(load_model(ModelArguments(model_name_or_path=small_base), tok, lora=lora_args), lora_args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cached = prepare(PAIRS, [data], tok, PairKind.fixed(PrepareOptions(model_max_length=128)), tok.chat_template)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=2e-2, report_to="none", disable_tqdm=True, save_strategy="no",
                             dataloader_pin_memory=False, remove_unused_columns=False)
    train_and_save(model, args, tok, cached.dataset(), None, PairCollator(tok.pad_token_id), None, None, {},
                   trainer_class=DpoTrainer, trainer_kwargs={"dpo": DpoArguments()})
    model = model.cpu().eval()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    base = transformers.AutoModelForCausalLM.from_pretrained(small_base).eval()
    with torch.no_grad():
        expected, _ = batch_log_probs(base, base.get_output_embeddings(), batch)
        with model.disable_adapter():
            disabled, _ = batch_log_probs(model, model.get_base_model().get_output_embeddings(), batch)
        policy, _ = batch_log_probs(model, None, batch)
    assert torch.equal(disabled, expected)
    assert margins_and_accuracy(model, batch, expected)[1] == 1.0 and not torch.allclose(policy, expected)


def test_lora_dpo_resumes_and_saves_an_adapter(tmp_path, small_base, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(8))
    out = str(tmp_path / "out")
    argv = dpo_argv(small_base, data, out, "--lora", "True", "--per_device_train_batch_size", "4",
                    "--learning_rate", "1e-2", "--save_steps", "2", "--loss_type", "ipo", "--sft_weight", "0.5",
                    "--logging_steps", "1")
    assert cli([*argv, "--max_steps", "2"]) == 0
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "adapter_model.safetensors"))
    capsys.readouterr()
    assert cli([*argv, "--max_steps", "4"]) == 0
    log = capsys.readouterr().out
    assert f"lmforge: resuming from {os.path.join(out, 'checkpoint-2')}" in log
    assert "reference: the model with its adapter disabled" in log
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    logged = [h for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 4 and [h["step"] for h in logged] == [1, 2, 3, 4]
    assert all("nll" in h and "rewards/margins" in h for h in logged)

    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(small_base)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    batch = cached_batch(small_base, data)
    with torch.no_grad():
        policy, _ = batch_log_probs(model, None, batch)
        with model.disable_adapter():
            reference, _ = batch_log_probs(model, None, batch)
    assert not torch.allclose(policy, reference)  # the saved adapter is the trained one
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == base_template(small_base)


def base_template(path: str) -> str:
    return transformers.AutoTokenizer.from_pretrained(path).chat_template


def test_precomputed_reference_is_the_base_and_is_cached_by_model(tmp_path, small_base, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(6))
    argv = ["--max_steps", "3", "--per_device_train_batch_size", "3", "--precompute_ref_log_probs", "True",
            "--save_strategy", "no", "--learning_rate", "5e-3"]
    assert cli(dpo_argv(small_base, data, str(tmp_path / "a"), *argv)) == 0
    log = capsys.readouterr().out
    assert "computing the reference log-probabilities of 6 pairs" in log and "reference: precomputed" in log
    said = "lmforge: reference log-probabilities: "
    entry = next(line[len(said):] for line in log.splitlines() if line.startswith(said))
    import datasets

    stored = datasets.Dataset.from_file(os.path.join(entry, "tokens.arrow"))
    batch = cached_batch(small_base, data)
    base = transformers.AutoModelForCausalLM.from_pretrained(small_base).eval()
    with torch.no_grad():
        expected = direct_log_probs(base, batch).double()
    got = torch.tensor(list(stored["ref_chosen_logps"]) + list(stored["ref_rejected_logps"]), dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-4)  # computed on the device training uses
    # The same data and model: found, not computed. Other weights: computed again.
    assert cli(dpo_argv(small_base, data, str(tmp_path / "b"), *argv)) == 0
    assert "computing the reference" not in capsys.readouterr().out
    other = str(tmp_path / "other")
    transformers.AutoModelForCausalLM.from_pretrained(small_base).save_pretrained(other)
    with torch.no_grad():
        m = transformers.AutoModelForCausalLM.from_pretrained(other)
        next(m.parameters()).add_(0.01)
        m.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(small_base).save_pretrained(other)
    assert cli(dpo_argv(other, data, str(tmp_path / "c"), *argv)) == 0
    assert "computing the reference log-probabilities of 6 pairs" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(tmp_path / "c", "model.safetensors"))


def test_module_entry_and_bad_flags(tmp_path, small_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(2))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "lmforge.dpo", *dpo_argv(small_base, data, str(tmp_path / "o"))[1:],
                          "--loss_type", "hinge", "--label_smoothing", "0.1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == \
        "lmforge dpo: error: --label_smoothing applies to --loss_type sigmoid, not hinge"
    assert "Traceback" not in run.stderr


def test_val_split_holds_out_pairs_with_their_precomputed_reference(tmp_path, small_base, capsys):
    """--val_split holds out pairs for DPO as for SFT (drawn by --seed), also when the reference
    log-probabilities are precomputed over the whole file: each held-out row keeps its own."""
    data = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(8))
    out = tmp_path / "out"
    argv = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--precompute_ref_log_probs", "True",
            "--save_strategy", "no", "--val_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "1",
            "--seed", "3"]
    assert cli(dpo_argv(small_base, data, str(out), *argv)) == 0
    log = capsys.readouterr().out
    assert "--val_split 0.25: 2 of 8 pairs held out for evaluation (drawn by --seed 3)" in log
    info = json.loads((out / "lmforge_run.json").read_text())
    assert info["pairs"] == 6 and info["rows"] == 6
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert evals and all(math.isfinite(h["eval_loss"]) for h in evals)
