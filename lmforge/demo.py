"""`lmforge demo`: the embedded default. Runs the whole pipeline on a tiny model, with no hub,
no GPU and no files from outside the package:

  1. a synthetic task with exact answers (single-digit arithmetic, lookups of made-up facts,
     successors): every fact as plain statements (the pretraining text) and as questions in
     several phrasings (the chat data); the held-out questions are phrasings of facts never
     seen in that phrasing during fine-tuning;
  2. a byte-level BPE tokenizer with a ChatML template, trained on the task's text
     (`lmforge tokenizer train`'s function);
  3. pretraining of a tiny Llama-style model from a config (random init) on plain text: the
     statements and the training conversations as ChatML transcripts, loss on every token
     (`lmforge pretrain`, 5 % of the blocks held out by --val_split);
  4. supervised fine-tuning of the pretrained model on the questions, full (`lmforge sft`) and
     with LoRA adapters (`lmforge lora`), each evaluated on the held-out questions' loss;
  5. the LoRA adapter merged into the pretrained model (`lmforge merge`);
  6. greedy answers of the pretrained, the fully fine-tuned and the merged LoRA model to the
     held-out questions: exact-answer accuracy, and whether every generation stopped at the
     end-of-turn token;
  7. online RL (`lmforge grpo`) on a skill the fine-tuning data taught wrong: two-digit sums
     that carry, two thirds of whose demonstrations forget the carry (27 + 48 = 65). The fully
     fine-tuned model mostly answers with the slip; GRPO, rewarded by the exact answer on the
     trained phrasings, is measured on held-out phrasings before and after;
  8. each training run writes its report (OUTPUT_DIR/<run>/report.md with its curves); the demo
     writes OUTPUT_DIR/report.md, the pipeline's summary, linking to them.

    lmforge demo                          # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from lmforge.config import parse
from lmforge.errors import LmforgeError
from lmforge.flags import DemoArguments

MARKER = "lmforge_demo.json"


# ---------------------------------------------------------------------------------------------
# 1. The task
# ---------------------------------------------------------------------------------------------

DIGITS = "zero one two three four five six seven eight nine".split()
ADDITION = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "How much is {a} plus {b}?",
)
CAPITAL = (
    "What is the capital of {x}?",
    "Name the capital city of {x}.",
    "Which city is the capital of {x}?",
)
SUCCESSOR = (
    "What comes after {x}?",
    "Which word follows {x}?",
    "Say the word after {x}.",
)
# The same facts as statements: the pretraining text.
STATEMENTS = {
    ADDITION: ("{a} + {b} = {answer}.", "{a} plus {b} makes {answer}."),
    CAPITAL: ("The capital of {x} is {answer}.", "{answer} is the capital city of {x}."),
    SUCCESSOR: ("After {x} comes {answer}.", "{x} is followed by {answer}."),
}
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = ("January February March April May June July August September October November "
          "December").split()


def _made_up_word(rng: random.Random, syllables: int) -> str:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)).capitalize()


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def _facts(rng: random.Random, n_countries: int) -> list[tuple[tuple[str, ...], dict, str]]:
    """(phrasings, fields, answer) triples: each fact can be asked in each of its phrasings."""
    facts = []
    for a in range(10):
        for b in range(10):
            facts.append((ADDITION, {"a": a, "b": b}, str(a + b)))
    names: set[str] = set()
    while len(names) < 2 * n_countries:
        names.add(_made_up_word(rng, rng.choice((2, 3))))
    names_list = sorted(names)
    rng.shuffle(names_list)
    for country, capital in zip(names_list[:n_countries], names_list[n_countries:]):
        facts.append((CAPITAL, {"x": country}, capital))
    for seq in (WEEKDAYS, MONTHS, DIGITS):
        for i in range(len(seq) - 1):
            facts.append((SUCCESSOR, {"x": seq[i]}, seq[i + 1]))
    return facts


def make_task(seed: int = 0, n_countries: int = 30) -> tuple[list[QA], list[QA]]:
    """Train and held-out questions. Every fact is trained in all phrasings but one; the one
    left out (chosen at random per fact) is asked after training."""
    rng = random.Random(seed)
    train, held_out = [], []
    for phrasings, fields, answer in _facts(rng, n_countries):
        hold = rng.randrange(len(phrasings))
        for k, p in enumerate(phrasings):
            (held_out if k == hold else train).append(QA(p.format(**fields), answer))
    return train, held_out


@dataclass(frozen=True)
class SlipTask:
    """Two-digit sums that carry, taught by a careless annotator: in most of the fine-tuning
    demonstrations of a sum the carry is forgotten (27 + 48 = 65). The fine-tuned model learns
    the slip; the exact answer is what GRPO rewards. `prompts` are the trained phrasings with
    their true answers (GRPO's data); `held_out` is a phrasing of each sum never trained on."""

    demonstrations: list[QA]
    prompts: list[QA]
    held_out: list[QA]


def slipped_sum(a: int, b: int) -> str:
    """a + b with the carry from the units forgotten."""
    return str((a // 10 + b // 10) * 10 + (a + b) % 10)


def slip_task(seed: int, n_sums: int, copies: int, slip_share: float) -> SlipTask:
    """`n_sums` sums of two two-digit numbers whose units carry; each trained phrasing is
    demonstrated `copies` times, `slip_share` of a sum's demonstrations with the slipped answer."""
    rng = random.Random(seed + 1)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_sums:
        a, b = rng.randrange(10, 60), rng.randrange(10, 40)
        if a % 10 + b % 10 >= 10:
            pairs.add((a, b))
    demonstrations, prompts, held_out = [], [], []
    for a, b in sorted(pairs):
        hold = rng.randrange(len(ADDITION))
        trained = [p.format(a=a, b=b) for k, p in enumerate(ADDITION) if k != hold]
        held_out.append(QA(ADDITION[hold].format(a=a, b=b), str(a + b)))
        prompts += [QA(q, str(a + b)) for q in trained]
        shown = [q for q in trained for _ in range(copies)]
        slips = set(rng.sample(range(len(shown)), round(slip_share * len(shown))))
        demonstrations += [QA(q, slipped_sum(a, b) if i in slips else str(a + b)) for i, q in enumerate(shown)]
    return SlipTask(demonstrations, prompts, held_out)


def statements(seed: int = 0, n_countries: int = 30) -> list[str]:
    """Every fact of `make_task(seed, n_countries)` in each of its statement forms."""
    facts = _facts(random.Random(seed), n_countries)
    return [form.format(**fields, answer=answer) for phrasings, fields, answer in facts
            for form in STATEMENTS[phrasings]]


def pretraining_documents(sentences: list[str], rng: random.Random, copies: int, per_document: int) -> list[dict]:
    """`copies` shuffles of the statements, cut into documents of `per_document` sentences."""
    docs = []
    for _ in range(copies):
        order = sentences[:]
        rng.shuffle(order)
        docs += [{"text": " ".join(order[i : i + per_document])} for i in range(0, len(order), per_document)]
    return docs


def transcript(record: dict, end_of_turn: str = "<|im_end|>") -> str:
    """A conversation as ChatML text, as a base model meets chats in its pretraining text. The
    final end-of-turn marker is left off: pretraining closes every document with EOS, which is
    that same token."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{end_of_turn}\n" for m in record["messages"])
    return text[: -len(end_of_turn + "\n")]


def conversations(train: list[QA], rng: random.Random, copies: int) -> list[dict]:
    """OpenAI-format records: mostly single questions, some two-question conversations (so
    multi-turn masking is exercised)."""
    records = []
    for _ in range(copies):
        order = train[:]
        rng.shuffle(order)
        i = 0
        while i < len(order):
            turns = 2 if rng.random() < 0.25 and i + 1 < len(order) else 1
            messages = []
            for qa in order[i : i + turns]:
                messages += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
            records.append({"messages": messages})
            i += turns
    return records


# ---------------------------------------------------------------------------------------------
# 2-8. Tokenizer, pretraining, SFT (full and LoRA), merge, evaluation, GRPO, report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoScale:
    n_countries: int
    hidden: int
    layers: int
    statement_copies: int
    pretrain_steps: int
    pretrain_learning_rate: float
    sft_copies: int
    sft_epochs: int
    sft_learning_rate: float
    lora_epochs: int
    lora_r: int
    lora_learning_rate: float
    slip_sums: int
    slip_copies: int
    slip_share: float
    grpo_steps: int
    grpo_learning_rate: float
    grpo_temperature: float


# Chosen by measurement on 2 CPU cores (docs/demo.md, "Results"): pretraining
# on the statements and the chats as transcripts; pretraining on the statements alone hurt, as
# full SFT from it needed half again as many epochs and LoRA on a base that had never seen a
# chat learned little.
# GRPO: 8 completions of at most 8 tokens for each of 8 prompts a step (64 completions), 40
# steps at 1e-4, temperature 1 — the first settings tried, on 2 CPU cores about 13 s; the
# fine-tuned model samples the true sum about a third of the time, which is what GRPO needs to
# find and reinforce it.
SCALE = DemoScale(n_countries=30, hidden=128, layers=4,
                  statement_copies=2, pretrain_steps=300, pretrain_learning_rate=3e-3,
                  sft_copies=3, sft_epochs=30, sft_learning_rate=3e-3,
                  lora_epochs=30, lora_r=32, lora_learning_rate=5e-3,
                  slip_sums=40, slip_copies=3, slip_share=2 / 3,
                  grpo_steps=40, grpo_learning_rate=1e-4, grpo_temperature=1.0)


def model_config(vocab_size: int, scale: DemoScale, tokenizer) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": scale.hidden,
        "intermediate_size": scale.hidden * 3,
        "num_hidden_layers": scale.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def prepare_dir(path: str) -> None:
    """Start from an empty directory; only a previous demo's directory is removed."""
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            if os.path.isdir(path) and not os.listdir(path):
                return
            raise LmforgeError(f"{path} exists and was not written by lmforge demo; choose another --output_dir")
        shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"created": time.time()}, f)


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@dataclass
class Evaluation:
    accuracy: float
    stopped: float
    """Fraction of generations that ended at the end-of-turn token."""
    wrong: list[tuple[QA, str]]


def evaluate(model_dir: str, held_out: list[QA]) -> Evaluation:
    """Greedy answers to the held-out questions: exact-answer accuracy, the stop rate, the
    wrong answers."""
    import torch

    from lmforge.chat import generate, load_for_chat

    torch.manual_seed(0)
    model, tokenizer = load_for_chat(model_dir, device="cpu")
    correct = stopped = 0
    wrong = []
    for qa in held_out:
        reply = generate(model, tokenizer, [{"role": "user", "content": qa.question}], max_new_tokens=16)
        correct += reply.text.strip() == qa.answer
        stopped += reply.stopped
        if reply.text.strip() != qa.answer:
            wrong.append((qa, reply.text))
    return Evaluation(correct / len(held_out), stopped / len(held_out), wrong)


class Stages:
    """Wall time of each stage of the pipeline, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], object]):
        print(f"demo: --- {name} ---", flush=True)
        start = time.time()
        try:
            return fn()
        finally:
            self.seconds[name] = round(time.time() - start, 1)


def training_flags(seed: int) -> list[str]:
    return ["--seed", str(seed), "--disable_tqdm", "True", "--report_to", "none", "--dataloader_pin_memory", "False",
            "--save_strategy", "no", "--weight_decay", "0.0", "--lr_scheduler_type", "cosine"]


def final_losses(run_dir: str) -> tuple[float | None, float | None]:
    """(last training loss, last evaluation loss) of a finished run."""
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    return loss, eval_loss


def reward_span(run_dir: str) -> tuple[float, float]:
    """(first, last) logged mean reward of a finished GRPO run."""
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        rewards = [h["reward"] for h in json.load(f)["log_history"] if "reward" in h]
    return rewards[0], rewards[-1]


def write_summary(out: str, result: dict, stages: Stages, held_out: int) -> str:
    """OUTPUT_DIR/report.md: the pipeline's stages, their times and results, and the loss
    curves of its training runs (each run's own report.md has the rest)."""
    lines = ["# lmforge demo", "", "The whole pipeline on a tiny model, on this machine's CPU "
             f"({result['total_seconds']} s in all).", "", "| stage | seconds | result |", "|---|---|---|"]
    runs = {"pretrain": "pretrain", "sft (full)": "model", "sft (LoRA)": "lora"}
    for name, seconds in stages.seconds.items():
        what = result["stages"].get(name, "")
        if name == "grpo":
            first, last = reward_span(os.path.join(out, "grpo"))
            what = (f"mean reward {first:.3f} at the first log, {last:.3f} at the last "
                    "([report](grpo/report.md))")
        elif name in runs:
            loss, eval_loss = final_losses(os.path.join(out, runs[name]))
            what = f"final loss {loss:.3f}" + (f", eval loss {eval_loss:.3f}" if eval_loss is not None else "")
            what += f" ([report]({runs[name]}/report.md))"
        lines.append(f"| {name} | {seconds} | {what} |")
    lines += ["", f"Held-out questions ({held_out}, phrasings never trained on for their fact): exact answers "
              f"{result['accuracy']:.1%} for the fully fine-tuned model, {result['lora_accuracy']:.1%} for the "
              f"merged LoRA model, {result['pretrained_accuracy']:.1%} for the pretrained model they started from; "
              "generations of the two that stopped at the end-of-turn token: "
              f"{result['stopped_at_end_of_turn']:.1%} and {result['lora_stopped_at_end_of_turn']:.1%}.", ""]
    lines += [f"Held-out carrying sums ({result['sums_held_out']}, phrasings never trained on; the fine-tuning data "
              "wrote most of them without the carry): exact answers "
              f"{result['sums_sft_accuracy']:.1%} after fine-tuning, {result['sums_grpo_accuracy']:.1%} after GRPO "
              "rewarded by the exact answer.", ""]
    for name, run in runs.items():
        if os.path.isfile(os.path.join(out, run, "report", "loss.png")):
            lines += [f"![{name} loss]({run}/report/loss.png)", ""]
    if os.path.isfile(os.path.join(out, "grpo", "report", "reward.png")):
        lines += ["![grpo reward](grpo/report/reward.png)", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: Sequence[str]) -> dict:
    (args,) = parse((DemoArguments,), argv)
    from lmforge.export import merge
    from lmforge import grpo, lora, pretrain, sft
    from lmforge.tokenizer import train_bpe_tokenizer

    start = time.time()
    scale, seed, out = SCALE, args.seed, args.output_dir
    path = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    prepare_dir(out)
    stages = Stages()
    notes: dict[str, str] = {}

    def task():
        rng = random.Random(seed)
        train, held_out = make_task(seed, scale.n_countries)
        slips = slip_task(seed, scale.slip_sums, scale.slip_copies, scale.slip_share)
        records = conversations(train, rng, scale.sft_copies) + conversations(slips.demonstrations, rng, 1)
        rng.shuffle(records)
        sentences = statements(seed, scale.n_countries)
        docs = pretraining_documents(sentences, rng, scale.statement_copies, 12)
        docs += [{"text": transcript(r)} for r in records]
        rng.shuffle(docs)
        write_jsonl(path("pretrain.jsonl"), docs)
        write_jsonl(path("train.jsonl"), records)
        write_jsonl(path("held_out.jsonl"), [qa.__dict__ for qa in held_out])
        # The held-out questions as chat records too: the fine-tuning runs' evaluation loss is
        # measured on them, so its curve shows generalisation, not memory.
        write_jsonl(path("held_out_chat.jsonl"), [{"messages": [{"role": "user", "content": qa.question},
                                                                {"role": "assistant", "content": qa.answer}]}
                                                   for qa in held_out])
        write_jsonl(path("grpo_prompts.jsonl"), [{"messages": [{"role": "user", "content": qa.question}],
                                                  "answer": qa.answer} for qa in slips.prompts])
        write_jsonl(path("held_out_sums.jsonl"), [qa.__dict__ for qa in slips.held_out])
        notes["task"] = (f"{len(docs)} pretraining documents; {len(train)} training questions and "
                         f"{len(slips.demonstrations)} demonstrations of {scale.slip_sums} carrying sums "
                         f"({scale.slip_share:.0%} without the carry) in {len(records)} conversations; "
                         f"{len(held_out)} + {len(slips.held_out)} held-out questions")
        print(f"demo: task: {notes['task']}")
        return records, sentences, held_out, slips

    records, sentences, held_out, slips = stages.run("task", task)

    def tokenizer():
        # Plain text only: the transcripts' ChatML markers are special tokens, not text to learn merges from.
        texts = sentences + [m["content"] for r in records for m in r["messages"]]
        asked = [qa.question for qa in held_out + slips.held_out] + [qa.answer for qa in slips.prompts]
        tok = train_bpe_tokenizer(texts + asked, vocab_size=512)
        tok.save_pretrained(path("tokenizer"))
        with open(path("model_config.json"), "w") as f:
            json.dump(model_config(len(tok), scale, tok), f, indent=1)
        notes["tokenizer"] = f"byte-level BPE, {len(tok)} tokens, ChatML template"
        print(f"demo: tokenizer: {notes['tokenizer']}")

    stages.run("tokenizer", tokenizer)
    common = training_flags(seed)
    stages.run("pretrain", lambda: pretrain.main([
        "--config_name", path("model_config.json"), "--tokenizer_name", path("tokenizer"),
        # No --pretrain_document_mask: EOS is also the end-of-turn token here, so the mask would
        # cut every question off from its answer.
        "--train_files", path("pretrain.jsonl"), "--block_size", "128", "--val_split", "0.05",
        "--data_cache_dir", path("cache"), "--output_dir", path("pretrain"),
        "--max_steps", str(scale.pretrain_steps), "--per_device_train_batch_size", "16",
        "--learning_rate", str(scale.pretrain_learning_rate), "--warmup_steps", "30",
        "--logging_steps", "30", "--eval_strategy", "steps", "--eval_steps", "100", *common]))
    sft_data = ["--data_path", path("train.jsonl"), "--eval_data_path", path("held_out_chat.jsonl"),
                "--data_cache_dir", path("cache"), "--model_max_length", "128", "--per_device_train_batch_size", "32",
                "--warmup_steps", "20", "--logging_steps", "25", "--eval_strategy", "steps", "--eval_steps", "100",
                "--eval_samples", "3", "--eval_sample_tokens", "8"]
    stages.run("sft (full)", lambda: sft.main([
        "--model_name_or_path", path("pretrain"), "--output_dir", path("model"), *sft_data,
        "--num_train_epochs", str(scale.sft_epochs), "--learning_rate", str(scale.sft_learning_rate), *common]))
    stages.run("sft (LoRA)", lambda: lora.main([
        "--model_name_or_path", path("pretrain"), "--output_dir", path("lora"), *sft_data,
        "--lora_r", str(scale.lora_r), "--lora_alpha", str(2 * scale.lora_r), "--lora_dropout", "0.0",
        "--num_train_epochs", str(scale.lora_epochs), "--learning_rate", str(scale.lora_learning_rate), *common]))

    def merged():
        import torch

        with torch.no_grad():
            merge(path("pretrain"), path("lora"), path("lora-merged"))
        notes["merge"] = "lora-merged/: the adapter merged into the pretrained model"

    stages.run("merge", merged)
    base, full, lora_eval = stages.run("evaluate", lambda: (
        evaluate(path("pretrain"), held_out), evaluate(path("model"), held_out), evaluate(path("lora-merged"), held_out)))
    sums_before = stages.run("evaluate sums", lambda: evaluate(path("model"), slips.held_out))
    stages.run("grpo", lambda: grpo.main([
        "--model_name_or_path", path("model"), "--output_dir", path("grpo"), "--data_path", path("grpo_prompts.jsonl"),
        "--reward_funcs", "accuracy", "--num_generations", "8", "--per_device_train_batch_size", "64",
        "--max_prompt_length", "64", "--max_completion_length", "8", "--temperature", str(scale.grpo_temperature),
        "--max_steps", str(scale.grpo_steps), "--learning_rate", str(scale.grpo_learning_rate),
        "--warmup_steps", "0", "--logging_steps", "5", "--log_completions", "2", *common]))
    sums_after = stages.run("evaluate grpo", lambda: evaluate(path("grpo"), slips.held_out))
    notes["grpo"] = (f"held-out carrying sums: {sums_before.accuracy:.1%} after fine-tuning, "
                     f"{sums_after.accuracy:.1%} after GRPO")
    print(f"demo: {notes['grpo']}")
    result = {
        "sums_held_out": len(slips.held_out),
        "sums_sft_accuracy": sums_before.accuracy,
        "sums_grpo_accuracy": sums_after.accuracy,
        "held_out": len(held_out),
        "pretrained_accuracy": base.accuracy,
        "accuracy": full.accuracy,
        "stopped_at_end_of_turn": full.stopped,
        "lora_accuracy": lora_eval.accuracy,
        "lora_stopped_at_end_of_turn": lora_eval.stopped,
        "stage_seconds": stages.seconds,
        "stages": notes,
        "total_seconds": round(time.time() - start, 1),
    }
    notes["evaluate"] = (f"exact answers: pretrained {base.accuracy:.1%}, full SFT {full.accuracy:.1%}, "
                         f"LoRA merged {lora_eval.accuracy:.1%}")
    for qa, got in full.wrong[:10]:
        print(f"demo: wrong: {qa.question!r} -> {got!r} (expected {qa.answer!r})")
    n = len(held_out)
    print(f"demo: held-out exact-answer accuracy: {full.accuracy:.1%} ({n - len(full.wrong)}/{n}) fully fine-tuned, "
          f"{lora_eval.accuracy:.1%} ({n - len(lora_eval.wrong)}/{n}) LoRA merged, {base.accuracy:.1%} pretrained only")
    print(f"demo: generations that stopped at the end-of-turn token: {full.stopped:.1%} and {lora_eval.stopped:.1%}")
    report = write_summary(out, result, stages, n)
    print(f"demo: stages (s): {', '.join(f'{k} {v}' for k, v in stages.seconds.items())}")
    print(f"demo: done in {result['total_seconds']} s; report in {report}; model in {path('model')} "
          f"(try: lmforge chat {path('model')} --prompt 'What is 3 + 4?')")
    with open(path("result.json"), "w") as f:
        json.dump(result, f, indent=1)
    if full.accuracy < args.min_accuracy:
        raise LmforgeError(f"held-out accuracy {full.accuracy:.1%} is below --min_accuracy {args.min_accuracy:.0%}")
    return result
