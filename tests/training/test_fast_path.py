"""The speed settings chosen for flags left unset (lmforge/training/fast_path.py): on a CUDA GPU under --bf16,
bf16 weights with fp32 masters, compiled blocks on packed rows and an activation memory budget;
eager fp32 on a CPU, under DeepSpeed / FSDP and for rows of varying length; a flag the user gave
is never changed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lmforge.config import TrainingArguments
from lmforge.flags import ModelArguments
from lmforge.training.fast_path import Rows, choose_fast_path, describe

from conftest import DUMMY_CONVERSATIONS, SHARED_DATA


def flags(**given):
    model = SimpleNamespace(torch_dtype=given.pop("torch_dtype", None))
    args = SimpleNamespace(use_cpu=False, deepspeed=None, fsdp=None, bf16=True, fp16=False, compile_blocks=None,
                           compile_memory_budget=None, gradient_checkpointing=False, cuda_graphs=None,
                           world_size=1)
    for k, v in given.items():
        setattr(args, k, v)
    return model, args


def chosen(model, args) -> tuple:
    return model.torch_dtype, args.compile_blocks, args.compile_memory_budget


@pytest.mark.parametrize("given, cuda, rows, want", [
    ({}, True, Rows.PAIRS, True),  # DPO's padded pairs on one GPU: host-bound, graphed
    ({}, True, Rows.PACKED_PAIRS, False),  # a length per batch: a graph per 128 tokens, not measured
    ({}, True, Rows.PACKED, False),  # SFT: labelled positions of every count, not graphed yet
    ({}, False, Rows.PAIRS, False),
    ({"fp16": True, "bf16": False}, True, Rows.PAIRS, False),
    ({"gradient_checkpointing": True}, True, Rows.PAIRS, False),
    ({"deepspeed": "zero2.json"}, True, Rows.PAIRS, False),
    ({"cuda_graphs": False}, True, Rows.PAIRS, False),
])
def test_cuda_graphs_choice(given, cuda, rows, want):
    model, args = flags(**given)
    choices = choose_fast_path(model, args, rows, cuda=cuda)
    assert args.cuda_graphs is want
    assert any(c.flag == "cuda_graphs" for c in choices) is (want and "cuda_graphs" not in given)


@pytest.mark.parametrize("given, cuda, rows, want", [
    # FastChat's / happy-llm's command line on a GPU: the fastest measured settings.
    ({}, True, Rows.PACKED, ("bfloat16", True, 0.8)),
    # DPO's pairs: compiled too (dynamic length); --packing False: eager; bf16 weights either way.
    ({}, True, Rows.PAIRS, ("bfloat16", True, 0.8)),
    ({}, True, Rows.PADDED, ("bfloat16", False, 1.0)),
    ({}, True, Rows.ROLLOUTS, ("bfloat16", False, 1.0)),  # GRPO: generate compiles its own decode step
    ({"compile_blocks": True}, True, Rows.ROLLOUTS, ("bfloat16", True, 0.8)),
    ({}, False, Rows.PACKED, ("float32", False, 1.0)),  # a CPU
    ({}, False, Rows.PAIRS, ("float32", False, 1.0)),
    ({"deepspeed": "zero3.json"}, True, Rows.PACKED, ("float32", False, 1.0)),
    ({"fsdp": True}, True, Rows.PACKED, ("float32", False, 1.0)),
    ({"bf16": False, "fp16": True}, True, Rows.PACKED, ("float32", True, 0.8)),
    ({"bf16": False}, True, Rows.PACKED, ("float32", True, 0.8)),  # fp32 training: compiled blocks still pay
    # Given flags are kept as given.
    ({"torch_dtype": "float32", "compile_blocks": False}, True, Rows.PACKED, ("float32", False, 1.0)),
    ({"compile_blocks": True, "compile_memory_budget": 1.0}, True, Rows.PACKED, ("bfloat16", True, 1.0)),
    ({"torch_dtype": "bfloat16", "compile_blocks": True}, False, Rows.PACKED, ("bfloat16", True, 1.0)),
])
def test_choices(given, cuda, rows, want):
    model, args = flags(**given)
    choose_fast_path(model, args, rows, cuda=cuda)
    assert chosen(model, args) == want


@pytest.mark.parametrize("given, cuda, want", [
    ({}, True, ("bfloat16", True, 0.1)),  # QLoRA on a GPU: memory first
    ({"gradient_checkpointing": True}, True, ("bfloat16", True, 0.8)),  # checkpointing already saves it
    ({"compile_memory_budget": 0.5}, True, ("bfloat16", True, 0.5)),
    ({}, False, ("float32", False, 1.0)),
])
def test_choices_for_a_4bit_base(given, cuda, want):
    model, args = flags(**given)
    choices = choose_fast_path(model, args, Rows.PACKED, cuda=cuda, quantized=True)
    assert chosen(model, args) == want
    if want[2] == 0.1:
        assert any(c.flag == "compile_memory_budget" and "QLoRA" in c.why for c in choices)


def test_each_choice_says_why_and_given_flags_are_not_listed():
    model, args = flags()
    lines = describe(choose_fast_path(model, args, Rows.PACKED, cuda=True))
    assert lines == [
        "lmforge: speed: --torch_dtype bfloat16 (the model computes in bf16, AdamW updates fp32 master weights "
        "(--torch_dtype float32: fp32 weights under bf16 autocast))",
        "lmforge: speed: --compile_blocks True (CUDA GPU and packed rows of one length (--compile_blocks False: eager))",
        "lmforge: speed: --compile_memory_budget 0.8 (recomputes the cheapest activations in the backward: less "
        "memory at no measured speed cost (1: keep them all))",
    ]
    model, args = flags(torch_dtype="float32", compile_blocks=False, compile_memory_budget=1.0)
    assert describe(choose_fast_path(model, args, Rows.PACKED, cuda=True)) == []
    model, args = flags()
    assert describe(choose_fast_path(model, args, Rows.PACKED, cuda=False)) == [
        "lmforge: speed: --torch_dtype float32, --compile_blocks False (no CUDA GPU: compiled blocks and bf16 "
        "weights pay off on a GPU only)"]


def test_parsed_flags_leave_the_choices_open(tmp_path):
    """Unset on the command line means None after parsing (not a value that looks chosen)."""
    args = TrainingArguments(output_dir=str(tmp_path))
    assert ModelArguments().torch_dtype is None
    assert args.compile_blocks is None and args.compile_memory_budget is None and args.cuda_graphs is None


def tiny_sft(tmp_path, capsys, steps: int, records: int, layers: int) -> tuple:
    """`lmforge sft --bf16 True` with only the seed-style flags, on a tiny Qwen-shaped model:
    (output directory, console)."""
    from lmforge.cli import main as cli

    out, config, data = tmp_path / "out", tmp_path / "tiny.json", tmp_path / "d.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32 * layers, "intermediate_size": 64 * layers,
                                  "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "vocab_size": 151936, "max_position_embeddings": 512}))
    data.write_text(json.dumps(json.loads(DUMMY_CONVERSATIONS.read_text())[:records]))
    assert cli(["sft", "--config_name", str(config), "--tokenizer_name",
                str(SHARED_DATA / "tokenizers" / "qwen2.5-0.5b-instruct"), "--data_path", str(data),
                "--output_dir", str(out), "--bf16", "True", "--max_steps", str(steps), "--model_max_length", "256",
                "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "True",
                "--logging_steps", "1", "--data_cache_dir", str(tmp_path / "cache")]) == 0
    return out, capsys.readouterr().out


def test_a_cpu_run_says_what_it_chose_and_records_it(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the CPU choices; the GPU ones are checked by test_gpu_run_takes_the_fast_path")
    out, log = tiny_sft(tmp_path, capsys, steps=1, records=8, layers=1)
    assert "lmforge: speed: --torch_dtype float32, --compile_blocks False (no CUDA GPU" in log
    assert "  speed: float32 weights under bf16 autocast; eager; sdpa attention; no gradient checkpointing" in log
    assert json.loads((out / "lmforge_run.json").read_text())["config"]["torch_dtype"] == "float32"


@pytest.mark.gpu
def test_gpu_run_takes_the_fast_path(tmp_path, capsys):
    out, log = tiny_sft(tmp_path, capsys, steps=3, records=64, layers=2)
    assert "lmforge: speed: --torch_dtype bfloat16" in log and "--compile_blocks True" in log
    assert "compiled 2 decoder blocks" in log and "AdamW over fp32 master weights" in log
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)


def test_fastchat_command_line_in_one_process_gets_the_fast_path(tmp_path, monkeypatch):
    """FastChat's train.py flags (FSDP included) run as one process: the FSDP flag is dropped at
    parsing (nothing to shard across), so on a CUDA GPU the fast path is chosen as for the plain
    seed flags (under FSDP proper the engine's path: the decision table above)."""
    from lmforge.recipe import parse_flags
    from lmforge.sft import Sft

    argv = ["--model_name_or_path", "base", "--data_path", "data.json", "--output_dir", str(tmp_path),
            "--bf16", "True", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "16",
            "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type",
            "cosine", "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
            "--tf32", "True", "--model_max_length", "2048", "--lazy_preprocess", "True"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = parse_flags(Sft(), argv)
    choose_fast_path(flags.model, flags.args, Sft().rows(flags), cuda=True)
    assert flags.args.fsdp is None and flags.args.fsdp_requested
    assert chosen(flags.model, flags.args) == ("bfloat16", True, 0.8)


def test_speed_line_says_what_is_in_effect():
    """No fp16 autocast is claimed on a CPU (accelerate autocasts fp16 on a GPU only); CUDA graphs
    are named when on."""
    import torch
    import transformers

    from lmforge.training.preflight import speed_line

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    args = SimpleNamespace(bf16=False, fp16=True, compile_blocks=True, compile_memory_budget=0.8,
                           gradient_checkpointing=False, cuda_graphs=False, device=torch.device("cpu"),
                           deepspeed=None, fsdp=None, optim="adamw_torch")
    assert speed_line(model, args) == ("speed: float32 weights; compiled blocks (activation memory budget 0.8); "
                                       "sdpa attention; no gradient checkpointing")
    args.device, args.cuda_graphs = torch.device("cuda"), True
    assert speed_line(model, args) == ("speed: float32 weights under fp16 autocast; compiled blocks (activation "
                                       "memory budget 0.8); sdpa attention; no gradient checkpointing; "
                                       "CUDA graphs per micro-step")
