"""Pretraining: tokenizer training, exact blocks, a from-scratch run whose loss falls, continued
pretraining from its weights, RoPE scaling as FastChat sets it."""

from __future__ import annotations

import json
import math

import pytest
import transformers

from lmforge.cli import main as cli
from lmforge.data.collate import PaddedCollator
from lmforge.data.encode import TEXT, prepare
from lmforge.data.options import Remainder, TextSplit
from lmforge.data.options import TextOptions as PretrainOptions
from lmforge.data.sources import iter_documents
from lmforge.errors import DataError, LmforgeError
from lmforge.modeling.load import apply_rope_scaling

from conftest import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "pretrain_text" / "tinyshakespeare.txt"
C4 = SHARED_DATA / "llama_factory" / "c4_demo.jsonl"


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok") / "tok")
    assert cli(["tokenizer", "train", "--train_files", str(SHAKESPEARE), "--vocab_size", "512",
                "--output_dir", out]) == 0
    return out


def test_trained_tokenizer_loads_with_chat_template(trained_tokenizer):
    tok = transformers.AutoTokenizer.from_pretrained(trained_tokenizer)
    assert len(tok) == 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("remainder", [Remainder.DROP, Remainder.PAD])
def test_blocks_are_the_corpus_in_order(tmp_path, qwen_tokenizer, remainder):
    paths = [str(C4), str(SHAKESPEARE)]
    options = PretrainOptions(block_size=1000, text_split=TextSplit.BLANK_LINE, remainder=remainder)
    entry = prepare(TEXT, paths, qwen_tokenizer, options)
    blocks = entry.dataset()["input_ids"]
    # Reference: every document tokenized alone, followed by EOS, files in the order given.
    stream = []
    for path in paths:
        for _, text in iter_documents(path, "text", TextSplit.BLANK_LINE):
            stream += qwen_tokenizer(text)["input_ids"] + [qwen_tokenizer.eos_token_id]
    full = len(stream) // 1000
    assert [len(b) for b in blocks[:full]] == [1000] * full
    assert sum(blocks, []) == (stream if remainder == Remainder.PAD else stream[: full * 1000])
    assert entry.stats.tokens == len(stream)
    assert entry.stats.dropped_tail_tokens == (0 if remainder == Remainder.PAD else len(stream) % 1000)
    if remainder == Remainder.PAD:
        batch = PaddedCollator(qwen_tokenizer.pad_token_id)([{"input_ids": blocks[-2]}, {"input_ids": blocks[-1]}])
        tail = len(blocks[-1])
        assert batch["labels"][1, :tail].tolist() == blocks[-1]
        assert set(batch["labels"][1, tail:].tolist()) <= {-100}
        assert batch["attention_mask"][1].sum().item() == tail


def test_text_errors_name_the_record(tmp_path, qwen_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: field 'text' is missing \(keys: \['content'\]\)"):
        prepare(TEXT, [str(bad)], qwen_tokenizer, PretrainOptions(block_size=4))
    small = tmp_path / "small.txt"
    small.write_text("only a few words")
    with pytest.raises(LmforgeError, match="fewer than one block"):
        prepare(TEXT, [str(small)], qwen_tokenizer, PretrainOptions(block_size=512))


def test_pretrain_from_scratch_then_continue(tmp_path, trained_tokenizer):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": True}))
    out = tmp_path / "scratch"
    common = ["--tokenizer_name", trained_tokenizer, "--train_files", str(SHAKESPEARE), "--block_size", "128",
              "--per_device_train_batch_size", "16", "--logging_steps", "10", "--report_to", "none",
              "--disable_tqdm", "True", "--save_strategy", "no", "--dataloader_pin_memory", "False"]
    assert cli(["pretrain", "--config_name", str(config), "--output_dir", str(out), "--max_steps", "120",
                "--learning_rate", "3e-3", "--warmup_steps", "10", *common]) == 0
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses[0] > 5.5 and losses[-1] < losses[0] - 1.5, losses
    assert json.loads((out / "lmforge_run.json").read_text())["train_data"]["dropped_tail_tokens"] < 128

    cont = tmp_path / "continued"
    assert cli(["pretrain", "--model_name_or_path", str(out), "--output_dir", str(cont), "--max_steps", "10",
                "--learning_rate", "1e-3", *common]) == 0
    first = [h["loss"] for h in json.loads((cont / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert first[0] < losses[0] - 1.0  # it starts from the trained weights, not from scratch


def test_rope_scaling_as_fastchat_sets_it():
    config = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=100,
                                               rope_theta=5e5)
    apply_rope_scaling(config, 100)
    assert config.rope_parameters["rope_type"] == "default"
    apply_rope_scaling(config, 250)
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == float(math.ceil(250 / 100)) == 3.0
    assert config.rope_parameters["rope_theta"] == 5e5
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.model.rotary_emb.rope_type == "linear"


def test_pretrain_with_document_mask_runs(tmp_path, trained_tokenizer):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 512,
                                  "max_position_embeddings": 256}))
    out = tmp_path / "out"
    assert cli(["pretrain", "--config_name", str(config), "--tokenizer_name", trained_tokenizer,
                "--train_files", str(SHAKESPEARE), "--text_split", "blank_line", "--block_size", "128",
                "--pretrain_document_mask", "True", "--output_dir", str(out), "--max_steps", "3",
                "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "True",
                "--save_strategy", "no", "--dataloader_pin_memory", "False"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
