"""The bad-input catalogue.

Every kind of bad data and bad configuration is one row of CATALOGUE: how to make it, and the
exact error `lmforge <command>` must print. Each must stop with exit status 2 and one message
naming what is wrong and where (file, record or line, field, flag), never a traceback; a bad
record given `--on_bad_record skip` must instead be counted under its reason. Part 5: code
shipped with a model runs only under --trust_remote_code True, and the token cache is Arrow
and JSON only, rebuilt when tampered with.

Everything runs in-process through `lmforge.cli.main` (failing before any training where the
check allows); one test launches real processes for the exit status and a clean stderr.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest

from lmforge.cli import main as cli

from conftest import QWEN_TOKENIZER, ROOT

pytestmark = pytest.mark.e2e  # see the markers in pyproject.toml

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
SYSTEM = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
TINY_QWEN = {
    "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151936, "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
CHAT_FLAGS = ["--report_to", "none", "--disable_tqdm", "True", "--dataloader_pin_memory", "False"]
# A template written for models without a system role: it refuses one, as Gemma's and
# Mistral's templates do, through jinja's raise_exception.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('this template has no system role') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Bad:
    """One prepared bad input: the command line, and the error it must give."""

    argv: list[str]
    message: str
    exact: bool = True
    """False: `message` is the start of the error (the rest quotes a library's own words)."""
    after: Callable[[], None] | None = None
    """A check on what the failed command left behind."""


@dataclass
class Ctx:
    tmp: pathlib.Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def write(self, name: str, content: str | bytes | list) -> str:
        """A file under the test's directory: bytes as is, a list as JSON, text as UTF-8."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content) if isinstance(content, list) else content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, lines: list[str]) -> str:
        return self.write(name, "\n".join(lines) + "\n")

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def tiny_config(self) -> str:
        return self.write("tiny_config.json", json.dumps(TINY_QWEN))


def prepare(*flags: str) -> list[str]:
    return ["prepare", "--tokenizer_name", str(QWEN_TOKENIZER), *flags]


def sft(ctx: Ctx, *flags: str, data: list | None = None) -> list[str]:
    """`lmforge sft` on a tiny model built from a config, with good data unless `flags` say
    otherwise (a later flag overrides an earlier one)."""
    good = ctx.write("good.json", data or [GOOD, GOOD])
    return ["sft", "--config_name", ctx.tiny_config(), "--tokenizer_name", str(QWEN_TOKENIZER), "--data_path", good,
            "--output_dir", str(ctx.tmp / "out"), "--max_steps", "1", "--save_strategy", "no", *CHAT_FLAGS, *flags]


def pretrain(ctx: Ctx, train_file: str, *flags: str) -> list[str]:
    return ["pretrain", "--config_name", ctx.tiny_config(), "--tokenizer_name", str(QWEN_TOKENIZER),
            "--train_files", train_file, "--output_dir", str(ctx.tmp / "out"), *CHAT_FLAGS, *flags]


def with_bad_record(ctx: Ctx, bad: dict, first: dict = GOOD) -> str:
    """A JSON list of a good record then the bad one: the bad one is `record 2`."""
    return ctx.write("data.json", [first, bad])


def user_assistant(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# ---------------------------------------------------------------------------------------------
# The catalogue. Rows with a skip reason are bad records: under --on_bad_record skip they are
# counted under that reason (test_bad_record_is_counted_when_skipping).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[Ctx], Bad]
    skip_reason: str | None = None


def _malformed_jsonl(ctx: Ctx) -> Bad:
    p = ctx.jsonl("data.jsonl", [json.dumps(GOOD), '{"messages": [', json.dumps(GOOD)])
    return Bad(prepare("--data_path", p), f"{p}, line 2: malformed JSON: Expecting value (column 15)")


def _malformed_json(ctx: Ctx) -> Bad:
    p = ctx.write("data.json", '[\n {"messages": []},\n {"messages": ]\n]')
    return Bad(prepare("--data_path", p), f"{p}, line 3 column 15: malformed JSON: Expecting value")


def _latin1(ctx: Ctx) -> Bad:
    accented = json.dumps(user_assistant(("user", "café"), ("assistant", "ok")), ensure_ascii=False)
    raw = (json.dumps(GOOD) + "\n" + accented).encode("latin-1")
    p = ctx.write("data.jsonl", raw)
    e_acute = raw.index("é".encode("latin-1"))
    return Bad(prepare("--data_path", p), f"{p}, line 2: not valid UTF-8 (byte {e_acute}: invalid continuation byte)")


def _utf16(ctx: Ctx) -> Bad:
    p = ctx.write("data.json", json.dumps([GOOD]).encode("utf-16"))
    return Bad(prepare("--data_path", p), f"{p}: is UTF-16-encoded (it starts with a UTF-16 byte-order mark); "
                                          "lmforge reads UTF-8: convert the file to UTF-8")


def _empty_file(ctx: Ctx) -> Bad:
    p = ctx.write("data.jsonl", "\n  \n")
    return Bad(prepare("--data_path", p), f"{p}: file is empty")


def _empty_list(ctx: Ctx) -> Bad:
    p = ctx.write("data.json", "[]")
    return Bad(prepare("--data_path", p), f"{p}: the JSON list holds no records")


def _not_a_list(ctx: Ctx) -> Bad:
    p = ctx.write("data.json", '"hello"')
    return Bad(prepare("--data_path", p), f"{p}: expected a JSON list of records, got str")


def _record_not_an_object(ctx: Ctx) -> Bad:
    p = ctx.jsonl("data.jsonl", [json.dumps(GOOD), "[1, 2]"])
    return Bad(prepare("--data_path", p), f"{p}, line 2: a record must be a JSON object, got list")


FORMAT_HINT = ("expected 'conversations' (ShareGPT), 'messages' (OpenAI) or 'instruction'/'output' (Alpaca); "
               "or pass --data_format")


def _unknown_format(ctx: Ctx) -> Bad:
    p = ctx.write("data.json", [{"prompt": "q", "completion": "a"}, GOOD])
    return Bad(prepare("--data_path", p), f"{p}, record 1: cannot tell the format from the keys ['completion', "
                                          f"'prompt']: {FORMAT_HINT}")


def _mixed_formats(ctx: Ctx) -> Bad:
    p = with_bad_record(ctx, {"instruction": "q", "output": "a"})
    return Bad(prepare("--data_path", p),
               f"{p}, record 2: field 'messages' is missing (keys: ['instruction', 'output'])")


def _unknown_role(ctx: Ctx) -> Bad:
    p = with_bad_record(ctx, user_assistant(("user", "q"), ("bot", "a")))
    return Bad(prepare("--data_path", p),
               f"{p}, record 2: messages[1] has unknown role 'bot'; known roles: "
               "['assistant', 'developer', 'ipython', 'system', 'tool', 'user']")


def _roles_out_of_order(ctx: Ctx) -> Bad:
    p = with_bad_record(ctx, user_assistant(("user", "q"), ("tool", "42"), ("assistant", "a")))
    return Bad(prepare("--data_path", p), f"{p}, record 2: turn 1 is a tool result that follows no assistant tool call")


def _empty_content(ctx: Ctx) -> Bad:
    p = with_bad_record(ctx, user_assistant(("user", "q"), ("assistant", "  \n")))
    return Bad(prepare("--data_path", p), f"{p}, record 2: turn 1 (assistant) is empty")


def _non_string_content(ctx: Ctx) -> Bad:
    # A number where text (or OpenAI's list of content parts) belongs.
    p = with_bad_record(ctx, user_assistant(("user", 42), ("assistant", "a")))
    return Bad(prepare("--data_path", p),
               f"{p}, record 2: messages[0].content must be a string or a list of content parts, got int")


def _missing_field(ctx: Ctx) -> Bad:
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    p = with_bad_record(ctx, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, first=sharegpt)
    return Bad(prepare("--data_path", p), f"{p}, record 2: conversations[1] has no 'value'")


def _malformed_history(ctx: Ctx) -> Bad:
    alpaca = {"instruction": "q", "output": "a"}
    p = with_bad_record(ctx, {"instruction": "q", "output": "a", "history": [["only a question"]]}, first=alpaca)
    return Bad(prepare("--data_path", p), f"{p}, record 2: history[0] must be a [question, answer] pair")


def _no_assistant_turn(ctx: Ctx) -> Bad:
    p = with_bad_record(ctx, user_assistant(("system", "s"), ("user", "q")))
    return Bad(prepare("--data_path", p), f"{p}, record 2: the conversation has no assistant turn to train on")


def _all_too_long(ctx: Ctx) -> Bad:
    tokenizer = ctx.fixture("qwen_tokenizer")
    n = len(tokenizer.apply_chat_template(GOOD["messages"], tokenize=True)["input_ids"])
    p = ctx.write("data.json", [GOOD, GOOD])
    return Bad(prepare("--data_path", p, "--model_max_length", "8", "--long_records", "drop"),
               f"no usable record in {p}:\nrecords: 2  kept: 0  truncated: 0\ntokens: 0  trained tokens: 0\n"
               f"skipped: 2\n  too_long: 2  (e.g. {p}, record 1: {n} tokens, longer than model_max_length=8)")


def _template_cannot_render(ctx: Ctx) -> Bad:
    p = with_bad_record(ctx, SYSTEM)
    tok = ctx.fixture("tokenizer_dirs")(NO_SYSTEM_TEMPLATE)
    return Bad(["prepare", "--tokenizer_name", tok, "--data_path", p],
               f"{p}, record 2: the chat template does not take a system message (it raises: this template has no "
               "system role); pass --unrendered drop to train without it")


def _no_chat_template(ctx: Ctx) -> Bad:
    tok = ctx.fixture("tokenizer_dirs")(None)
    return Bad(["prepare", "--tokenizer_name", tok, "--data_path", ctx.write("data.json", [GOOD])],
               f"{tok}: the tokenizer has no chat template; pass --template with one of "
               "['chatml', 'chatml_user', 'vicuna_v1.1'] (or use a tokenizer that ships one)")


def _unknown_template(ctx: Ctx) -> Bad:
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--template", "llama9"),
               "unknown --template 'llama9'; choose 'auto' or one of ['chatml', 'chatml_user', 'vicuna_v1.1']")


def _data_path_missing(ctx: Ctx) -> Bad:
    p = str(ctx.tmp / "nope.json")
    return Bad(prepare("--data_path", p), f"{p}: file does not exist")


def _data_path_is_directory(ctx: Ctx) -> Bad:
    return Bad(prepare("--data_path", str(ctx.tmp)),
               f"{ctx.tmp}: is a directory, expected a .json, .jsonl, .parquet file")


def _unsupported_file_type(ctx: Ctx) -> Bad:
    p = ctx.write("data.csv", "instruction,output\nq,a\n")
    return Bad(prepare("--data_path", p),
               f"{p}: unsupported file type '.csv'; use one of ('.json', '.jsonl', '.parquet')")


def _corrupt_parquet(ctx: Ctx) -> Bad:
    p = ctx.write("data.parquet", b"PAR1 this is not parquet")
    return Bad(prepare("--data_path", p), f"{p}: not a readable Parquet file: ", exact=False)


def _parquet(ctx: Ctx, rows: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = str(ctx.tmp / "data.parquet")
    pq.write_table(pa.table(rows), p)
    return p


def _parquet_wrong_columns(ctx: Ctx) -> Bad:
    p = _parquet(ctx, {"question": ["q"], "answer": ["a"]})
    return Bad(prepare("--data_path", p),
               f"{p}, record 1: cannot tell the format from the keys ['answer', 'question']: {FORMAT_HINT}")


def _eval_file_bad(ctx: Ctx) -> Bad:
    e = ctx.jsonl("eval.jsonl", [json.dumps(GOOD), "{oops"])
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--eval_data_path", e),
               f"{e}, line 2: malformed JSON: Expecting property name enclosed in double quotes (column 2)")


def _unknown_data_format(ctx: Ctx) -> Bad:
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--data_format", "xml"),
               "argument --data_format/--data-format: invalid choice: 'xml' "
               "(choose from 'auto', 'sharegpt', 'openai', 'alpaca')")


def _tools_file_not_a_list(ctx: Ctx) -> Bad:
    tools = ctx.write("tools.json", json.dumps({"name": "get_weather"}))
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--tools", tools),
               f"{tools}: --tools: the file must be a list of tool schemas (objects)")


def _block_size_and_max_length_differ(ctx: Ctx) -> Bad:
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--block_size", "512", "--model_max_length",
                       "1024"), "--block_size 512 and --model_max_length 1024: two names of one setting (happy-llm's "
                                "and FastChat's); pass one of them")


def _max_length_zero(ctx: Ctx) -> Bad:
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--model_max_length", "0"),
               "--model_max_length must be at least 1, got 0")


def _no_tokenizer(ctx: Ctx) -> Bad:
    return Bad(["prepare", "--data_path", ctx.write("data.json", [GOOD])],
               "no tokenizer: pass --tokenizer_name (required with --config_name) or --model_name_or_path")


def _tokenizer_path_missing(ctx: Ctx) -> Bad:
    p = str(ctx.tmp / "no-tokenizer")
    return Bad(["prepare", "--tokenizer_name", p, "--data_path", ctx.write("data.json", [GOOD])],
               f"--tokenizer_name {p}: no such file or directory (lmforge loads models from local paths only)")


def _run_file_not_yaml(ctx: Ctx) -> Bad:
    p = ctx.write("run.yaml", "data_path: [a.json\n  model_max_length: : 4\n")
    return Bad(["prepare", p], f"{p}, line 2 column 19: not valid YAML: expected ',' or ']', but got ':'")


def _run_file_not_a_mapping(ctx: Ctx) -> Bad:
    p = ctx.write("run.yaml", "- --data_path\n- a.json\n")
    return Bad(["prepare", p], f"{p}: a run file must map flag names to values")


def _cache_disk_full(ctx: Ctx) -> Bad:
    from lmforge.data import store as cache

    real_flush = cache.RowWriter.flush

    def flush_then_disk_full(self):
        real_flush(self)  # some bytes reach the file, as on a real full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(cache.RowWriter, "flush", flush_then_disk_full)
    root = ctx.tmp / "cache"

    def nothing_kept() -> None:
        assert os.listdir(root / "sft") == []  # no entry, no temporary directory

    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--data_cache_dir", str(root)),
               f"cannot write the token cache under {root / 'sft'}: no space left on device; nothing was kept. "
               "Free space, or point --data_cache_dir (or $LMFORGE_CACHE) at a larger disk", after=nothing_kept)


def _dump_dir_missing(ctx: Ctx) -> Bad:
    dump = ctx.tmp / "no-such-dir" / "dump.jsonl"
    return Bad(prepare("--data_path", ctx.write("data.json", [GOOD]), "--dump", str(dump)),
               f"--dump {dump}: cannot write it: No such file or directory")


def _final_save_disk_full(ctx: Ctx) -> Bad:
    import transformers.modeling_utils

    def half_written_then_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    ctx.monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_written_then_full)
    out = ctx.tmp / "out"

    def nothing_half_written() -> None:
        # The final save is staged and moved in only when whole: no model file, no staging
        # directory, and no trainer_state.json saying the run is done.
        assert not (out / "model.safetensors").exists()
        assert not (out / ".lmforge-final").exists()
        assert not (out / "trainer_state.json").exists()

    return Bad(sft(ctx), f"no space left on the disk of {out} while writing "
                         f"{out / '.lmforge-final' / 'model.safetensors'} (", exact=False, after=nothing_half_written)


def _checkpoint_disk_full(ctx: Ctx) -> Bad:
    """What a full disk looks like inside a checkpoint: torch.save's zip writer fails with a
    RuntimeError that carries no errno (measured on a full tmpfs); the free space tells."""
    import shutil

    import torch

    def zip_writer_fails(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3712 vs 3604")

    out = ctx.tmp / "out"
    ctx.monkeypatch.setattr(torch, "save", zip_writer_fails)
    real = shutil.disk_usage
    ctx.monkeypatch.setattr("lmforge.training.save.shutil.disk_usage",
                            lambda path: real(path)._replace(free=12288) if str(path) == str(out) else real(path))

    def no_checkpoint() -> None:
        assert not list(out.glob("checkpoint-*"))

    return Bad(sft(ctx, "--save_strategy", "steps", "--save_steps", "1"),
               f"no space left on the disk of {out} while writing checkpoint-1 (0.0 MiB free); nothing half-written "
               "is used (a checkpoint is complete or absent). Free space or point --output_dir at a larger disk, then "
               "run the same command again to resume", after=no_checkpoint)


def _model_path_missing(ctx: Ctx) -> Bad:
    argv = sft(ctx)
    p = str(ctx.tmp / "no-model")
    argv[argv.index("--config_name"):argv.index("--config_name") + 2] = ["--model_name_or_path", p]
    return Bad(argv,
               f"--model_name_or_path {p}: no such file or directory (lmforge loads models from local paths only)")


def _model_config_not_json(ctx: Ctx) -> Bad:
    model = ctx.tmp / "model"
    config = ctx.write("model/config.json", '{"model_type": "qwen2",\n "hidden_size": }')
    argv = sft(ctx)
    argv[argv.index("--config_name"):argv.index("--config_name") + 2] = ["--model_name_or_path", str(model)]
    return Bad(argv, f"--model_name_or_path {config}: not valid JSON: Expecting value at line 2 column 17")


def custom_code_model(directory: pathlib.Path, marker: pathlib.Path) -> None:
    """A model directory whose config.json maps AutoConfig to Python shipped beside it; that
    code writes `marker` when it is imported."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "lmforge_test_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (directory / "configuration_custom.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the model directory ran code')\n"
        "from transformers import PreTrainedConfig\n\n\n"
        "class CustomConfig(PreTrainedConfig):\n"
        "    model_type = 'lmforge_test_custom'\n")


def _remote_code(ctx: Ctx) -> Bad:
    model, marker = ctx.tmp / "custom", ctx.tmp / "code_ran"
    custom_code_model(model, marker)
    argv = sft(ctx)
    argv[argv.index("--config_name"):argv.index("--config_name") + 2] = ["--model_name_or_path", str(model)]

    def no_code_ran() -> None:
        assert not marker.exists()

    return Bad(argv, f"--model_name_or_path {model}: the model config needs Python code shipped with the model "
                     "(config.json: AutoConfig -> configuration_custom.CustomConfig); lmforge runs no code from a "
                     "model directory unless you pass --trust_remote_code True", after=no_code_ran)


def _output_dir_is_file(ctx: Ctx) -> Bad:
    out = ctx.write("out", "a file")
    return Bad(sft(ctx, "--output_dir", out), f"--output_dir {out} is a file, not a directory")


def _output_dir_foreign(ctx: Ctx) -> Bad:
    ctx.write("out/notes.txt", "mine")
    out = ctx.tmp / "out"
    return Bad(sft(ctx), f"--output_dir {out} is not empty and holds no complete checkpoint to resume from; pass "
                         "--overwrite_output_dir True to train into it anyway, or choose another directory")


def _output_dir_not_given(ctx: Ctx) -> Bad:
    argv = sft(ctx)
    del argv[argv.index("--output_dir"):argv.index("--output_dir") + 2]
    return Bad(argv, "--output_dir is required: the directory checkpoints and the trained model go to")


def _unknown_flag(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--no_such_flag", "1"), "unknown arguments: --no_such_flag 1")


def _fsdp_with_deepspeed(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--fsdp", "full_shard", "--deepspeed", "zero2"),
               "--fsdp and --deepspeed are two ways to shard a model; pass one of them")


def _qlora_zero3_offload(ctx: Ctx) -> Bad:
    from lmforge.config import SHIPPED_CONFIGS

    ds = os.path.join(SHIPPED_CONFIGS, "ds_zero3_offload.json")
    return Bad(sft(ctx, "--q_lora", "True", "--deepspeed", "zero3_offload"),
               f"--q_lora cannot run under --deepspeed {ds} (ZeRO stage 3 with CPU offload): QLoRA keeps the 4-bit "
               "base model whole on every GPU, ZeRO-3 partitions parameters; use --deepspeed zero2 or zero2_offload")


def _qlora_fsdp(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--q_lora", "True", "--fsdp", "full_shard auto_wrap"),
               "--q_lora cannot run under --fsdp: lmforge's QLoRA keeps the 4-bit base model whole on every GPU. "
               "Supported: QLoRA on one GPU, on several GPUs with DDP (torchrun, no --fsdp / --deepspeed), or with "
               "--deepspeed zero2 / zero2_offload; for a model too large for one GPU use --lora True (bf16 base) "
               "with --fsdp or --deepspeed zero3")


def _fsdp1_option(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--fsdp", "hybrid_shard auto_wrap"),
               "--fsdp 'hybrid_shard auto_wrap': 'hybrid_shard' is not an FSDP2 option; lmforge runs FSDP2, which "
               "takes full_shard, shard_grad_op, offload, auto_wrap")


def _fsdp_layer_class_missing(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"),
               "--fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer: the model (Qwen2ForCausalLM) has no "
               "LlamaDecoderLayer; its decoder layer class is Qwen2DecoderLayer. Leave the flag out to use it")


def _deepspeed_config_missing(ctx: Ctx) -> Bad:
    p = str(ctx.tmp / "ds.json")
    return Bad(sft(ctx, "--deepspeed", p),
               f"--deepspeed {p}: no such file (shipped: zero2, zero2_offload, zero3, zero3_offload)")


def _deepspeed_config_not_json(ctx: Ctx) -> Bad:
    p = ctx.write("ds.json", '{"zero_optimization": {"stage": 2,}}')
    return Bad(sft(ctx, "--deepspeed", p),
               f"--deepspeed {p}: not valid JSON: Expecting property name enclosed in double quotes at line 1 "
               "column 35")


def _bf16_and_fp16(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--bf16", "True", "--fp16", "True"), "At most one of fp16 and bf16 can be True, but not both")


def _eval_without_eval_data(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--eval_strategy", "steps", "--eval_steps", "1"),
               "--eval_strategy steps needs held-out data: pass --eval_data_path or --val_split (or --eval_strategy no)")


def _lora_target_typo(ctx: Ctx) -> Bad:
    base = ctx.fixture("base_model")
    argv = ["lora", "--model_name_or_path", base, "--data_path", ctx.write("data.json", [GOOD]), "--output_dir",
            str(ctx.tmp / "out"), "--max_steps", "1", *CHAT_FLAGS, "--lora_target_modules", "q_proj,qproj"]
    return Bad(argv, "--lora_target_modules: the model has no module named 'qproj'; its layer names are act_fn, "
                     "down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, lm_head, norm, o_proj, "
                     "post_attention_layernorm, q_proj, rotary_emb, up_proj, v_proj")


def _lora_without_weights(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--lora", "True"),
               "--lora needs a base model with weights (--model_name_or_path); a model built from --config_name has "
               "random weights that an adapter cannot be saved against")


def _lora_rank_zero(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--lora", "True", "--lora_r", "0"), "--lora_r must be a positive integer, got 0")


def _lora_bias_unknown(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--lora", "True", "--lora_bias", "some"),
               "argument --lora_bias/--lora-bias: invalid choice: 'some' (choose from 'none', 'all', 'lora_only')")


def _pretrain_text_empty(ctx: Ctx) -> Bad:
    p = ctx.write("corpus.txt", "\n\n   \n")
    return Bad(pretrain(ctx, p), f"{p}: file is empty")


def _pretrain_wrong_text_field(ctx: Ctx) -> Bad:
    p = ctx.jsonl("corpus.jsonl", [json.dumps({"text": "fine"}), json.dumps({"content": "the text is here"})])
    return Bad(pretrain(ctx, p), f"{p}, line 2: field 'text' is missing (keys: ['content']); see --text_field")


def _pretrain_parquet_wrong_columns(ctx: Ctx) -> Bad:
    p = _parquet(ctx, {"body": ["some text"], "url": ["https://example.com"]})
    return Bad(pretrain(ctx, p), f"{p}, record 1: field 'text' is missing (keys: ['body', 'url']); see --text_field")


def _block_size_over_corpus(ctx: Ctx) -> Bad:
    p = ctx.write("corpus.txt", "a few words")
    return Bad(pretrain(ctx, p, "--block_size", "4096"),
               f"{p}: 4 tokens in all, fewer than one block of --block_size 4096; lower --block_size or pass "
               "--remainder pad")


def _batch_size_zero(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--per_device_train_batch_size", "0"), "--per_device_train_batch_size must be at least 1, got 0")


def _accumulation_zero(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps must be at least 1, got 0")


def _negative_learning_rate(ctx: Ctx) -> Bad:
    # Written with a space: argparse alone takes "-1e-3" for a flag ("expected one argument").
    return Bad(sft(ctx, "--learning_rate", "-1e-3"), "--learning_rate must be positive, got -0.001")


def _negative_learning_rate_joined(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--learning_rate=-1e-3"), "--learning_rate must be positive, got -0.001")


def _max_steps_zero(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--max_steps", "0"), "--max_steps 0 trains nothing: pass a positive number of optimizer "
                                             "steps, or leave it out to train --num_train_epochs epochs")


def _epochs_zero(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--max_steps", "-1", "--num_train_epochs", "0"),
               "--num_train_epochs 0.0 trains nothing: pass a positive number of epochs (or --max_steps)")


def _output_dir_empty(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--output_dir", ""), "--output_dir is required: the directory checkpoints and the trained "
                                             "model go to")


def _output_dir_read_only(ctx: Ctx) -> Bad:
    # Tests may run as root, whom permissions do not stop: the check's answer is what is set here.
    out = ctx.tmp / "out"
    out.mkdir()
    ctx.monkeypatch.setattr("lmforge.recipe.os.access", lambda path, mode: path != str(out))
    return Bad(sft(ctx), f"--output_dir {out}: not writable by this user")


def _model_dir_without_weights(ctx: Ctx) -> Bad:
    model = ctx.tmp / "model"
    ctx.write("model/config.json", json.dumps(TINY_QWEN))
    argv = sft(ctx)
    argv[argv.index("--config_name") : argv.index("--config_name") + 2] = ["--model_name_or_path", str(model)]
    return Bad(argv, f"--model_name_or_path {model}: no weights there (no *.safetensors or pytorch_model*.bin); to "
                     f"train from random weights built from its config, pass --config_name {model}")


def _tokenizer_not_of_the_model(ctx: Ctx) -> Bad:
    import transformers

    model = str(ctx.tmp / "model")
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**TINY_QWEN, "vocab_size": 512})).save_pretrained(model)
    argv = sft(ctx)
    argv[argv.index("--config_name") : argv.index("--config_name") + 2] = ["--model_name_or_path", model]
    return Bad(argv, f"the tokenizer has 151,665 tokens, the model at {model} 512 embeddings: they do not belong "
                     "together (check --tokenizer_name). To add the missing rows (new, untrained embeddings), pass "
                     "--resize_token_embeddings True")


def _learning_rate_destroys_the_model(ctx: Ctx) -> Bad:
    return Bad(sft(ctx, "--learning_rate", "1e6", "--max_steps", "8", "--logging_steps", "1"),
               "the gradient norm has been 0 at steps 2, 3, 4 while the loss stays at ", exact=False)


CATALOGUE = [
    # Files and their encoding
    Kind("malformed JSONL line", _malformed_jsonl),
    Kind("malformed JSON", _malformed_json),
    Kind("latin-1 bytes", _latin1),
    Kind("UTF-16 file", _utf16),
    Kind("empty file", _empty_file),
    Kind("empty JSON list", _empty_list),
    Kind("JSON that is not a list", _not_a_list),
    Kind("data path missing", _data_path_missing),
    Kind("data path is a directory", _data_path_is_directory),
    Kind("unsupported file type", _unsupported_file_type),
    Kind("corrupt parquet", _corrupt_parquet),
    Kind("parquet with wrong columns", _parquet_wrong_columns),
    Kind("eval file bad", _eval_file_bad),
    # Records
    Kind("record not an object", _record_not_an_object, "not_an_object"),
    Kind("unknown record format", _unknown_format, "unknown_format"),
    Kind("formats mixed in one file", _mixed_formats, "missing_field"),
    Kind("unknown role", _unknown_role, "unknown_role"),
    Kind("roles out of order", _roles_out_of_order, "roles_out_of_order"),
    Kind("empty content", _empty_content, "empty_content"),
    Kind("non-string content", _non_string_content, "non_string_content"),
    Kind("missing field", _missing_field, "missing_field"),
    Kind("malformed alpaca history", _malformed_history, "malformed_turn"),
    Kind("no assistant turn", _no_assistant_turn, "no_assistant_turn"),
    Kind("template cannot render the roles", _template_cannot_render, "unrendered_system"),
    Kind("all records longer than the max length", _all_too_long),
    # Tokenizer, template, data flags
    Kind("tokenizer without chat template", _no_chat_template),
    Kind("unknown template", _unknown_template),
    Kind("no tokenizer", _no_tokenizer),
    Kind("tokenizer path missing", _tokenizer_path_missing),
    Kind("unknown --data_format", _unknown_data_format),
    Kind("--tools file that is not a list", _tools_file_not_a_list),
    Kind("--block_size and --model_max_length differ", _block_size_and_max_length_differ),
    Kind("--model_max_length 0", _max_length_zero),
    # Run files and model configs
    Kind("run file not YAML", _run_file_not_yaml),
    Kind("run file not a mapping", _run_file_not_a_mapping),
    Kind("model path missing", _model_path_missing),
    Kind("model config.json not JSON", _model_config_not_json),
    Kind("model asks to run its own code", _remote_code),
    # Output
    Kind("output dir is a file", _output_dir_is_file),
    Kind("output dir holds foreign files", _output_dir_foreign),
    Kind("output dir not given", _output_dir_not_given),
    Kind("full disk writing the token cache", _cache_disk_full),
    Kind("full disk saving the model", _final_save_disk_full),
    Kind("full disk writing a checkpoint", _checkpoint_disk_full),
    Kind("--dump into a missing directory", _dump_dir_missing),
    # Flags and their combinations
    Kind("unknown flag", _unknown_flag),
    Kind("--fsdp with --deepspeed", _fsdp_with_deepspeed),
    Kind("QLoRA with ZeRO-3 offload", _qlora_zero3_offload),
    Kind("QLoRA with FSDP", _qlora_fsdp),
    Kind("--fsdp with an FSDP1-only option", _fsdp1_option),
    Kind("--fsdp_transformer_layer_cls_to_wrap the model lacks", _fsdp_layer_class_missing),
    Kind("--deepspeed config missing", _deepspeed_config_missing),
    Kind("--deepspeed config not JSON", _deepspeed_config_not_json),
    Kind("--bf16 with --fp16", _bf16_and_fp16),
    Kind("eval strategy without eval data", _eval_without_eval_data),
    Kind("--lora_target_modules typo", _lora_target_typo),
    Kind("LoRA without base weights", _lora_without_weights),
    Kind("--lora_r 0", _lora_rank_zero),
    Kind("unknown --lora_bias", _lora_bias_unknown),
    # Pretraining text
    Kind("pretrain text file empty", _pretrain_text_empty),
    Kind("pretrain wrong text field", _pretrain_wrong_text_field),
    Kind("pretrain parquet without text column", _pretrain_parquet_wrong_columns),
    Kind("--block_size larger than the corpus", _block_size_over_corpus),
    # Values caught at parsing, and runs that would train nothing or a destroyed model
    Kind("--per_device_train_batch_size 0", _batch_size_zero),
    Kind("--gradient_accumulation_steps 0", _accumulation_zero),
    Kind("--learning_rate -1e-3", _negative_learning_rate),
    Kind("--learning_rate=-1e-3", _negative_learning_rate_joined),
    Kind("--max_steps 0", _max_steps_zero),
    Kind("--num_train_epochs 0", _epochs_zero),
    Kind("--output_dir empty", _output_dir_empty),
    Kind("output dir read-only", _output_dir_read_only),
    Kind("model directory without weights", _model_dir_without_weights),
    Kind("tokenizer of another model", _tokenizer_not_of_the_model),
    Kind("--learning_rate 1e6 destroys the model", _learning_rate_destroys_the_model),
]


def test_the_catalogue_holds_at_least_25_distinct_kinds():
    names = [k.name for k in CATALOGUE]
    assert len(set(names)) == len(names) >= 25


# ---------------------------------------------------------------------------------------------
# Fixtures the rows ask for by name (only the rows that need them pay for them)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> Callable[[str | None], str]:
    """The Qwen tokenizer saved with another chat template (None: without one), once per template."""
    from transformers import AutoTokenizer

    made: dict[str | None, str] = {}

    def get(template: str | None) -> str:
        if template not in made:
            tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
            tok.chat_template = template
            path = str(tmp_path_factory.mktemp("tokenizer"))
            tok.save_pretrained(path)
            made[template] = path
        return made[template]

    return get


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    """A tiny Qwen2 with weights on disk and the Qwen tokenizer beside them."""
    import torch
    import transformers

    path = str(tmp_path_factory.mktemp("base"))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_QWEN)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER)).save_pretrained(path)
    return path


def _repoint_closed_log_handlers() -> None:
    """Library loggers keep the sys.stderr of the moment they were set up (transformers also
    binds that stream's flush). Under pytest's capture that stream is closed after its test,
    and logging would then print a "--- Logging error ---" traceback into a later test's stderr."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if not isinstance(handler, logging.StreamHandler):
                continue
            if getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream(), which flushes the closed stream first
            flush = handler.__dict__.get("flush")
            if getattr(getattr(flush, "__self__", None), "closed", False):
                handler.flush = sys.stderr.flush


@pytest.fixture
def ctx(tmp_path, monkeypatch, request) -> Ctx:
    _repoint_closed_log_handlers()
    yield Ctx(tmp_path, monkeypatch, request)
    # A DeepSpeed config parsed in-process registers itself globally (transformers keeps a
    # reference to know whether ZeRO-3 is on); leave none behind for the next test.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def error_of(command: str, err: str) -> str:
    """The error `lmforge <command>` printed, after checking it printed exactly one and no traceback."""
    head = f"lmforge {command}: error: "
    assert "Traceback" not in err, err
    assert err.count(head) == 1, err
    return err[err.index(head) + len(head):].rstrip("\n")


# ---------------------------------------------------------------------------------------------
# The tests over the catalogue
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CATALOGUE, ids=[k.name for k in CATALOGUE])
def test_bad_input_is_named(kind: Kind, ctx: Ctx, capsys):
    bad = kind.make(ctx)
    code = cli(bad.argv)
    err = capsys.readouterr().err
    assert code == 2, err
    message = error_of(bad.argv[0], err)
    if bad.exact:
        assert message == bad.message
    else:
        assert message.startswith(bad.message) and len(message) > len(bad.message)
    if bad.after is not None:
        bad.after()


SKIPPABLE = [k for k in CATALOGUE if k.skip_reason]


@pytest.mark.parametrize("kind", SKIPPABLE, ids=[k.name for k in SKIPPABLE])
def test_bad_record_is_counted_when_skipping(kind: Kind, ctx: Ctx, capsys):
    bad = kind.make(ctx)
    assert cli([*bad.argv, "--on_bad_record", "skip"]) == 0
    out = capsys.readouterr().out
    # One good record kept, the bad one counted under its reason with the same text the error gives.
    assert "records: 2  kept: 1  truncated: 0" in out
    assert f"skipped: 1\n  {kind.skip_reason}: 1  (e.g. {bad.message})" in out


def test_a_real_process_exits_2_with_one_line_on_stderr(tmp_path):
    """The same error from `python -m lmforge`: status 2, that one line on stderr, no traceback
    (in-process, the tests above see the return value and the text, not the process)."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "prepare", "--tokenizer_name", str(QWEN_TOKENIZER),
                           "--data_path", str(data)], capture_output=True, text=True, env=env, timeout=120)
    assert (proc.returncode, proc.stderr) == (
        2, f"lmforge prepare: error: {data}, line 2: malformed JSON: Expecting property name enclosed in double "
           "quotes (column 2)\n"), proc.stdout


def test_modules_to_save_typo_is_refused():
    """PEFT ignores a --modules_to_save name that matches nothing: the run would train without
    the module the user asked for and save no copy of it."""
    import transformers

    from lmforge.errors import LmforgeError
    from lmforge.flags import LoraArguments
    from lmforge.modeling.load import apply_lora

    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**TINY_QWEN, "vocab_size": 64}))
    with pytest.raises(LmforgeError) as e:
        apply_lora(model, LoraArguments(lora=True, modules_to_save=["lm_head,embed_token"]))
    assert str(e.value).startswith("--modules_to_save: the model has no module named 'embed_token'; its layer names "
                                   "are act_fn, down_proj, embed_tokens, ")


# ---------------------------------------------------------------------------------------------
# Part 5: no code from data
# ---------------------------------------------------------------------------------------------


def test_model_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils

    from lmforge.errors import LmforgeError
    from lmforge.flags import ModelArguments
    from lmforge.modeling.load import load_config

    model, marker = tmp_path / "custom", tmp_path / "code_ran"
    custom_code_model(model, marker)
    with pytest.raises(LmforgeError, match=r"unless you pass --trust_remote_code True"):
        load_config(ModelArguments(model_name_or_path=str(model)))
    assert not marker.exists()

    # With the flag, transformers imports the directory's code (copied into a modules cache
    # kept inside this test's directory).
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    config = load_config(ModelArguments(model_name_or_path=str(model), trust_remote_code=True))
    assert type(config).__name__ == "CustomConfig"
    assert marker.read_text() == "the model directory ran code"


def test_trust_remote_code_is_off_unless_passed(tmp_path):
    from lmforge.config import TrainingArguments, parse
    from lmforge.flags import LoraArguments, ModelArguments

    model_args, *_ = parse((ModelArguments, LoraArguments, TrainingArguments), ["--output_dir", str(tmp_path)])
    assert model_args.trust_remote_code is False
    (on,) = parse((ModelArguments,), ["--trust_remote_code", "True"])
    assert on.trust_remote_code is True


class _Payload:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def built_entry(tmp_path, qwen_tokenizer):
    from lmforge.data.encode import CHAT
    from lmforge.data.encode import prepare as prepare_cache
    from lmforge.data.options import ChatOptions as PrepareOptions

    data = tmp_path / "data.json"
    data.write_text(json.dumps([GOOD, SYSTEM, GOOD]))

    def build():
        return prepare_cache(CHAT, [str(data)], qwen_tokenizer, PrepareOptions(), qwen_tokenizer.chat_template,
                             cache_dir=str(tmp_path / "cache"))

    return build


def test_cache_entry_is_arrow_and_json_only(built_entry):
    entry = built_entry()
    assert sorted(os.listdir(entry.path)) == ["entry.json", "stats.json", "tokens.arrow"]
    for name in ("entry.json", "stats.json"):
        assert isinstance(json.loads(pathlib.Path(entry.path, name).read_text()), dict)
    # An Arrow IPC stream opens with the 0xFFFFFFFF continuation marker; a pickle opens with 0x80.
    assert pathlib.Path(entry.path, "tokens.arrow").read_bytes()[:4] == b"\xff\xff\xff\xff"
    assert json.loads(pathlib.Path(entry.path, "entry.json").read_text())["rows"] == 3
    # Nothing in lmforge loads a pickle (or torch.load, which unpickles) from a file.
    loaders = re.compile(r"pickle\.loads?\(|import pickle|torch\.load\(|allow_pickle\s*=\s*True|import dill")
    sources = sorted((ROOT / "lmforge").rglob("*.py"))
    assert sources and not [str(p) for p in sources if loaders.search(p.read_text())]


TAMPERING = {
    # pyarrow's own words follow the parenthesis.
    "tokens.arrow replaced by a pickle": ("tokens.arrow", "pickle", "tokens.arrow is not an Arrow stream of token "
                                                                    "columns ("),
    "tokens.arrow replaced by another Arrow stream": (
        "tokens.arrow", "foreign", "tokens.arrow is not an Arrow stream of token columns (columns that are neither "
                                   "lists of int32 nor float64 (input_ids: string, labels: string))"),
    "tokens.arrow truncated": ("tokens.arrow", "truncate", "tokens.arrow holds"),
    "stats.json not JSON": ("stats.json", "garbage", "stats.json does not read as JSON"),
    "entry.json row count edited": ("entry.json", "rows", "tokens.arrow holds 3 rows, entry.json records 4"),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampered_cache_entry_is_rebuilt_without_running_it(name, built_entry, tmp_path, capsys):
    file, how, reason = TAMPERING[name]
    first = built_entry()
    rows = [list(r) for r in first.dataset()["input_ids"]]  # read now: the file is memory-mapped
    target = pathlib.Path(first.path, file)
    marker = tmp_path / "unpickled"
    if how == "pickle":
        payload = pickle.dumps(_Payload(str(marker)))
        target.write_bytes(payload + b"\0" * max(0, target.stat().st_size - len(payload)))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[:-40])
    elif how == "foreign":
        # Another Arrow stream, with entry.json edited to match its size and rows.
        import pyarrow as pa

        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(
                sink, pa.schema([("input_ids", pa.string()), ("labels", pa.string())])) as writer:
            writer.write_batch(pa.record_batch([["a", "b", "c"]] * 2, names=["input_ids", "labels"]))
        manifest = pathlib.Path(first.path, "entry.json")
        manifest.write_text(json.dumps({"rows": 3, "bytes": target.stat().st_size}))
    elif how == "garbage":
        target.write_text("{not json")
    else:
        target.write_text(json.dumps({**json.loads(target.read_text()), "rows": 4}))
    capsys.readouterr()

    again = built_entry()
    out = capsys.readouterr().out
    assert f"lmforge: the cache entry {first.path} is damaged ({reason}" in out and "rebuilding it" in out
    assert again.path == first.path and [list(r) for r in again.dataset()["input_ids"]] == rows
    assert not marker.exists()
