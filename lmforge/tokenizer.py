"""Train a byte-level BPE tokenizer with a ChatML chat template (through `tokenizers`), saved so
that `AutoTokenizer.from_pretrained` loads it: the from-scratch path, where no pretrained
tokenizer fits the data."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.templates import CHATML_USER

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = (PAD, IM_START, IM_END)


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
