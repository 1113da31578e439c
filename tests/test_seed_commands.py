"""The seeds' command lines run through lmforge as written: FastChat's train.py (FSDP, torchrun)
and train_lora.py (DeepSpeed ZeRO-2 with CPU offload), happy-llm's pretrain.py and
finetune.py (DeepSpeed ZeRO-2). Only the model, the data and the output paths are swapped for
tiny local ones, and `--max_steps` keeps them short. On a machine without a GPU, `--bf16 True`
trains on the CPU (and FSDP runs as DDP there: accelerate enables FSDP for GPU backends only)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from lmforge.cli import main as cli

from conftest import DUMMY_CONVERSATIONS, SHARED_DATA

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # see the markers in pyproject.toml

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make test installs it)")

TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> str:
    """A 512-token BPE tokenizer: with packing, rows are model_max_length (2048) tokens long,
    and a 152k vocabulary's fp32 logits for them would not fit two ranks in CI's memory."""
    out = str(tmp_path_factory.mktemp("tok") / "tok")
    assert cli(["tokenizer", "train", "--train_files", str(SHARED_DATA / "pretrain_text" / "tinyshakespeare.txt"),
                "--vocab_size", "512", "--output_dir", out]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, small_tokenizer) -> str:
    path = str(tmp_path_factory.mktemp("llama") / "tiny-llama")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**TINY_LLAMA)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(small_tokenizer).save_pretrained(path)
    return path


def free_port() -> int:
    """A free local port for the launcher's rendezvous, so parallel runs never share 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], tmp_path) -> str:
    # The environment's own bin (deepspeed's launcher, ninja for its CPU ops) comes first on
    # PATH, as it does in an activated environment.
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_CACHE": str(tmp_path / "cache"),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=str(tmp_path))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return log


def final_step(out) -> int:
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


def test_fastchat_train_fsdp_command(tmp_path, tiny_llama):
    out = str(tmp_path / "output" / "vicuna-7b-sft")
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnode=1",
            f"--master_port={free_port()}",
            "-m", "lmforge.sft",
            "--model_name_or_path", tiny_llama,
            "--data_path", str(DUMMY_CONVERSATIONS),
            "--output_dir", out,
            "--num_train_epochs", "3",
            "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "8",
            "--learning_rate", "2e-5",
            "--model_max_length", "2048",
            "--bf16", "True",
            "--fsdp", "full_shard auto_wrap",
            "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
            "--lazy_preprocess", "True",
            "--save_strategy", "steps",
            "--save_steps", "500",
            "--max_steps", "2", "--report_to", "none"], tmp_path)
    assert final_step(out) == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0


def test_fastchat_fsdp_command_in_one_process_trains_without_sharding(tmp_path, tiny_llama, capsys, monkeypatch):
    """The same command line without a launcher: nothing to shard across, so it trains unsharded
    and says so (accelerate would refuse FSDP outside distributed training, with a traceback)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "output" / "vicuna-7b-sft")
    assert cli(["sft", "--model_name_or_path", tiny_llama, "--data_path", str(DUMMY_CONVERSATIONS),
                "--output_dir", out, "--per_device_train_batch_size", "4", "--learning_rate", "2e-5",
                "--model_max_length", "2048", "--bf16", "True", "--fsdp", "full_shard auto_wrap",
                "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--lazy_preprocess", "True",
                "--max_steps", "2", "--report_to", "none"]) == 0
    said = capsys.readouterr().out
    assert ("lmforge: --fsdp 'full_shard auto_wrap' in one process: nothing to shard across, so this trains without "
            "FSDP; launch with torchrun --nproc_per_node N to shard over N GPUs") in said
    assert final_step(out) == 2


FASTCHAT_ZERO2 = {
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "contiguous_gradients": True,
                          "overlap_comm": True},
    "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
}


@needs_deepspeed
def test_fastchat_train_lora_deepspeed_command(tmp_path, tiny_llama):
    (tmp_path / "playground").mkdir()
    (tmp_path / "playground" / "deepspeed_config_s2.json").write_text(json.dumps(FASTCHAT_ZERO2))
    launch(["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "--module", "lmforge.lora",
            "--model_name_or_path", tiny_llama,
            "--data_path", str(DUMMY_CONVERSATIONS),
            "--bf16", "True",
            "--output_dir", "output_lora",
            "--num_train_epochs", "3",
            "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "8",
            "--learning_rate", "2e-5",
            "--model_max_length", "2048",
            "--deepspeed", "playground/deepspeed_config_s2.json",
            "--max_steps", "2", "--report_to", "none"], tmp_path)
    out = tmp_path / "output_lora"
    assert final_step(out) == 2
    assert (out / "adapter_model.safetensors").is_file()


HAPPY_LLM_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 100,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def happy_llm_flags(report_to: str) -> list[str]:
    return ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4", "--do_train",
            "--output_dir", "autodl-tmp/output/run", "--evaluation_strategy", "no", "--learning_rate", "1e-4",
            "--num_train_epochs", "1", "--warmup_steps", "200", "--logging_dir", "autodl-tmp/output/run/logs",
            "--logging_strategy", "steps", "--logging_steps", "5", "--save_strategy", "steps", "--save_steps", "100",
            "--preprocessing_num_workers", "10", "--save_total_limit", "1", "--seed", "12", "--block_size", "2048",
            "--bf16", "--gradient_checkpointing", "--deepspeed", "./ds_config_zero2.json", "--report_to", report_to]


@needs_deepspeed
def test_happy_llm_pretrain_command(tmp_path, small_tokenizer):
    (tmp_path / "ds_config_zero2.json").write_text(json.dumps(HAPPY_LLM_ZERO2))
    config = tmp_path / "qwen-tiny"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "qwen2",
                                                    "max_position_embeddings": 2048}))
    launch(["deepspeed", "--master_port", str(free_port()), "--module", "lmforge.pretrain",
            "--config_name", str(config), "--tokenizer_name", small_tokenizer,
            "--train_files", str(SHARED_DATA / "pretrain_text" / "tinyshakespeare.txt"),
            *happy_llm_flags("none"), "--max_steps", "2"], tmp_path)
    assert final_step(tmp_path / "autodl-tmp" / "output" / "run") == 2


def test_renamed_flags_keep_their_meaning(tmp_path, monkeypatch):
    from lmforge.config import TrainingArguments, parse, setup_process

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    (args,) = parse((TrainingArguments,), ["--output_dir", str(tmp_path), "--evaluation_strategy", "steps",
                                            "--warmup_ratio", "0.03", "--logging_dir", str(tmp_path / "logs")])
    assert args.eval_strategy == "steps" and args.warmup_steps == 0.03
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # parsing changes nothing outside the arguments
    setup_process(args)  # the run's explicit step after parsing
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")


def test_report_to_a_missing_tracker_is_a_clear_error(tmp_path, small_tokenizer, capsys):
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here")
    assert cli(["pretrain", "--config_name", "x", "--tokenizer_name", small_tokenizer, "--train_files", "x.txt",
                "--output_dir", str(tmp_path / "o"), "--report_to", "swanlab"]) == 2
    assert "--report_to swanlab needs the swanlab package: pip install swanlab" in capsys.readouterr().err


@needs_deepspeed
def test_happy_llm_finetune_command(tmp_path, tiny_llama):
    (tmp_path / "ds_config_zero2.json").write_text(json.dumps(HAPPY_LLM_ZERO2))
    data = tmp_path / "BelleGroup_sft.jsonl"
    records = json.loads(DUMMY_CONVERSATIONS.read_text())[:64]
    data.write_text("\n".join(json.dumps(r) for r in records))
    flags = happy_llm_flags("none")
    launch(["deepspeed", "--master_port", str(free_port()), "--module", "lmforge.sft", "--model_name_or_path", tiny_llama, "--train_files", str(data),
            *flags, "--max_steps", "2"], tmp_path)
    assert final_step(tmp_path / "autodl-tmp" / "output" / "run") == 2
