"""Every flag of every command, as typed dataclasses: a field's name is its flag, its docstring-like
`help` what `--help` prints. This module imports only the standard library and the data options,
so that `lmforge COMMAND --help` lists these fields without importing torch.

What a flag's value means on a given machine (a CUDA GPU present, the launcher's world size,
FSDP's backends, training on the CPU where a GPU command line runs without one) is not decided
here: `__post_init__` and `check` validate values only; `config.TrainingArguments` (transformers'
TrainingArguments with `TrainingFlags` added) and `config.setup_process` decide for the machine
after parsing, and `fast_path.choose_fast_path` fills the speed settings left unset.

Flag names follow FastChat's and happy-llm's scripts (`--model_name_or_path`, `--data_path`,
`--model_max_length`, `--lazy_preprocess`), so their command lines run with `lmforge sft` in place
of the script.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

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

# --- model, data, LoRA and the methods' own flags --------------------------------------------

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
    varlen_kernel: str = field(
        default="auto",
        metadata={"help": "The kernel under varlen attention: auto (flash-attn-4 where it is installed and the GPU "
                          "is a Hopper or Blackwell, SM90 / SM100; else PyTorch's), flash-attn-4 (refused where it "
                          "cannot run), or torch (PyTorch's built-in varlen flash kernel).",
                  "choices": ["auto", "flash-attn-4", "torch"]},
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


# The flags every data command shares (sft / dpo / grpo records, pretraining text), one definition each.
def cache_dir_field():
    return field(default=None, metadata={"help": "Token cache root (default: $LMFORGE_CACHE or ~/.cache/lmforge)."})


def workers_field():
    return field(default=None, metadata={"help": "Processes that tokenize the data into the cache (default: one per "
                                                 "4 MiB of data, at most the cores this process may use; the cache is "
                                                 "the same whatever the count)."})


def bad_record_field():
    return field(default=OnBadRecord.ERROR,
                 metadata={"help": "error: stop at the first bad record, naming it; skip: leave bad records out, "
                                   "counted by reason in the report."})


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
    on_bad_record: OnBadRecord = bad_record_field()
    data_cache_dir: Optional[str] = cache_dir_field()
    preprocessing_num_workers: Optional[int] = workers_field()
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
    on_bad_record: OnBadRecord = bad_record_field()
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "Context the model must support; defaults to --block_size (RoPE scaling)."}
    )
    pretrain_document_mask: bool = field(
        default=False,
        metadata={"help": "Confine attention to each document inside a block (documents end at EOS), with "
                          "positions restarting at each document, as packed SFT does."},
    )
    data_cache_dir: Optional[str] = cache_dir_field()
    preprocessing_num_workers: Optional[int] = workers_field()

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
        "help": "Dropout on the LoRA input (FastChat's 0.05). Its masks cost time and memory "
                "(measured: docs/bench_results.md, LoRA's dropout)."})
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


# --- GRPO's choices ----------------------------------------------------------------------------

class LossType(str, enum.Enum):
    """How per-token losses are aggregated over a step (`--loss_type`)."""

    DAPO = "dapo"
    """Per token: every completion token of the step weighs the same (DAPO; the default)."""
    GRPO = "grpo"
    """Per sequence: each completion's mean token loss, averaged over completions (GRPO)."""
    DR_GRPO = "dr_grpo"
    """By a constant: summed, divided by completions × max completion length (Dr. GRPO)."""


class ScaleRewards(str, enum.Enum):
    """What a completion's advantage (its reward less its group's mean) is divided by."""

    GROUP = "group"
    """The standard deviation of its group's rewards (GRPO)."""
    BATCH = "batch"
    """The standard deviation of the whole batch's rewards."""
    NONE = "none"
    """Nothing (Dr. GRPO: the std scaling biases towards too easy and too hard prompts)."""


class RatioLevel(str, enum.Enum):
    """The importance ratio the surrogate clips."""

    TOKEN = "token"
    """Per token (GRPO, DAPO)."""
    SEQUENCE = "sequence"
    """Per completion, length-normalised (GSPO)."""


# --- lmforge's training flags (added to transformers' TrainingArguments by config.py) ----------

@dataclass
class TrainingFlags:
    """The training flags lmforge adds to transformers' TrainingArguments, and those whose
    default or meaning it changes (FastChat's and happy-llm's names that transformers 5 renamed
    or removed among them). `config.TrainingArguments` is both classes; the Trainer's other
    flags are transformers' own (`lmforge COMMAND --help_all`)."""

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
    fp8: str = field(
        default="auto",
        metadata={"help": "Float8 matmuls (torchao, tensorwise scaling) in the decoder blocks' linear layers; the "
                          "head, the loss and the stored weights stay as they are. auto: on for full-parameter "
                          "training in compiled blocks on a GPU of SM89 or newer with torchao installed, for models "
                          "of hidden size 2048 or more (where it measured faster); true; false.",
                  "choices": ["auto", "true", "false"]},
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

    def check(self) -> None:
        """Refuse values of these flags that cannot work, in one line naming the flag."""
        if self.eval_samples < 0 or self.eval_sample_tokens < 1:
            raise LmforgeError(f"--eval_samples must be ≥ 0 and --eval_sample_tokens ≥ 1, got {self.eval_samples} "
                               f"and {self.eval_sample_tokens}")
        if self.compile_memory_budget is not None and not 0 < self.compile_memory_budget <= 1:
            raise LmforgeError(f"--compile_memory_budget must be in (0, 1], got {self.compile_memory_budget}")
        if self.prepare_timeout < 1:
            raise LmforgeError(f"--prepare_timeout must be at least 1 second, got {self.prepare_timeout}")
        if self.loss_kernel not in ("auto", "liger", "chunked"):
            raise LmforgeError(f"--loss_kernel {self.loss_kernel}: choose auto, liger or chunked")


@dataclass
class DpoTrainingFlags(TrainingFlags):
    """`lmforge dpo`'s training flags: evaluation reports the DPO loss and its metrics."""

    prediction_loss_only: bool = field(
        default=True, metadata={"help": "DPO evaluation reports the loss and the reward metrics, not logits."})

    def check(self) -> None:
        if not self.prediction_loss_only:
            raise LmforgeError("--prediction_loss_only False: DPO evaluation computes the loss and reward metrics "
                               "of each pair, not logits to return")
        super().check()


@dataclass
class PrepareTrainingFlags(TrainingFlags):
    """`lmforge prepare` takes `lmforge sft`'s command line: the training flags matter to --show only."""

    output_dir: Optional[str] = field(
        default=".", metadata={"help": "Accepted so sft command lines work as is; prepare writes nothing there."})


# --- the other commands ------------------------------------------------------------------------

# The special tokens `lmforge tokenizer train` adds: a pad / end-of-text token and ChatML's turn markers.
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass
class TokenizerTrainArguments:
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "Text to learn the vocabulary from (.txt, .json, .jsonl, .parquet)."}
    )
    output_dir: str = field(default="tokenizer", metadata={"help": "Where the tokenizer is saved."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size, special tokens included."})
    special_tokens: list[str] = field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        metadata={"help": "Special tokens, first ids: <|endoftext|> (padding), <|im_start|>, <|im_end|> (EOS)."},
    )
    text_field: str = field(default="text", metadata={"help": "The field holding the text in json/jsonl/parquet."})
    text_split: TextSplit = field(default=TextSplit.LINE, metadata={"help": "Documents in .txt: file, blank_line, line."})
    template: str = field(default="chatml_user", metadata={"help": "The chat template saved with it (a built-in)."})


@dataclass
class PrepareArguments:
    dump: Optional[str] = field(default=None, metadata={"help": "Write the first --dump_n records here as JSONL."})
    dump_n: int = field(default=10, metadata={"help": "How many records --dump writes."})
    show: int = field(
        default=0,
        metadata={"help": "Print the first N training records with the tokens that carry loss marked, the "
                          "optimizer steps, tokens per step and estimated memory the same command line would "
                          "train with (the pre-flight check of lmforge sft), without training."},
    )
    verify: bool = field(
        default=False,
        metadata={"help": "Read the cache entries of this command line whole and compare them with their "
                          "checksums: prints the bytes and rows verified, or the damage (a damaged entry is "
                          "rebuilt)."},
    )


@dataclass
class MergeArguments:
    base: str = field(metadata={"help": "The base model directory the adapter was trained on."})
    adapter: str = field(metadata={"help": "The adapter directory (an lmforge LoRA run's output or checkpoint)."})
    output: str = field(metadata={"help": "Where the merged model is written (must not exist or be empty)."})
    torch_dtype: str = field(default="float32", metadata={"help": "dtype of the merged weights.",
                                                          "choices": ["auto", "float32", "bfloat16", "float16"]})


@dataclass
class ReportArguments:
    run_dir: str = field(metadata={"help": "An lmforge output directory (finished, stopped or still training)."})


@dataclass
class ChatArguments:
    model: str = field(metadata={"help": "Directory written by lmforge sft (or any chat model directory)."})
    prompt: Optional[str] = field(default=None, metadata={"help": "Answer this one prompt and exit."})
    system: Optional[str] = field(default=None, metadata={"help": "A system message to start the conversation."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})


@dataclass
class DemoArguments:
    output_dir: str = field(default="lmforge-demo", metadata={"help": "Where the demo writes its files."})
    seed: int = field(default=0, metadata={"help": "Seed of the task, the tokenizer data and training."})
    min_accuracy: float = field(default=0.0, metadata={"help": "Exit with an error when the fully fine-tuned "
                                                               "model's accuracy is below this."})

