"""Typed configuration: model, data and training arguments, parsed from flags and YAML.

Parsing only parses: values are read, checked and completed here, and nothing outside the
returned objects changes. What a run does to its process (environment variables, the
accelerator's settings, the notes a user should see about the machine) is `setup_process`,
one explicit step the methods take after parsing.

Flag names follow FastChat's and happy-llm's scripts (`--model_name_or_path`, `--data_path`,
`--model_max_length`, `--lazy_preprocess`, every `TrainingArguments` flag), so their command
lines run with `lmforge sft` in place of the script.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import transformers

from lmforge.data.options import (
    DEFAULT_MAX_LENGTH,
    DataFormat,
    LongRecords,
    MaskingStrategy,
    OnBadRecord,
    PreferenceFormat,
    ReasoningTurns,
    Remainder,
    TextSplit,
    Unrendered,
)
from lmforge.errors import LmforgeError


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Directory of a model to start from (weights are loaded)."}
    )
    config_name: Optional[str] = field(
        default=None,
        metadata={"help": "A model config (directory or JSON file): the model is built from it with random "
                          "weights, i.e. trained from scratch."},
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer directory; defaults to --model_name_or_path."}
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype the weights are held in while training: float32 (with --bf16, bf16 autocast over "
                          "fp32 weights), bfloat16 (with --bf16, AdamW over fp32 master copies), float16 or auto (as "
                          "stored). Default: bfloat16 under --bf16 on a CUDA GPU without DeepSpeed / FSDP (the "
                          "fastest measured), else float32.",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "Attention kernel: auto (varlen on a CUDA GPU, else sdpa), or one passed to transformers: "
                          "sdpa, eager, flash_attention_2, flex_attention; "
                          "or varlen, lmforge's call of PyTorch's built-in variable-length flash kernel (CUDA): "
                          "packed documents with no mask to build."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model/tokenizer code from the model directory to run. Off by default."}
    )
    resize_token_embeddings: bool = field(
        default=False,
        metadata={"help": "Grow the model's embedding (and head) to a tokenizer with more tokens than it has rows; "
                          "the new rows start untrained. Off: such a pair is refused as a mismatch."},
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Accepted for FastChat compatibility: the transformers cache directory."}
    )


@dataclass
class DataArguments:
    data_path: list[str] = field(
        default_factory=list, metadata={"help": "Training data: one or more .json / .jsonl / .parquet files."}
    )
    eval_data_path: list[str] = field(
        default_factory=list, metadata={"help": "Held-out data evaluated at --eval_steps (same formats)."}
    )
    val_split: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training records (e.g. 0.05) as evaluation data, drawn "
                          "by --seed (the same records on every rank and on resume); instead of --eval_data_path."},
    )
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "happy-llm's name for --data_path (its finetune.py)."}
    )
    block_size: Optional[int] = field(
        default=None, metadata={"help": "happy-llm's finetune.py name for --model_max_length (pass one of them)."}
    )
    data_format: DataFormat = field(
        default=DataFormat.AUTO,
        metadata={"help": "sharegpt (conversations/from/value), openai (messages/role/content), alpaca "
                          "(instruction/input/output), or auto: detected from the first record."},
    )
    template: str = field(
        default="auto",
        metadata={"help": "Chat template: auto (the tokenizer's own jinja template) or a built-in: "
                          "vicuna_v1.1, chatml (happy-llm), chatml_user."},
    )
    masking: MaskingStrategy = field(
        default=MaskingStrategy.ASSISTANT,
        metadata={"help": "Tokens that carry loss: assistant (every assistant turn), last_assistant, all."},
    )
    unrendered: Unrendered = field(
        default=Unrendered.ERROR,
        metadata={"help": "A part of a record the chat template does not render (a system message Gemma-2 "
                          "refuses or Mistral v0.3 leaves out, reasoning, tools): error (stop, naming the record) "
                          "or drop (train without it, counted)."},
    )
    tools: Optional[str] = field(
        default=None,
        metadata={"help": "A JSON file with a list of tool schemas, offered to every record that has no `tools` "
                          "of its own (as apply_chat_template's tools=)."},
    )
    reasoning_turns: ReasoningTurns = field(
        default=ReasoningTurns.RENDERED,
        metadata={"help": "rendered: one sample per conversation, each assistant turn as the whole conversation "
                          "renders it (reasoning templates drop earlier turns' thinking); split: one sample per "
                          "assistant turn, rendered as the last, so every turn's thinking is trained; generated: "
                          "as split, and a turn whose thinking the template drops even as the last (DeepSeek-R1-"
                          "Distill's) is written as the model generates it: the generation prompt, then "
                          "<think>, the reasoning, </think>, the answer and the end-of-turn token."},
    )
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "Longest sequence in tokens (default 2048); longer records follow "
                                        "--long_records."}
    )
    long_records: LongRecords = field(
        default=LongRecords.TRUNCATE,
        metadata={"help": "Records longer than --model_max_length: truncate (keep the start) or drop. "
                          "Both are counted and reported."},
    )
    on_bad_record: OnBadRecord = field(
        default=OnBadRecord.ERROR,
        metadata={"help": "error: stop at the first bad record, naming it; skip: leave bad records out, "
                          "counted by reason in the report."},
    )
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Token cache root (default: $LMFORGE_CACHE or ~/.cache/lmforge)."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes that tokenize the data into the cache (default: one per 4 MiB "
                                        "of data, at most the cores this process may use; the cache is the same "
                                        "whatever the count)."}
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "Accepted for FastChat compatibility. lmforge always tokenizes once into a "
                          "memory-mapped cache, which is both lazy in memory and fast."},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Pack whole records into rows of --model_max_length tokens (best-fit decreasing), "
                          "each record with its own positions and attention; same loss as unpacked, far "
                          "less padding. False: one record per row, padded to the longest in the batch."},
    )

    def __post_init__(self):
        self.data_path = list(self.data_path) + [p for p in self.train_files if p not in self.data_path]
        if None not in (self.block_size, self.model_max_length) and self.block_size != self.model_max_length:
            raise LmforgeError(f"--block_size {self.block_size} and --model_max_length {self.model_max_length}: "
                               "two names of one setting (happy-llm's and FastChat's); pass one of them")
        given = self.model_max_length if self.model_max_length is not None else self.block_size
        self.model_max_length = DEFAULT_MAX_LENGTH if given is None else given
        # A length below 1 would truncate every record to nothing and end in "no usable record",
        # which hides the cause.
        if self.model_max_length < 1:
            raise LmforgeError(f"--model_max_length must be at least 1, got {self.model_max_length}")
        check_val_split(self.val_split, self.eval_data_path, "--eval_data_path")


def check_val_split(fraction: float, held_out: list[str], flag: str) -> None:
    if not 0 <= fraction < 1:
        raise LmforgeError(f"--val_split must be a fraction in [0, 1), got {fraction}")
    if fraction and held_out:
        raise LmforgeError(f"--val_split and {flag} both name evaluation data; pass one of them")


@dataclass
class PreferenceDataArguments(DataArguments):
    """`lmforge dpo`'s data flags: SFT's, with the preference formats; every pair is scored on its
    last answer only (no --masking); a batch's pairs are padded rows, or with --packing one row."""

    data_format: PreferenceFormat = field(
        default=PreferenceFormat.AUTO,
        metadata={"help": "prompt (prompt or question + chosen + rejected strings), sharegpt (conversations + "
                          "chosen / rejected turns), openai (chosen / rejected message lists sharing a prefix, or "
                          "prompt messages + chosen / rejected), or auto: detected from the first record."},
    )
    masking: MaskingStrategy = field(
        default=MaskingStrategy.LAST_ASSISTANT,
        metadata={"help": "DPO scores each side's last answer (and its end-of-turn token) only: last_assistant."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "The sides of a batch's pairs one after another in one row, each in its own attention "
                          "(padding-free; varlen on a CUDA GPU, a per-document mask otherwise). False: 2B rows padded "
                          "to the longest side. Either way both sides are scored in one forward pass."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.data_format = PreferenceFormat(self.data_format)
        if MaskingStrategy(self.masking) != MaskingStrategy.LAST_ASSISTANT:
            raise LmforgeError(f"--masking {MaskingStrategy(self.masking).value}: DPO scores the last answer of each "
                               "side only (last_assistant)")
        if ReasoningTurns(self.reasoning_turns) != ReasoningTurns.RENDERED:
            raise LmforgeError(f"--reasoning_turns {ReasoningTurns(self.reasoning_turns).value} is not available for "
                               "DPO: a pair scores its last answer")


class DpoLoss(str, enum.Enum):
    """How the difference of the chosen and rejected log-ratios becomes a loss."""

    SIGMOID = "sigmoid"
    """DPO: -log sigmoid(beta * margin) (with --label_smoothing, the conservative variant)."""
    IPO = "ipo"
    """IPO: (margin - 1 / (2 beta))^2, the log-ratios averaged over each answer's tokens."""
    HINGE = "hinge"
    """SLiC's hinge: max(0, 1 - beta * margin)."""


@dataclass
class DpoArguments:
    beta: float = field(
        default=0.1,
        metadata={"help": "How far the policy may move from the reference: the scale of the log-ratio margin (the "
                          "KL penalty's strength). Larger stays closer to the reference."},
    )
    loss_type: DpoLoss = field(
        default=DpoLoss.SIGMOID, metadata={"help": "sigmoid (DPO), ipo or hinge."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "sigmoid loss only: the assumed probability that a pair's preference label is flipped "
                          "(conservative DPO); 0 trusts every label."},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "Add this times the chosen answers' negative log-likelihood (per token) to the loss, "
                          "which keeps the chosen answers likely; 0: DPO alone."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference model's log-probabilities of every pair in one pass before "
                          "training and store them in the token cache (keyed by the data and the model's weights); "
                          "training then needs no reference forward pass, and full fine-tuning no frozen copy."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn off the model's dropout (not LoRA's), so that the policy and the reference score "
                          "the same answers alike before training."},
    )

    def __post_init__(self):
        self.loss_type = DpoLoss(self.loss_type)
        if self.beta <= 0:
            raise LmforgeError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LmforgeError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != DpoLoss.SIGMOID:
            raise LmforgeError(f"--label_smoothing applies to --loss_type sigmoid, not {self.loss_type.value}")
        if self.sft_weight < 0:
            raise LmforgeError(f"--sft_weight must be at least 0, got {self.sft_weight}")


@dataclass
class GrpoArguments:
    """`lmforge grpo`'s own flags: sampling, rewards and the policy-gradient loss."""

    num_generations: int = field(
        default=8, metadata={"help": "Completions sampled per prompt (the group whose rewards are compared)."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "Longest prompt in tokens; longer ones are refused, or dropped and counted "
                                       "with --long_records drop."})
    max_completion_length: int = field(
        default=256, metadata={"help": "Most tokens sampled per completion; one that reaches it is truncated."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set of tokens whose "
                                                        "probability reaches top_p (1: all)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only (0: all)."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Reward functions: built-ins (accuracy, format, overlong) or FILE.py:NAME, a function "
                          "with TRL's signature f(prompts, completions, **columns) -> list[float | None]."})
    reward_weights: list[float] = field(
        default_factory=list, metadata={"help": "One weight per reward function (default 1 each)."})
    answer_column: str = field(
        default="answer", metadata={"help": "The record column the accuracy reward compares with."})
    loss_type: str = field(
        default="dapo", metadata={"help": "dapo (per token, the default), grpo (per sequence) or dr_grpo (by a "
                                          "constant: completions x max_completion_length)."})
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide advantages by the std of the group's rewards (group), of the "
                                           "batch's (batch), or not (none, as Dr. GRPO)."})
    epsilon: float = field(default=0.2, metadata={"help": "The ratio's lower clip: 1 - epsilon."})
    epsilon_high: Optional[float] = field(
        default=None, metadata={"help": "The ratio's upper clip: 1 + epsilon_high (DAPO's clip-higher: 0.28); "
                                        "default: epsilon."})
    beta: float = field(
        default=0.0, metadata={"help": "KL penalty to the reference (the adapter disabled under LoRA, a frozen copy "
                                       "otherwise); 0: no reference is kept or computed."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps on each generation batch (mu), with the sampling policy's "
                                     "log-probabilities stored for the ratio."})
    importance_sampling_level: str = field(
        default="token", metadata={"help": "token (GRPO, DAPO) or sequence (GSPO: one length-normalised ratio per "
                                           "completion)."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Completions that reached --max_completion_length without ending carry "
                                         "no loss."})
    train_row_tokens: int = field(
        default=16384, metadata={"help": "The training half packs a generation batch's prompt + completion documents "
                                         "into the fewest rows of at most this many tokens (at the longest prompt "
                                         "and --max_completion_length), a row a micro-batch; per_device_train_batch"
                                         "_size x gradient_accumulation_steps is the generation batch. 0: "
                                         "per_device_train_batch_size completions a micro-batch, as TRL (and under "
                                         "--deepspeed, whose config fixes the accumulation)."})
    generation_cache: str = field(
        default="auto", metadata={"help": "The generation cache: static (fixed size, the decode step compiled; "
                                          "prompts padded to a multiple of 64 tokens), dynamic, or auto: static on "
                                          "a CUDA GPU, dynamic otherwise."})
    log_completions: int = field(
        default=3, metadata={"help": "Sampled completions (with their rewards) printed and kept for the report at "
                                     "each log."})

    def __post_init__(self):
        from lmforge.rl.surrogate import LossType, RatioLevel, ScaleRewards

        for flag, kind in (("loss_type", LossType), ("scale_rewards", ScaleRewards),
                           ("importance_sampling_level", RatioLevel)):
            try:
                setattr(self, flag, kind(getattr(self, flag)))
            except ValueError:
                raise LmforgeError(f"--{flag} {getattr(self, flag)}: one of "
                                   f"{', '.join(k.value for k in kind)}") from None
        if self.num_generations < 2:
            raise LmforgeError(f"--num_generations {self.num_generations}: GRPO compares each completion with the "
                               "others of its group; it needs at least 2")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.generation_cache not in ("auto", "static", "dynamic"):
            raise LmforgeError(f"--generation_cache {self.generation_cache}: one of auto, static, dynamic")
        for flag in ("max_prompt_length", "max_completion_length", "num_iterations"):
            if getattr(self, flag) < 1:
                raise LmforgeError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if self.train_row_tokens < 0:
            raise LmforgeError(f"--train_row_tokens must be at least 0, got {self.train_row_tokens}")
        if self.temperature <= 0:
            raise LmforgeError(f"--temperature must be positive, got {self.temperature}")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise LmforgeError(f"--reward_weights gives {len(self.reward_weights)} weights for "
                               f"{len(self.reward_funcs)} reward functions")


@dataclass
class PretrainDataArguments:
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "Training text: .txt, or .json / .jsonl / .parquet with a text field."}
    )
    validation_files: list[str] = field(
        default_factory=list, metadata={"help": "Held-out text evaluated at --eval_steps (same formats)."}
    )
    val_split: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training blocks (e.g. 0.05) as evaluation data, drawn by "
                          "--seed; instead of --validation_files."},
    )
    block_size: int = field(default=2048, metadata={"help": "Tokens per training block."})
    text_field: str = field(default="text", metadata={"help": "The field holding the text in json/jsonl/parquet."})
    text_split: TextSplit = field(
        default=TextSplit.FILE,
        metadata={"help": "Documents in a .txt file: file (the whole file), blank_line (paragraphs) or line. "
                          "An EOS token follows every document."},
    )
    remainder: Remainder = field(
        default=Remainder.DROP,
        metadata={"help": "The corpus' last tokens that fill no block: drop (counted) or pad (a shorter last "
                          "block, padding masked)."},
    )
    on_bad_record: OnBadRecord = field(
        default=OnBadRecord.ERROR, metadata={"help": "error: stop at a bad record, naming it; skip: count and skip."}
    )
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "Context the model must support; defaults to --block_size (RoPE scaling)."}
    )
    pretrain_document_mask: bool = field(
        default=False,
        metadata={"help": "Confine attention to each document inside a block (documents end at EOS), with "
                          "positions restarting at each document, as packed SFT does."},
    )
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Token cache root (default: $LMFORGE_CACHE or ~/.cache/lmforge)."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes that tokenize the data into the cache (default: one per 4 MiB "
                                        "of data, at most the cores this process may use; the cache is the same "
                                        "whatever the count)."}
    )

    def __post_init__(self):
        check_val_split(self.val_split, self.validation_files, "--validation_files")
        if self.model_max_length is None:
            self.model_max_length = self.block_size


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of every weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={
        "help": "Dropout on the LoRA input (FastChat's 0.05). Its masks cost time and memory: on the 1B shape "
                "(one H200, 2026-12-03) 0 trained 8.6% faster and 5 GiB lighter."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters: all-linear (every linear layer of the blocks, not the "
                          "output head), or names such as q_proj v_proj (also q_proj,v_proj)."},
    )
    lora_bias: str = field(
        default="none",
        metadata={"help": "Biases to train: none, all or lora_only.", "choices": ["none", "all", "lora_only"]},
    )
    q_lora: bool = field(
        default=False,
        metadata={"help": "QLoRA: the frozen base is loaded in 4-bit NF4 (bitsandbytes, double quantisation, "
                          "bf16 compute) and prepared for k-bit training. Implies --lora."},
    )
    q_lora_embeddings: bool = field(
        default=True,
        metadata={"help": "Under QLoRA, also store the frozen input embedding and output head in 4-bit NF4 (one "
                          "shared copy when they are tied). With a large vocabulary they are a fifth or more of "
                          "the model; False keeps them in bf16, as plain HF QLoRA does."},
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "Modules trained in full and saved beside the adapter (e.g. lm_head)."}
    )
    lora_weight_path: str = field(default="", metadata={"help": "Accepted for FastChat compatibility; unused."})

    def __post_init__(self):
        self.lora_target_modules = [m for item in self.lora_target_modules for m in item.split(",") if m]
        self.modules_to_save = [m for item in self.modules_to_save for m in item.split(",") if m]
        if self.q_lora:
            self.lora = True
        # Checked here, before any data is tokenized; PEFT would refuse them only once the model is built.
        if self.lora_r < 1:
            raise LmforgeError(f"--lora_r must be a positive integer, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise LmforgeError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


REPORT_PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard", "mlflow": "mlflow",
                   "trackio": "trackio", "comet_ml": "comet_ml", "clearml": "clearml"}
SHIPPED_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def shipped_deepspeed_config(name: str) -> str:
    """`--deepspeed zero2` (or zero2_offload, zero3, zero3_offload) names a config shipped in
    lmforge/configs; anything else is a path."""
    path = os.path.join(SHIPPED_CONFIGS, f"ds_{name}.json")
    return path if os.path.isfile(path) else name


def shipped_fsdp_config(name: str) -> str:
    """`--fsdp_config fsdp_full_shard` (or fsdp_full_shard_offload) names a config shipped in
    lmforge/configs; anything else is a path."""
    path = os.path.join(SHIPPED_CONFIGS, f"{name}.json")
    return path if os.path.isfile(path) and os.path.basename(name) == name else name


DEFAULT_FSDP_CONFIG = "fsdp_full_shard"

# The words of FastChat's `--fsdp "full_shard auto_wrap offload"`, as FSDP2 settings. transformers
# still translates them itself, but calls that deprecated; lmforge keeps FastChat's spelling.
FSDP_WORDS: dict[str, tuple[str, bool] | None] = {
    "full_shard": ("reshard_after_forward", True),  # parameters sharded again after each layer's forward
    "shard_grad_op": ("reshard_after_forward", False),  # kept whole from forward to backward
    "offload": ("cpu_offload", True),
    "auto_wrap": None,  # every decoder layer its own FSDP unit: the shipped configs' policy already
}


def fsdp_enabled(value) -> bool:
    """--fsdp is a string (FastChat's words) or True (bare flag); "false" / "" mean off."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "no", "0", "none")
    return bool(value)


def fsdp_config_from_flags(fsdp, config, layer_classes: str | None) -> dict:
    """The FSDP2 config a run uses: `--fsdp_config` (a path, a shipped name, a dict; default the
    shipped fsdp_full_shard.json), with the words of `--fsdp` and
    `--fsdp_transformer_layer_cls_to_wrap` applied over it (the command line is the more specific)."""
    if config is None:
        config = shipped_fsdp_config(DEFAULT_FSDP_CONFIG)
    if isinstance(config, str):
        config = read_json_object(shipped_fsdp_config(config), "--fsdp_config")
    # Accelerate-style keys ("fsdp_cpu_offload") mean the same as the plain ones.
    config = {k[len("fsdp_"):] if k.startswith("fsdp_") else k: v for k, v in dict(config).items()}
    words = fsdp.split() if isinstance(fsdp, str) else []
    if int(config.get("version", 2)) == 2:
        for word in words:
            if word not in FSDP_WORDS:
                raise LmforgeError(f"--fsdp {fsdp!r}: {word!r} is not an FSDP2 option; lmforge runs FSDP2, which "
                                   f"takes {', '.join(FSDP_WORDS)}")
            if FSDP_WORDS[word] is not None:
                key, value = FSDP_WORDS[word]
                config[key] = value
    if layer_classes:
        config["transformer_layer_cls_to_wrap"] = [c for c in layer_classes.split(",") if c]
    return config


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def default_reporters() -> str:
    """`--report_to auto`: TensorBoard when it is installed (its event files go under
    OUTPUT_DIR/runs), else no logging backend; wandb, swanlab and mlflow only when asked for."""
    return "tensorboard" if _installed("tensorboard") else "none"


def _check_reporters(report_to) -> None:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = REPORT_PACKAGES.get(name)
        if package and not _installed(package):
            raise LmforgeError(f"--report_to {name} needs the {package} package: pip install {package}")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments, plus the flags lmforge's runs add and FastChat's and happy-llm's flags
    that transformers 5 renamed or removed."""

    evaluation_strategy: Optional[str] = field(
        default=None, metadata={"help": "FastChat's name for --eval_strategy (renamed in transformers 5)."}
    )
    report_to: Optional[str] = field(
        default="auto",
        metadata={"help": "Where logs go besides trainer_state.json and the run report: auto (tensorboard when "
                          "installed, else none), none, tensorboard, wandb, swanlab, mlflow, or several, comma-separated."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "transformers' removal of dataset columns the model's forward does not name. Off: "
                          "lmforge's rows hold only what its collators use (packed rows need document_ids, pairs "
                          "their two sides)."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "transformers' filter that logs the running mean in place of a NaN / inf loss. Off by "
                          "default: lmforge's non-finite guard stops such a run before the step is applied, and the "
                          "filter reads every micro-step's loss on the host, which stalls the host on the GPU."},
    )
    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "FastChat's and happy-llm's warmup as a fraction of all steps (transformers 5: "
                                        "--warmup_steps below 1)."}
    )
    logging_dir: Optional[str] = field(
        default=None, metadata={"help": "TensorBoard log directory (default: OUTPUT_DIR/runs/...)."}
    )
    fsdp: Optional[str] = field(
        default=None,
        metadata={"help": "Shard the model with PyTorch FSDP2 (through the Trainer / accelerate): a bare --fsdp, or "
                          "FastChat's words \"full_shard auto_wrap\" (add \"offload\" for CPU offload; "
                          "\"shard_grad_op\" keeps parameters whole between forward and backward). Settings come "
                          "from --fsdp_config (default: the shipped fsdp_full_shard.json).",
                  "nargs": "?", "const": True},
    )
    fsdp_config: Optional[str] = field(
        default=None,
        metadata={"help": "FSDP settings: a JSON file, or a shipped name: fsdp_full_shard (default with --fsdp), "
                          "fsdp_full_shard_offload (parameters, gradients and optimizer state on the CPU)."},
    )
    fsdp_transformer_layer_cls_to_wrap: Optional[str] = field(
        default=None,
        metadata={"help": "FastChat's flag: the decoder layer class FSDP wraps (e.g. LlamaDecoderLayer). "
                          "Without it lmforge wraps the model's own decoder layer class (its _no_split_modules)."},
    )
    prepare_timeout: int = field(
        default=86400,
        metadata={"help": "Seconds the other processes of a multi-process run wait for the first process on "
                          "their machine to tokenize the data into the cache (a barrier of its own, so "
                          "--ddp_timeout, which bounds every collective of training, can stay short)."},
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir that holds no checkpoint (its files may be "
                          "overwritten). With checkpoints present, training resumes instead."},
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Continue from the newest complete checkpoint-* in --output_dir when one exists."},
    )
    resume_changed_data: bool = field(
        default=False,
        metadata={"help": "Resume even where a data file's content changed since the run started (refused "
                          "otherwise, naming the file); the position in the epoch is then recomputed from the "
                          "new data's size."},
    )
    flash_attn: bool = field(
        default=False,
        metadata={"help": "FastChat's flag: use the fastest attention this install has (flash_attention_2 "
                          "when flash-attn is installed, else PyTorch SDPA, whose CUDA backend is a flash "
                          "kernel); the choice is logged."},
    )
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Compute the loss from the final hidden states at the labelled positions only, the "
                          "vocabulary projection and cross-entropy fused in chunks (Liger's kernel when "
                          "installed): the full logits tensor is never built. False: the model's own loss."},
    )
    loss_kernel: str = field(
        default="auto",
        metadata={"help": "The fused loss's kernel: chunked (PyTorch matmuls over chunks of at most 1 GiB of "
                          "logits; the fastest measured), liger (Liger's Triton kernel), or auto (= chunked)."},
    )
    compile_blocks: Optional[bool] = field(
        default=None,
        metadata={"help": "torch.compile each decoder block (regional compilation: one compiled graph reused "
                          "by every layer, a short compile); fuses the elementwise work small models are bound by. "
                          "Default: on with a CUDA GPU for packed rows (SFT, LoRA, pretraining) and DPO's pairs "
                          "when neither DeepSpeed nor FSDP shards the model; off on a CPU and with --packing False."},
    )
    compile_mode: str = field(
        default="default",
        metadata={"help": "torch.compile mode for --compile_blocks: default, or reduce-overhead (CUDA graphs: "
                          "the host no longer launches each kernel; packed rows then all get the same length)."},
    )
    cuda_graphs: Optional[bool] = field(
        default=None,
        metadata={"help": "Record each micro-step (forward, loss, backward) as a CUDA graph per batch shape and "
                          "replay it: the host launches one graph instead of thousands of kernels (steps bound by "
                          "the host: small models, LoRA DPO). One CUDA GPU, no DeepSpeed / FSDP / --fp16 / gradient "
                          "checkpointing; DPO pads its batches' lengths to multiples of 128 for it. Default: on for "
                          "DPO's padded pairs where those hold, else off."},
    )
    eval_samples: int = field(
        default=0,
        metadata={"help": "At each evaluation, answer the first N held-out prompts greedily and write the answers "
                          "with their references to OUTPUT_DIR/samples.jsonl, the console and the run report (SFT)."},
    )
    eval_sample_tokens: int = field(
        default=64, metadata={"help": "The longest answer --eval_samples generates, in tokens."}
    )
    compile_memory_budget: Optional[float] = field(
        default=None,
        metadata={"help": "With --compile_blocks: the share (0-1] of the blocks' activations the compiler may keep "
                          "for the backward; below 1 it recomputes the cheapest ones instead (PyTorch's activation "
                          "memory budget). Less memory than gradient checkpointing costs, for a little time. "
                          "Default: 0.8 with compiled blocks on a CUDA GPU (no measured speed cost), 0.1 there under "
                          "--q_lora without gradient checkpointing (memory first), else 1."},
    )

    def __post_init__(self):
        self.notes: list[str] = []  # said to the user by `setup_process`, once, by the main process
        if self.eval_samples < 0 or self.eval_sample_tokens < 1:
            raise LmforgeError(f"--eval_samples must be ≥ 0 and --eval_sample_tokens ≥ 1, got {self.eval_samples} "
                               f"and {self.eval_sample_tokens}")
        if self.compile_memory_budget is not None and not 0 < self.compile_memory_budget <= 1:
            raise LmforgeError(f"--compile_memory_budget must be in (0, 1], got {self.compile_memory_budget}")
        if self.output_dir is None or not str(self.output_dir).strip():
            # transformers would default to ./trainer_output, a directory the user never named.
            raise LmforgeError("--output_dir is required: the directory checkpoints and the trained model go to")
        check_training_values(self)
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio:
            self.warmup_steps = self.warmup_ratio
        if not fsdp_enabled(self.fsdp):
            self.fsdp = None
        if self.fsdp and self.deepspeed:
            raise LmforgeError("--fsdp and --deepspeed are two ways to shard a model; pass one of them")
        self.fsdp_requested = self.fsdp  # the flag as given, for the checks of what it combines with
        if self.fsdp and launched_processes() <= 1:
            # FastChat's command line carries --fsdp; one process has nothing to shard across
            # (accelerate refuses FSDP outside distributed training, after everything has loaded).
            # Its words are still checked, so the command line is right for the launcher.
            fsdp_config_from_flags(self.fsdp, self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)
            self.notes.append(f"--fsdp {self.fsdp!r} in one process: nothing to shard across, so this trains "
                              "without FSDP; launch with torchrun --nproc_per_node N to shard over N GPUs")
            self.fsdp = None
        if self.fsdp:
            self._configure_fsdp()
        elif self.fsdp_transformer_layer_cls_to_wrap:
            self.fsdp_config = fsdp_config_from_flags(None, self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)
        if self.prepare_timeout < 1:
            raise LmforgeError(f"--prepare_timeout must be at least 1 second, got {self.prepare_timeout}")
        if self.deepspeed and isinstance(self.deepspeed, str):
            self.deepspeed = shipped_deepspeed_config(self.deepspeed)
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise LmforgeError(f"--deepspeed {self.deepspeed} needs the deepspeed package: pip install deepspeed")
            if not os.path.isfile(self.deepspeed):
                raise LmforgeError(f"--deepspeed {self.deepspeed}: no such file (shipped: zero2, zero2_offload, "
                                   "zero3, zero3_offload)")
            read_json_object(self.deepspeed, "--deepspeed")
        if self.loss_kernel not in ("auto", "liger", "chunked"):
            raise LmforgeError(f"--loss_kernel {self.loss_kernel}: choose auto, liger or chunked")
        if self.report_to == "auto":
            self.report_to = default_reporters()
        elif isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        _check_reporters(self.report_to)
        self._cpu_fallback()
        if self.deepspeed:
            # DeepSpeed's distributed set-up, run from here, prints a build notice of its own on
            # stdout ("... deepspeed_shm_comm_op built successfully"): not an event of this run.
            with contextlib.redirect_stdout(io.StringIO()):
                super().__post_init__()
        else:
            super().__post_init__()

    def _cpu_fallback(self) -> None:
        """A GPU command line (--bf16 True) on a machine without a GPU trains on the CPU, with
        bf16 autocast there, instead of stopping: FastChat's and happy-llm's commands run anywhere as written."""
        import torch

        if torch.cuda.is_available():
            return
        if self.bf16 and not self.use_cpu:
            self.use_cpu = True
            self.notes.append("no GPU: training on the CPU (bf16 autocast)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not self.deepspeed:
            # Under a launcher without a GPU, accelerate makes a process group (gloo) only for
            # use_cpu; otherwise every process would train alone, on the whole data, into the
            # same output directory. (DeepSpeed makes its own, through its CPU accelerator.)
            self.use_cpu = True
        if self.tf32:
            self.tf32 = None  # TF32 is a mode of NVIDIA matrix units; nothing to set on a CPU

    def _configure_fsdp(self) -> None:
        """The FSDP2 settings from the flags (`fsdp_config_from_flags`), and a process group that
        can also reduce CPU tensors where FSDP needs that."""
        import torch

        config = fsdp_config_from_flags(self.fsdp, self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)
        self.fsdp_config = config
        if int(config.get("version", 2)) == 2:
            self.fsdp = True  # the words are in the config now; transformers' own translation is deprecated
        if not torch.cuda.is_available() or self.use_cpu:
            self.notes.append("--fsdp on a machine without a GPU: accelerate enables FSDP for GPU backends only, so "
                              "this trains as DDP (every process holds the whole model)")
            return
        if self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # With CPU offload the sharded parameters, gradients and optimizer state live on the CPU: the
            # gradient-norm all-reduce and the gathers of a full state dict then run on CPU tensors, which
            # NCCL cannot reduce. `accelerate launch` sets up this pair of backends for FSDP; torchrun
            # and a bare TrainingArguments do not.
            self.ddp_backend = "cuda:nccl,cpu:gloo"


def check_training_values(args: TrainingArguments) -> None:
    """Values that would fail late (a ZeroDivisionError, a torch traceback after the model has
    loaded) or train nothing while exiting 0, refused at parsing in one line naming the flag."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise LmforgeError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.learning_rate > 0:
        raise LmforgeError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.max_steps == 0:
        raise LmforgeError("--max_steps 0 trains nothing: pass a positive number of optimizer steps, or leave it "
                           "out to train --num_train_epochs epochs")
    if args.max_steps < 0 and not args.num_train_epochs > 0:
        raise LmforgeError(f"--num_train_epochs {args.num_train_epochs} trains nothing: pass a positive number of "
                           "epochs (or --max_steps)")
    if args.save_steps is not None and args.save_steps <= 0:
        raise LmforgeError(f"--save_steps must be positive, got {args.save_steps}")


@dataclass
class DpoTrainingArguments(TrainingArguments):
    """`lmforge dpo`'s training flags: the Trainer's, evaluating the DPO loss and its metrics."""

    prediction_loss_only: bool = field(
        default=True, metadata={"help": "DPO evaluation reports the loss and the reward metrics, not logits."})

    def __post_init__(self):
        if not self.prediction_loss_only:
            raise LmforgeError("--prediction_loss_only False: DPO evaluation computes the loss and reward metrics "
                               "of each pair, not logits to return")
        super().__post_init__()


def launched_processes() -> int:
    """How many processes train together: the process group's size once one exists, else what
    the launcher (torchrun, deepspeed, accelerate) put in WORLD_SIZE; 1 without a launcher."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_process(args: TrainingArguments) -> None:
    """What parsed flags do to this process, in one place, after parsing: the environment the
    libraries read, the accelerator's copy settings, and the notes about the machine (printed
    by the main process)."""
    if args.logging_dir:
        # transformers 5 reads the TensorBoard directory from the environment.
        os.environ["TENSORBOARD_LOGGING_DIR"] = args.logging_dir
    if args.dataloader_pin_memory and not torch_cuda_available():
        # Pinned memory is for copies to a GPU; without one torch warns at every data loader.
        args.dataloader_pin_memory = False
    if args.dataloader_pin_memory:
        # Each batch goes to the GPU without the host waiting for the copy (the data loader
        # leaves it in pinned memory): a blocking copy would stall the host at every step,
        # and a small model's step is bound by how fast the host queues its kernels.
        args.accelerator_config.non_blocking = True
    if args.process_index == 0:
        for note in args.notes:
            print(f"lmforge: {note}")


def read_json_object(path: str, flag: str) -> dict:
    """A JSON config file named by `flag`, which must hold an object; a file that does not
    parse is named with the line and column, instead of a JSONDecodeError deep in the loader."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{flag} {path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{flag} {path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not isinstance(value, dict):
        raise LmforgeError(f"{flag} {path}: expected a JSON object, got {type(value).__name__}")
    return value


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML run file into flags, so flags after it on the command line override it. A
    value is a scalar, a list of scalars (a flag that takes several), or a mapping for the flags
    that take a JSON object (`fsdp_config`, `deepspeed`, `lr_scheduler_kwargs`, ...); every
    error names the file (and the key)."""
    import yaml

    if os.path.isdir(path):
        raise LmforgeError(f"{path}: is a directory, not a run file")
    if not os.path.isfile(path):
        raise LmforgeError(f"{path}: run file does not exist")
    try:
        with open(path, "rb") as f:  # PyYAML tells UTF-8 from UTF-16 by the bytes
            values = yaml.safe_load(f)
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read the run file: {e.strerror}") from None
    except yaml.reader.ReaderError as e:  # not UTF-8, or a character YAML does not allow
        if e.encoding and e.encoding != "unicode":  # PyYAML's "unicode": a character it refuses
            raise LmforgeError(f"{path}: not valid {e.encoding.upper()} (byte {e.position}: {e.reason})") from None
        raise LmforgeError(f"{path}, character {e.position}: not valid YAML: {e.reason}") from None
    except yaml.YAMLError as e:
        # PyYAML's own text spans several lines and repeats the file name; keep its position
        # and its one-line reason.
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LmforgeError(f"{path}{where}: not valid YAML: {reason}") from None
    if values is None:  # an empty file (or only comments): no flags
        values = {}
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: a run file must map flag names to values")
    takes_mapping = set(getattr(transformers.TrainingArguments, "_VALID_DICT_FIELDS", ())) | {
        "accelerator_config", "fsdp_config", "deepspeed", "gradient_checkpointing_kwargs", "lr_scheduler_kwargs"}
    kinds = {type(None): "null", dict: "mapping", list: "list"}
    argv: list[str] = []
    for key, value in values.items():
        if not isinstance(key, str) or not key.strip():
            raise LmforgeError(f"{path}: the key {key!r} is not a flag name")
        if value is None:
            raise LmforgeError(f"{path}: {key!r} is null (no value); give it a value, or leave the key out for "
                               "its default")
        argv.append(f"--{key}")
        if isinstance(value, list):
            if not value:
                raise LmforgeError(f"{path}: {key!r} is an empty list; give it one or more values, or leave the "
                                   "key out for its default")
            inner = next((kinds[type(v)] for v in value if type(v) in kinds), None)
            if inner:
                raise LmforgeError(f"{path}: {key!r} is a list holding a {inner}; a flag takes one value or a "
                                   "list of plain values")
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            if key not in takes_mapping:
                raise LmforgeError(f"{path}: {key!r} is a mapping; a flag takes one value or a list of values (only "
                                   f"{', '.join(sorted(takes_mapping))} take a mapping)")
            argv.append(json.dumps(value, default=str))
        else:
            argv.append(str(value))
    return argv


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)


def expand_argv(argv: Sequence[str]) -> list[str]:
    """A leading `run.yaml` becomes flags; the rest of the command line follows it. A negative
    number after a flag (`--learning_rate -1e-3`) is joined to it (`--learning_rate=-1e-3`):
    argparse takes "-1e-3" for a flag of its own and says only "expected one argument"."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_to_argv(argv[0]) + argv[1:]
    joined: list[str] = []
    for token in argv:
        if (joined and NEGATIVE_NUMBER.fullmatch(token) and joined[-1].startswith("--") and "=" not in joined[-1]):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


class _ArgumentParser(transformers.HfArgumentParser):
    """argparse prints the whole usage (hundreds of TrainingArguments flags) above a bad value;
    raised as an LmforgeError the one line that matters is printed on its own."""

    def error(self, message: str):
        raise LmforgeError(message)


def check_combinations(objs: Sequence[Any]) -> None:
    """Flags that are each valid but cannot work together, refused before any data is read."""
    by_type = {type(o): o for o in objs}
    lora = next((o for t, o in by_type.items() if issubclass(t, LoraArguments)), None)
    args = next((o for t, o in by_type.items() if issubclass(t, TrainingArguments)), None)
    data = next((o for t, o in by_type.items() if issubclass(t, (DataArguments, PretrainDataArguments))), None)
    if args is None:
        return
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if lora is not None and lora.q_lora and getattr(args, "fsdp_requested", args.fsdp):
        # Not verified here: FSDP2 with bitsandbytes' 4-bit weights needs a floating quant storage and
        # flat 4-bit parameters that survive sharding; lmforge's QLoRA loads the 4-bit base onto each
        # process' GPU (a device_map) instead, which is what DDP and ZeRO-2 expect.
        raise LmforgeError(
            "--q_lora cannot run under --fsdp: lmforge's QLoRA keeps the 4-bit base model whole on every GPU. "
            "Supported: QLoRA on one GPU, on several GPUs with DDP (torchrun, no --fsdp / --deepspeed), or with "
            "--deepspeed zero2 / zero2_offload; for a model too large for one GPU use --lora True (bf16 base) "
            "with --fsdp or --deepspeed zero3")
    if lora is not None and lora.q_lora and ds_config is not None and ds_config.is_zero3():
        # lmforge's QLoRA loads the whole 4-bit base onto each process' GPU (a device_map), which
        # ZeRO-3 refuses: it partitions (and with offload moves to CPU) the parameters itself.
        offload = " with CPU offload" if ds_config.is_offload() else ""
        raise LmforgeError(
            f"--q_lora cannot run under --deepspeed {args.deepspeed} (ZeRO stage 3{offload}): QLoRA keeps the "
            "4-bit base model whole on every GPU, ZeRO-3 partitions parameters; use --deepspeed zero2 or "
            "zero2_offload")
    if data is not None and args.eval_strategy != transformers.IntervalStrategy.NO:
        held_out, flag = ((data.eval_data_path, "--eval_data_path") if isinstance(data, DataArguments)
                          else (data.validation_files, "--validation_files"))
        if not held_out and not data.val_split:
            # The Trainer would refuse this only after the data is tokenized, with a traceback.
            raise LmforgeError(f"--eval_strategy {args.eval_strategy.value} needs held-out data: pass {flag} "
                               "or --val_split (or --eval_strategy no)")


def parse(dataclasses_: tuple[type, ...], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse flags (and a leading YAML file) into the given dataclasses; an unknown flag, a bad
    value or an impossible combination is an LmforgeError that names it."""
    parser = _ArgumentParser(dataclasses_)
    try:
        parsed = parser.parse_args_into_dataclasses(args=expand_argv(argv), return_remaining_strings=True)
    except ValueError as e:
        # transformers' TrainingArguments checks its values in __post_init__ with ValueError
        # (e.g. --bf16 with --fp16); those are about the flags given here.
        raise LmforgeError(str(e).strip()) from None
    *objs, remaining = parsed
    if remaining:
        raise LmforgeError(f"unknown arguments: {' '.join(remaining)}")
    check_combinations(objs)
    return tuple(objs)
