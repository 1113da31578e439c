"""Every shipped config parses into the arguments it is meant for."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.config import SHIPPED_CONFIGS, TrainingArguments, parse, shipped_deepspeed_config

DEEPSPEED = {"zero2": 2, "zero2_offload": 2, "zero3": 3, "zero3_offload": 3}


@pytest.mark.parametrize("name, stage", sorted(DEEPSPEED.items()))
def test_deepspeed_configs(name, stage):
    path = shipped_deepspeed_config(name)
    assert path == os.path.join(SHIPPED_CONFIGS, f"ds_{name}.json")
    config = json.load(open(path))
    assert config["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in config["zero_optimization"]) == name.endswith("offload")
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills in its own values
    assert shipped_deepspeed_config("my/own.json") == "my/own.json"


def test_fsdp_config_with_layer_class(tmp_path):
    (args,) = parse((TrainingArguments,), [
        "--output_dir", str(tmp_path), "--fsdp", "full_shard auto_wrap",
        "--fsdp_config", os.path.join(SHIPPED_CONFIGS, "fsdp_full_shard.json"),
        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"])
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_fsdp_with_deepspeed_is_refused(tmp_path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="--fsdp and --deepspeed"):
        parse((TrainingArguments,), ["--output_dir", str(tmp_path), "--fsdp", "full_shard",
                                     "--deepspeed", os.path.join(SHIPPED_CONFIGS, "ds_zero2.json")])


def test_report_to_defaults_to_tensorboard_only_when_installed(monkeypatch, tmp_path):
    import lmforge.config as config_mod
    from lmforge.config import TrainingArguments

    monkeypatch.setattr(config_mod, "_installed", lambda package: False)
    assert TrainingArguments(output_dir=str(tmp_path)).report_to == []
    monkeypatch.setattr(config_mod, "_installed", lambda package: package == "tensorboard")
    assert TrainingArguments(output_dir=str(tmp_path)).report_to == ["tensorboard"]
    assert TrainingArguments(output_dir=str(tmp_path), report_to="none").report_to == []
    # several backends, comma-separated; a missing package is named
    with pytest.raises(config_mod.LmforgeError, match="--report_to wandb needs the wandb package"):
        TrainingArguments(output_dir=str(tmp_path), report_to="tensorboard,wandb")


@pytest.mark.parametrize("flags, message", [
    ({"compile_memory_budget": 0.0}, r"--compile_memory_budget must be in \(0, 1\], got 0.0"),
    ({"compile_memory_budget": 1.5}, r"--compile_memory_budget must be in \(0, 1\], got 1.5"),
    ({"eval_samples": -1}, r"--eval_samples must be ≥ 0 and --eval_sample_tokens ≥ 1, got -1 and 64"),
    ({"eval_sample_tokens": 0}, r"--eval_samples must be ≥ 0 and --eval_sample_tokens ≥ 1, got 0 and 0"),
])
def test_new_training_flags_are_checked(tmp_path, flags, message):
    from lmforge.config import LmforgeError

    with pytest.raises(LmforgeError, match=message):
        TrainingArguments(output_dir=str(tmp_path), **flags)
