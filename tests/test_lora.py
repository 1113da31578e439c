"""LoRA / QLoRA through PEFT: only adapter weights train, the adapter reloads with PEFT,
`lmforge merge` gives the same logits, a LoRA run resumes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from lmforge.cli import main as cli
from lmforge.config import TrainingArguments
from lmforge.data.collate import PaddedCollator
from lmforge.data.encode import CHAT, prepare
from lmforge.data.options import ChatOptions as PrepareOptions
from lmforge.flags import LoraArguments, ModelArguments
from lmforge.modeling.load import apply_lora, load_model, load_tokenizer
from lmforge.training.run import train_and_save

from conftest import DUMMY_CONVERSATIONS, QWEN_TOKENIZER

TINY = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=151936, max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture
def base_model(tmp_path) -> str:
    """A tiny model with weights on disk, and the Qwen tokenizer beside them."""
    path = str(tmp_path / "base")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER)).save_pretrained(path)
    return path


def lora_argv(base: str, out: str, *extra: str) -> list[str]:
    return ["lora", "--model_name_or_path", base, "--data_path", str(DUMMY_CONVERSATIONS), "--output_dir", out,
            "--model_max_length", "128", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--report_to", "none", "--disable_tqdm", "True", "--dataloader_pin_memory", "False", *extra]


def ids_for(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                         return_tensors="pt")["input_ids"]


def test_only_adapters_train_and_merge_matches(tmp_path, base_model):
    out, merged = str(tmp_path / "out"), str(tmp_path / "merged")
    model_args = ModelArguments(model_name_or_path=base_model)
    lora_args = LoraArguments(lora=True, lora_target_modules=["q_proj,v_proj"], modules_to_save=[])
    args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to="none", disable_tqdm=True, save_strategy="no", dataloader_pin_memory=False)
    tokenizer = load_tokenizer(model_args)
    data = prepare(CHAT, [str(DUMMY_CONVERSATIONS)], tokenizer, PrepareOptions(model_max_length=128),
                   tokenizer.chat_template)
    model = apply_lora(load_model(model_args, tokenizer, model_max_length=128, lora=lora_args), lora_args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_and_save(model, args, tokenizer, data.dataset(), None, PaddedCollator(tokenizer.pad_token_id), None,
                   tokenizer.convert_tokens_to_ids("<|im_end|>"), {})
    model = model.cpu()  # the Trainer moved it to the GPU, where there is one
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in before if "lora_" in n and "lora_B" in n} <= changed
    # The base weights are bit-identical; only q_proj / v_proj carry adapters.
    assert all(torch.equal(before[n], after[n].detach()) for n in before if "lora_" not in n)
    assert all(("q_proj" in n or "v_proj" in n) for n in before if "lora_" in n)

    # The output is an adapter PEFT loads, giving the trained model's logits.
    import peft

    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = ids_for(tok)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(base_model)
        reloaded = peft.PeftModel.from_pretrained(base, out).eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, trained, atol=1e-5)
    assert set(os.listdir(out)) >= {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                                    "chat_template.jinja", "trainer_state.json", "generation_config.json"}

    # Merged: a full model whose logits equal the adapter model's.
    assert cli(["merge", "--base", base_model, "--adapter", out, "--output", merged]) == 0
    full = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert (full(input_ids=ids).logits - trained).abs().max().item() <= 1e-4
    assert not any("lora" in k for k in full.state_dict())
    assert full.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert transformers.AutoTokenizer.from_pretrained(merged).chat_template == tok.chat_template


def _train_lora_bf16(base: str, out: str, adapter_dtype: torch.dtype | None):
    """A bf16 base with LoRA adapters (fp32, PEFT's way, or `adapter_dtype`), 4 steps under bf16
    autocast with clipping active; returns the model, the optimizer and the log history."""
    model_args = ModelArguments(model_name_or_path=base, torch_dtype="bfloat16")
    lora_args = LoraArguments(lora=True, lora_dropout=0.0)
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             max_grad_norm=0.05, bf16=True, use_cpu=True, logging_steps=1, report_to="none",
                             disable_tqdm=True, save_strategy="no", dataloader_pin_memory=False, seed=0)
    tokenizer = load_tokenizer(model_args)
    data = prepare(CHAT, [str(DUMMY_CONVERSATIONS)], tokenizer, PrepareOptions(model_max_length=128),
                   tokenizer.chat_template)
    model = load_model(model_args, tokenizer, model_max_length=128, lora=lora_args)
    torch.manual_seed(0)  # the adapters' initialisation
    model = apply_lora(model, lora_args, adapter_dtype=adapter_dtype)
    with torch.no_grad():  # the same starting adapters on both sides: values bf16 holds exactly
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.to(torch.bfloat16))
    seen = {}

    class Keep(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            seen["optimizer"], seen["history"] = getattr(optimizer, "optimizer", optimizer), list(state.log_history)

    train_and_save(model, args, tokenizer, data.dataset(), None, PaddedCollator(tokenizer.pad_token_id), None,
                   tokenizer.convert_tokens_to_ids("<|im_end|>"), {}, callbacks=[Keep()])
    return model, seen["optimizer"], seen["history"]


def test_bf16_adapters_over_fp32_masters_train_as_fp32_adapters_under_autocast(tmp_path, base_model):
    """What lmforge picks for LoRA on a bf16 model (no casts of the activations to fp32 and
    back in every adapted layer) computes exactly what PEFT's fp32 adapters under bf16 autocast
    compute: the same losses and gradient norms at every step (clipped on the fp32 masters),
    masters equal to the fp32 adapters, and the model's adapters their bf16 rounding."""
    from lmforge.modeling.optim import MasterWeightAdamW

    ref_model, ref_opt, ref_log = _train_lora_bf16(base_model, str(tmp_path / "fp32"), None)
    model, opt, log = _train_lora_bf16(base_model, str(tmp_path / "bf16"), torch.bfloat16)
    assert isinstance(opt, MasterWeightAdamW) and not isinstance(ref_opt, MasterWeightAdamW)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = dict(ref_model.named_parameters())
    assert trained and all("lora_" in n and p.dtype == torch.bfloat16 for n, p in trained)
    assert all(ref[n].dtype == torch.float32 for n, _ in trained)

    steps = [(e["loss"], e["grad_norm"]) for e in log if "loss" in e]
    assert len(steps) == 4 and steps == [(e["loss"], e["grad_norm"]) for e in ref_log if "loss" in e]
    assert all(norm > 0.05 for _, norm in steps)  # the clipping acted on every step
    for (name, p), master in zip(trained, opt.master_params()):
        assert torch.equal(master, ref[name].detach()), name
        assert torch.equal(p.detach(), ref[name].detach().to(torch.bfloat16)), name
    assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in trained if "lora_B" in n)


def test_lora_run_resumes_from_its_checkpoint(tmp_path, base_model, capsys):
    out = str(tmp_path / "out")
    assert cli(lora_argv(base_model, out, "--max_steps", "2", "--save_steps", "2")) == 0
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(out, "checkpoint-2", "model.safetensors"))
    capsys.readouterr()
    assert cli(lora_argv(base_model, out, "--max_steps", "4", "--save_steps", "2")) == 0
    assert f"lmforge: resuming from {os.path.join(out, 'checkpoint-2')}" in capsys.readouterr().out
    with open(os.path.join(out, "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 4


def test_lora_needs_weights_and_known_modules(tmp_path, base_model, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(TINY))
    argv = lora_argv(base_model, str(tmp_path / "o"), "--max_steps", "1")
    argv[argv.index("--model_name_or_path"):argv.index("--model_name_or_path") + 2] = [
        "--config_name", str(config), "--tokenizer_name", str(QWEN_TOKENIZER)]
    assert cli(argv) == 2
    assert "--lora needs a base model with weights" in capsys.readouterr().err
    assert cli(lora_argv(base_model, str(tmp_path / "o2"), "--max_steps", "1", "--lora_target_modules", "nope")) == 2
    assert "--lora_target_modules: the model has no module named 'nope'; its layer names are" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; the GPU test below runs QLoRA")
def test_qlora_on_cpu_is_refused_clearly(tmp_path, base_model, capsys):
    assert cli(lora_argv(base_model, str(tmp_path / "o"), "--max_steps", "1", "--q_lora", "True")) == 2
    err = capsys.readouterr().err
    assert "--q_lora needs" in err and ("CUDA GPU" in err or "bitsandbytes" in err)


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _has_bitsandbytes(), reason="QLoRA needs bitsandbytes (verified on the GPU device)")
def test_qlora_keeps_4bit_weights_frozen(tmp_path, base_model):
    import bitsandbytes as bnb

    out = str(tmp_path / "out")
    model_args = ModelArguments(model_name_or_path=base_model)
    lora_args = LoraArguments(q_lora=True)
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to="none", disable_tqdm=True, save_strategy="no", bf16=True)
    tokenizer = load_tokenizer(model_args)
    data = prepare(CHAT, [str(DUMMY_CONVERSATIONS)], tokenizer, PrepareOptions(model_max_length=128),
                   tokenizer.chat_template)
    model = apply_lora(load_model(model_args, tokenizer, model_max_length=128, lora=lora_args), lora_args)
    quantized = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized, "no 4-bit layers"
    train_and_save(model, args, tokenizer, data.dataset(), None, PaddedCollator(tokenizer.pad_token_id), None,
                   None, {})
    for n, m in model.named_modules():
        if n in quantized:
            assert not m.weight.requires_grad
            # Packed 4-bit storage read as bf16 holds NaN bit patterns: compare the bytes.
            assert torch.equal(m.weight.data.view(torch.uint8), quantized[n].view(torch.uint8))
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_bitsandbytes(), reason="QLoRA needs bitsandbytes (verified on the GPU device)")
def test_qlora_stores_tied_embedding_and_head_in_one_4bit_copy(tmp_path):
    import bitsandbytes as bnb

    from lmforge.modeling.quantize import TiedEmbedding4bit

    base = str(tmp_path / "base64")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{**TINY, "hidden_size": 64, "num_attention_heads": 4})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER)).save_pretrained(base)
    model_args = ModelArguments(model_name_or_path=base)
    tokenizer = load_tokenizer(model_args)
    quantized = load_model(model_args, tokenizer, lora=LoraArguments(q_lora=True))
    emb, head = quantized.get_input_embeddings(), quantized.get_output_embeddings()
    assert isinstance(emb, TiedEmbedding4bit) and isinstance(head, bnb.nn.Linear4bit)
    assert emb.weight is head.weight  # one 4-bit copy
    full = bnb.functional.dequantize_4bit(head.weight.data, head.weight.quant_state)
    ids = torch.randint(0, config.vocab_size, (3, 17), device=full.device)
    assert torch.equal(emb(ids), full[ids])  # a lookup dequantises exactly those rows
    # The same model with bf16 embeddings holding the dequantised values computes the same logits.
    plain = load_model(model_args, tokenizer, lora=LoraArguments(q_lora=True, q_lora_embeddings=False))
    with torch.no_grad():
        plain.get_input_embeddings().weight.copy_(full)
        a, b = quantized(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
    # It trains (the fused loss reads the 4-bit head) and saves an adapter.
    out = str(tmp_path / "out")
    lora_args = LoraArguments(q_lora=True)
    model = apply_lora(quantized, lora_args)
    data = prepare(CHAT, [str(DUMMY_CONVERSATIONS)], tokenizer, PrepareOptions(model_max_length=128),
                   tokenizer.chat_template)
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to="none", disable_tqdm=True, save_strategy="no", bf16=True)
    packed_before = head.weight.data.clone()
    train_and_save(model, args, tokenizer, data.dataset(), None, PaddedCollator(tokenizer.pad_token_id), None,
                   None, {})
    assert torch.equal(head.weight.data.view(torch.uint8), packed_before.view(torch.uint8))
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_adapter_names_its_base_by_an_absolute_path(tmp_path, base_model, monkeypatch):
    """PEFT stores the base model's path in adapter_config.json; given as a relative path it would
    load only from the directory the run started in."""
    monkeypatch.chdir(os.path.dirname(base_model))
    out = str(tmp_path / "out")
    assert cli(lora_argv(os.path.basename(base_model), out, "--max_steps", "1", "--save_strategy", "no")) == 0
    with open(os.path.join(out, "adapter_config.json")) as f:
        stored = json.load(f)["base_model_name_or_path"]
    assert os.path.isabs(stored) and os.path.realpath(stored) == os.path.realpath(base_model)
