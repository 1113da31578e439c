"""`lmforge tokenizer train`: a byte-level BPE tokenizer with a ChatML chat template (through
`tokenizers`), saved so that `AutoTokenizer.from_pretrained` loads it: the from-scratch path,
where no pretrained tokenizer fits the data.

    lmforge tokenizer train --train_files corpus.txt --vocab_size 8192 --output_dir tok
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config import parse
from lmforge.data.sources import iter_documents
from lmforge.data.templates import (
    BUILTIN_SPECIAL_TOKENS,
    BUILTIN_TEMPLATES,
    CHATML_USER,
)
from lmforge.errors import LmforgeError
from lmforge.flags import DEFAULT_SPECIAL_TOKENS, TokenizerTrainArguments

PAD, IM_START, IM_END = DEFAULT_SPECIAL_TOKENS


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str = CHATML_USER,
):
    """A byte-level BPE tokenizer (any byte sequence encodes; digits are split one by one, as
    Llama and Qwen do, so numbers tokenize uniformly). `<|im_end|>` is EOS: the token a chat
    turn ends with and generation stops at."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END if IM_END in special_tokens else None,
        pad_token=PAD if PAD in special_tokens else None,
        additional_special_tokens=[t for t in special_tokens if t not in (PAD, IM_END)],
    )
    fast.chat_template = chat_template
    return fast


def main(argv: Sequence[str]) -> None:
    argv = list(argv)
    if {"-h", "--help", "--help_all"} & set(argv):  # `lmforge tokenizer --help` prints this before importing
        from lmforge.cli import help_text

        print(help_text("tokenizer"))
        return
    if not argv or argv[0] != "train":
        raise LmforgeError("usage: lmforge tokenizer train --train_files FILE [FILE ...] --vocab_size N --output_dir DIR")
    (args,) = parse((TokenizerTrainArguments,), argv[1:])
    if not args.train_files:
        raise LmforgeError("no text given (--train_files)")
    if args.template not in BUILTIN_TEMPLATES:
        raise LmforgeError(f"unknown --template {args.template!r}; choose one of {sorted(BUILTIN_TEMPLATES)}")
    needed = [t for t in BUILTIN_SPECIAL_TOKENS[args.template] if t not in args.special_tokens]
    if needed:
        raise LmforgeError(f"--template {args.template} needs the special tokens {needed}")
    texts = (text for path in args.train_files for _, text in iter_documents(path, args.text_field, args.text_split))
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size, tuple(args.special_tokens), BUILTIN_TEMPLATES[args.template])
    tokenizer.save_pretrained(args.output_dir)
    print(f"lmforge: saved a byte-level BPE tokenizer of {len(tokenizer)} tokens to {args.output_dir}")
