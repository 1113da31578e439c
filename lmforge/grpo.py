"""`lmforge grpo`: online RL with verifiable rewards (GRPO, and its DAPO / Dr. GRPO / GSPO
variants), full-parameter or LoRA, with `lmforge sft`'s model loading, launchers, auto-resume,
run record and final save.

    lmforge grpo --model_name_or_path SFT_MODEL --data_path prompts.jsonl --output_dir out \\
        --reward_funcs accuracy format --num_generations 8 --max_completion_length 256

Prompts (any chat format; every other column reaches the rewards) → rendered with the
generation prompt → per step: sample G completions a prompt, reward them, group-relative
advantages → the clipped surrogate on packed prompt + completion rows (`lmforge/rl/trainer.py`
reads it top to bottom). The steps around it are `recipe.run`'s.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m lmforge.grpo --help: answered before the imports below
    from lmforge.cli import answer_help

    answer_help("grpo")

from collections import Counter
from dataclasses import asdict
from typing import Sequence

from lmforge.data.batches import Batches, PreparedData
from lmforge.data.encode import CHAT, RecordStats
from lmforge.data.render import Renderer, end_of_turn_token_id
from lmforge.data.sources import SkipCounter
from lmforge.data.split import held_out_indices
from lmforge.data.store import source_files
from lmforge.data.templates import resolve_template
from lmforge.errors import LmforgeError
from lmforge.flags import DataArguments, GrpoArguments
from lmforge.logs import say
from lmforge.modeling.load import apply_lora, load_tokenizer
from lmforge.modeling.optim import adapter_dtype
from lmforge.recipe import Flags, Method, Model, chat_options, run
from lmforge.rl.rewards import RewardOptions, Rewards, check_columns, load_rewards
from lmforge.rl.rollout import Prompt, TransformersEngine, read_prompts
from lmforge.rl.trainer import GrpoTrainer, rollout_rows
from lmforge.training.distributed import shards_weights
from lmforge.training.dpo_trainer import disable_dropout, frozen_copy
from lmforge.training.fast_path import Rows


def reward_functions(grpo: GrpoArguments) -> Rewards:
    """The run's reward functions, weights and built-in settings (the overlong penalty counts
    up to --max_completion_length)."""
    options = RewardOptions(answer_column=grpo.answer_column, overlong_max_length=grpo.max_completion_length)
    return load_rewards(grpo.reward_funcs, grpo.reward_weights or None, options)


def static_cache(grpo: GrpoArguments) -> bool:
    """--generation_cache auto: static on a CUDA GPU (several times faster there: measured,
    docs/bench_results.md, GRPO on one H100), dynamic on a CPU."""
    if grpo.generation_cache == "auto":
        import torch

        return torch.cuda.is_available()
    return grpo.generation_cache == "static"


class PromptSet:
    """The prompts of a run, where the other methods have a token-cache entry: what the run
    record and the resume check read of it (`stats`, `sources`, `path`)."""

    def __init__(self, prompts: list[Prompt], stats: RecordStats, sources):
        self.prompts = prompts
        self.stats = stats
        self.sources = sources
        self.path = "prompts, in memory"

    def dataset(self) -> list[Prompt]:
        return self.prompts


class Grpo(Method):
    command, kind, data_arguments, method_arguments = "grpo", CHAT, DataArguments, GrpoArguments
    unit = "prompts"
    tokenizing = "reading the prompts"
    rewards: Rewards  # set by `check`

    def check(self, flags: Flags) -> None:
        """Refused at parsing: a generation batch that is not whole groups, data GRPO cannot use."""
        args, grpo = flags.args, flags.method
        completions = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if completions % grpo.num_generations:
            raise LmforgeError(
                f"--per_device_train_batch_size {args.per_device_train_batch_size} x --gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} = {completions} completions a step: not a multiple of "
                f"--num_generations {grpo.num_generations} (a step's completions are whole groups)")
        if grpo.beta > 0 and not flags.lora.lora and shards_weights(args):
            raise LmforgeError(f"--beta {grpo.beta} with full-parameter GRPO under FSDP or ZeRO-3 would keep an "
                               "unsharded frozen reference on every GPU; pass --lora True (the reference is the model "
                               "with its adapter disabled) or --beta 0 (no reference)")
        self.rewards = reward_functions(grpo)  # loaded once, now: a bad spec fails before anything is read

    def context_length(self, flags: Flags, data: PreparedData) -> int:
        """A row is one prompt and its completion: the longest prompt read and --max_completion_length
        (not --max_prompt_length, a bound: a model whose native context holds the real rows keeps its
        RoPE as it is)."""
        sets = [data.train] + ([data.eval] if data.eval is not None else [])
        return max(len(p.input_ids) for s in sets for p in s.prompts) + flags.method.max_completion_length

    def prepare(self, flags: Flags) -> PreparedData:
        data, grpo = flags.data, flags.method
        tokenizer = load_tokenizer(flags.model)
        template = resolve_template(tokenizer, data.template)
        options = chat_options(data)
        renderer = Renderer(tokenizer, template, options.masking, options.unrendered, options.tools)

        def prompt_set(paths: list[str]) -> PromptSet:
            skips = SkipCounter(Counter(), {})
            prompts = read_prompts(paths, renderer, options.data_format, options.on_bad_record,
                                   grpo.max_prompt_length, options.long_records, skips)
            if not prompts:
                raise LmforgeError(f"no usable prompt in {', '.join(paths)}")
            check_columns(self.rewards, prompts[0].columns)  # before any generation
            tokens = sum(len(p.input_ids) for p in prompts)
            stats = RecordStats(records=len(prompts) + skips.total, kept=len(prompts), tokens=tokens,
                                skipped=dict(skips.counts), skip_examples=dict(skips.examples), samples=len(prompts))
            return PromptSet(prompts, stats, source_files(paths))

        return PreparedData(CHAT, tokenizer, template, end_of_turn_token_id(renderer), prompt_set(data.data_path),
                            prompt_set(data.eval_data_path) if data.eval_data_path else None)

    def rows(self, flags: Flags) -> Rows:
        return Rows.ROLLOUTS

    def batches(self, flags: Flags, data: PreparedData) -> Batches:
        prompts = data.train.dataset()
        evaluated = data.eval.dataset() if data.eval is not None else None
        held_out = None
        if flags.data.val_split:  # the prompts --val_split holds out, drawn as SFT draws its records
            held = held_out_indices(len(prompts), flags.data.val_split, flags.args.seed)
            chosen = set(held)
            prompts, evaluated = [p for i, p in enumerate(prompts) if i not in chosen], [prompts[i] for i in held]
            held_out = evaluated
        return Batches(prompts, evaluated, None, prompts, held_out)

    def build_model(self, flags: Flags, data: PreparedData, batches: Batches, model) -> Model:
        args, grpo = flags.args, flags.method
        disable_dropout(model)  # the ratio compares the policy with itself: no dropout noise in it
        reference = None
        if flags.lora.lora:
            model = apply_lora(model, flags.lora, args.gradient_checkpointing, adapter_dtype(model.dtype, args))
        elif grpo.beta > 0:
            reference = frozen_copy(model)
        tokenizer = data.tokenizer
        stop_ids = list(dict.fromkeys(i for i in (data.end_of_turn_id, tokenizer.eos_token_id) if i is not None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        rewards = self.rewards
        completions = args.per_device_train_batch_size * args.gradient_accumulation_steps
        longest = self.context_length(flags, data)  # the longest row: a prompt and its completion
        row_tokens = 0 if args.deepspeed else grpo.train_row_tokens
        rows = rollout_rows(completions, longest, row_tokens, args.per_device_train_batch_size)
        bound = (f"{row_tokens:,} tokens (--train_row_tokens; a document {longest} at the longest)" if row_tokens
                 else f"{-(-completions // rows)} completions ("
                 + ("--deepspeed" if args.deepspeed else "--train_row_tokens 0") + ")")
        say(f"lmforge: GRPO trains each generation batch of {completions} completions as {rows} packed "
            f"row(s) of at most {bound}, one micro-batch each")
        say(f"lmforge: GRPO ({grpo.loss_type.value} loss, {grpo.num_generations} completions a prompt, "
            f"rewards: {', '.join(rewards.names)}); reference: "
            + ("none (--beta 0)" if grpo.beta == 0 else "the model with its adapter disabled"
               if flags.lora.lora else "a frozen copy of the starting model"))
        kwargs = {"grpo": grpo, "prompts": batches.train, "eval_prompts": batches.eval, "rewards": rewards,
                  "engine": TransformersEngine(pad, stop_ids, static_cache(grpo)), "tokenizer_decode": tokenizer.decode,
                  "stop_ids": stop_ids, "pad_id": pad, "reference": reference, "completions": completions,
                  "rows": rows}
        return Model(model, GrpoTrainer, kwargs)

    def describe(self, flags: Flags, data: PreparedData, batches: Batches) -> dict:
        settings = {k: getattr(v, "value", v) for k, v in asdict(flags.method).items()}
        return {"prompts": len(batches.train), "grpo": settings}


def main(argv: Sequence[str], callbacks: Sequence = ()) -> str:
    return run(Grpo(), argv, callbacks)


if __name__ == "__main__":  # python -m lmforge.grpo / torchrun -m lmforge.grpo
    from lmforge.cli import run_entry

    run_entry("grpo", main)
