"""Chat templates: the tokenizer's own jinja template (`--template auto`) or a named built-in.

Every built-in is written as a jinja chat template, so there is one rendering path
(`tokenizer.apply_chat_template`) for all of them, and a model saved by lmforge carries the
template it was trained with: `AutoTokenizer.from_pretrained(out).apply_chat_template(...)`
reproduces the training text exactly.
"""

from __future__ import annotations

from lmforge.errors import LmforgeError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# FastChat's `vicuna_v1.1` conversation (sep_style ADD_COLON_TWO, sep " ", sep2 "</s>"):
#   "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"
# FastChat writes "</s>" and relies on the Llama tokenizer's BOS; here the turn closes with the
# tokenizer's own EOS token (which is "</s>" for the Llama tokenizers Vicuna uses) so that the
# model learns to emit a real end-of-turn token with any tokenizer.
VICUNA_V11 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}{% set turns = messages %}"
    "{% endif %}"
    "{{ system + ' ' }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('vicuna_v1.1 has no role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# happy-llm's Qwen-style SFT format (chapter 6.2): a system turn that defaults to
# "You are a helpful assistant.", the user's turns under the role name "human".
CHATML_HAPPY_LLM = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set system = 'You are a helpful assistant.' %}{% set turns = messages %}"
    "{% endif %}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>human\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ raise_exception('chatml has no role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Plain ChatML with the usual role names and no default system turn; the template that
# `lmforge demo` (and tokenizers lmforge trains) carry.
CHATML_USER = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "vicuna_v1.1": VICUNA_V11,
    "chatml": CHATML_HAPPY_LLM,
    "chatml_user": CHATML_USER,
}

# Tokens a built-in template needs in the vocabulary as single special tokens.
BUILTIN_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "vicuna_v1.1": (),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "chatml_user": ("<|im_start|>", "<|im_end|>"),
}


def resolve_template(tokenizer, template: str) -> str:
    """Return the jinja template to train with and install it on `tokenizer`.

    `auto` keeps the tokenizer's own template; a built-in name replaces it; anything else is an
    error naming the choices.
    """
    if template == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise LmforgeError(
                f"{tokenizer.name_or_path}: the tokenizer has no chat template; pass --template with one of "
                f"{sorted(BUILTIN_TEMPLATES)} (or use a tokenizer that ships one)"
            )
        return tokenizer.chat_template
    if template not in BUILTIN_TEMPLATES:
        raise LmforgeError(f"unknown --template {template!r}; choose 'auto' or one of {sorted(BUILTIN_TEMPLATES)}")
    _check_special_tokens(tokenizer, template)
    tokenizer.chat_template = BUILTIN_TEMPLATES[template]
    return tokenizer.chat_template


def _check_special_tokens(tokenizer, template: str) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in BUILTIN_SPECIAL_TOKENS[template] if t not in vocab]
    if missing:
        raise LmforgeError(
            f"--template {template} needs the tokens {missing} in the tokenizer's vocabulary as single "
            "tokens; this tokenizer lacks them"
        )
    if template == "vicuna_v1.1" and tokenizer.eos_token is None:
        raise LmforgeError("--template vicuna_v1.1 closes assistant turns with the EOS token; the tokenizer has none")
