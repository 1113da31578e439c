"""Load the tokenizer and the model: from weights (`--model_name_or_path`) or from a config with
random weights (`--config_name`). Attention is chosen through `attn_implementation`; nothing
is patched."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os

import torch
import transformers

from lmforge.config import read_json_object
from lmforge.errors import LmforgeError
from lmforge.flags import LoraArguments, ModelArguments
from lmforge.logs import library_bars, say
from lmforge.modeling.attention import VARLEN, register_varlen

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto",
          None: torch.float32}  # None: --torch_dtype not chosen yet (lmforge.training.fast_path chooses it for a run)


def custom_code_requests(path: str) -> list[str]:
    """The `auto_map` entries (class references into Python files shipped with the model) that
    the config and tokenizer config at `path` ask transformers to import, as "file: Auto -> ref"."""
    names = ("config.json", "tokenizer_config.json")
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in names]
    requests = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue  # a file that does not parse is reported by the loader itself
        for auto, ref in sorted(auto_map.items()):
            refs = ref if isinstance(ref, str) else ", ".join(map(str, ref))  # tokenizers map to [slow, fast]
            requests.append(f"{os.path.basename(file)}: {auto} -> {refs}")
    return requests


def _from_local(loader, flags: list[tuple[str, str | None]], what: str, missing: str, trust_remote_code: bool):
    """`loader.from_pretrained` on the first of `flags` that is set, with an error naming the
    flag and the path for a path that does not exist or does not load."""
    flag, path = next(((f, p) for f, p in flags if p), (None, None))
    if path is None:
        raise LmforgeError(missing)
    if not os.path.exists(path):
        raise LmforgeError(f"{flag} {path}: no such file or directory (lmforge loads models from local paths only)")
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        # transformers decides when custom code is needed (a model type it lacks); when it
        # refuses, say which file asks for which code and the one flag that allows it.
        requests = [] if trust_remote_code else custom_code_requests(path)
        if requests and "trust_remote_code" in str(e):
            raise LmforgeError(
                f"{flag} {path}: the {what} needs Python code shipped with the model ({'; '.join(requests)}); "
                "lmforge runs no code from a model directory unless you pass --trust_remote_code True") from None
        raise LmforgeError(f"{flag} {path}: cannot load a {what}: {e}") from None


def load_tokenizer(args: ModelArguments):
    tokenizer = _from_local(
        transformers.AutoTokenizer,
        [("--tokenizer_name", args.tokenizer_name), ("--model_name_or_path", args.model_name_or_path)],
        "tokenizer",
        "no tokenizer: pass --tokenizer_name (required with --config_name) or --model_name_or_path",
        args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token serves.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _check_config_json(args: ModelArguments) -> None:
    """A model config that is not JSON, named with its line and column (transformers says only
    "not a valid JSON file")."""
    flag, path = next(((f, p) for f, p in (("--config_name", args.config_name),
                                           ("--model_name_or_path", args.model_name_or_path)) if p), (None, None))
    if path is None:
        return
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.isfile(file):
        read_json_object(file, flag)


def load_config(args: ModelArguments):
    _check_config_json(args)
    return _from_local(
        transformers.AutoConfig,
        [("--config_name", args.config_name), ("--model_name_or_path", args.model_name_or_path)],
        "model config",
        "no model: pass --model_name_or_path (weights) or --config_name (a config, random init)",
        args.trust_remote_code,
    )


def attention_implementation(args: ModelArguments, flash_attn: bool = False, head_dim: int | None = None) -> str:
    """The attention kernel. `auto` (the default) and `--flash_attn True` (FastChat's flag) ask
    for the fastest one this install has: flash-attn 2's kernels when `--flash_attn` and the
    package are there; else on a GPU lmforge's varlen attention over the packed documents
    (flash-attn-4's kernel on Hopper / Blackwell where installed, else PyTorch's own flash
    kernel); else SDPA. The choice is logged. `head_dim`: the model's attention head size."""
    if args.attn_implementation in ("varlen", VARLEN):
        return varlen_implementation(args.varlen_kernel, head_dim)
    if args.attn_implementation != "auto" and not flash_attn:
        return args.attn_implementation
    gpu = torch.cuda.is_available()
    if flash_attn and gpu and _find("flash_attn.flash_attn_interface"):  # flash-attn 2 (4 is flash_attn.cute)
        choice, why = "flash_attention_2", "flash-attn is installed"
    elif gpu and _find("torch.nn.attention.varlen"):
        return varlen_implementation(args.varlen_kernel, head_dim)
    else:
        choice, why = "sdpa", "no GPU: flash kernels need CUDA" if not gpu else "this PyTorch has no varlen kernel"
    say(f"lmforge: attention: {choice} ({why})")
    return choice


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


def varlen_implementation(kernel: str = "auto", head_dim: int | None = None) -> str:
    """lmforge's varlen attention (lmforge/modeling/attention.py) over the packed documents, registered
    with transformers, its kernel chosen by `attention.choose_kernel` and logged."""
    from lmforge.kernels import flash4
    from lmforge.modeling.attention import choose_kernel

    if not torch.cuda.is_available():
        raise LmforgeError("--attn_implementation varlen runs a flash kernel, which needs a CUDA GPU; "
                           "on CPU use sdpa (packed documents are kept apart by a mask there)")
    chosen, why = choose_kernel(kernel, torch.cuda.get_device_capability(), flash4.installed(), head_dim)
    try:
        register_varlen(chosen)
    except ImportError as e:
        raise LmforgeError(f"--attn_implementation varlen with the {chosen} kernel cannot import it ({e}); "
                           f"PyTorch's needs PyTorch 2.9 or newer, this is {torch.__version__}") from None
    say(f"lmforge: attention: varlen over the packed documents, {chosen} kernel ({why})")
    return VARLEN


def apply_rope_scaling(config, model_max_length: int | None) -> None:
    """Linear RoPE scaling when training past the model's native context: factor =
    ceil(model_max_length / max_position_embeddings), as FastChat's train.py does. Written as
    transformers 5 `rope_parameters` (keeping rope_theta), which the older `rope_scaling` dict
    FastChat's train.py sets no longer fills in."""
    native = getattr(config, "max_position_embeddings", None)
    if not native or not model_max_length or model_max_length <= native:
        return
    factor = float(math.ceil(model_max_length / native))
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"rope_type": "linear", "factor": factor})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    config.rope_parameters = params
    say(f"lmforge: model_max_length {model_max_length} > max_position_embeddings {native}: linear RoPE scaling, "
        f"factor {factor:g}")


def quantization_config(lora: LoraArguments):
    """4-bit NF4 with double quantisation and bf16 compute: QLoRA's recipe."""
    if not lora.q_lora:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LmforgeError("--q_lora needs bitsandbytes (pip install 'lmforge[qlora]'), which runs on CUDA GPUs")
    if not torch.cuda.is_available():
        raise LmforgeError("--q_lora needs a CUDA GPU: bitsandbytes' 4-bit training kernels do not run on CPU")
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def check_weights(args: ModelArguments) -> None:
    """A --model_name_or_path directory without weight files fails here, in one line, before the
    data is tokenized (transformers would say so only when the model loads)."""
    path = args.model_name_or_path
    if args.config_name or not path or not os.path.isdir(path):
        return
    if not any(name.endswith(WEIGHT_FILES) or name.endswith(".index.json") for name in os.listdir(path)):
        raise LmforgeError(f"--model_name_or_path {path}: no weights there (no *.safetensors or pytorch_model*.bin); "
                           f"to train from random weights built from its config, pass --config_name {path}")


def check_vocabulary(args: ModelArguments, config, tokenizer) -> None:
    """A tokenizer with more tokens than the weights have embeddings belongs to another model (the
    demo's 512-token model with Qwen's 151,665-token tokenizer): refused unless asked for, as
    growing the embedding would train a model whose new rows are random. Fewer tokens than rows
    is usual (Qwen pads its table to a multiple of 64)."""
    rows = config.get_text_config().vocab_size
    if len(tokenizer) <= rows or args.config_name or args.resize_token_embeddings:
        return
    raise LmforgeError(
        f"the tokenizer has {len(tokenizer):,} tokens, the model at {args.model_name_or_path} {rows:,} embeddings: "
        "they do not belong together (check --tokenizer_name). To add the missing rows (new, untrained "
        "embeddings), pass --resize_token_embeddings True")


def head_size(config) -> int | None:
    """The model's attention head size (its config's head_dim, else hidden / heads)."""
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    return getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)


def load_model(args: ModelArguments, tokenizer, flash_attn: bool = False, model_max_length: int | None = None,
               lora: LoraArguments | None = None, progress_bars: bool = False):
    """The causal LM to train, with `use_cache` off (training recomputes every position).
    transformers' "Loading weights" bar is shown only with `progress_bars` (a run with bars,
    --disable_tqdm False)."""
    config = load_config(args)
    check_vocabulary(args, config, tokenizer)
    apply_rope_scaling(config, model_max_length)
    dtype = DTYPES[args.torch_dtype]
    attn = attention_implementation(args, flash_attn, head_dim=head_size(config))
    quant = quantization_config(lora) if lora else None
    from_weights = bool(args.model_name_or_path and not args.config_name)
    if lora and lora.lora and not from_weights:
        raise LmforgeError("--lora needs a base model with weights (--model_name_or_path); a model built from "
                           "--config_name has random weights that an adapter cannot be saved against")
    try:
        if from_weights:
            extra = {}
            if quant is not None:
                # 4-bit weights are placed on this process' GPU at load time.
                extra = {"quantization_config": quant, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
                dtype = torch.bfloat16
            # The absolute path: PEFT records it in adapter_config.json as the base model, which
            # must load from wherever the adapter is used (users move directories).
            with library_bars(progress_bars):
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    os.path.abspath(args.model_name_or_path), config=config, dtype=dtype, attn_implementation=attn,
                    trust_remote_code=args.trust_remote_code, **extra,
                )
        else:
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation=attn,
                trust_remote_code=args.trust_remote_code,
            )
    except (ImportError, ValueError) as e:
        raise LmforgeError(f"cannot build the model ({attn} attention, {args.torch_dtype}): {e}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # A config smaller than the tokenizer would index past the embedding table.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    if quant is not None and lora.q_lora_embeddings:
        quantize_frozen_embeddings(model, lora)
    align_token_ids(model, tokenizer)
    model.config.use_cache = False
    return model


def align_token_ids(model, tokenizer) -> None:
    """The model's config and generation config take the tokenizer's PAD / BOS / EOS ids, as the
    Trainer does when training starts; done here, when the model loads, and silently: the
    Trainer's own alignment then finds nothing to change, and its warning (printed on every run
    whose tokenizer was given a pad token) says nothing a user must act on."""
    try:
        from transformers.trainer_utils import align_special_tokens
    except ImportError:  # a transformers without it aligns nothing at training start either
        return
    logger = logging.getLogger("transformers.trainer_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        align_special_tokens(model, tokenizer)
    finally:
        logger.setLevel(level)


def quantize_frozen_embeddings(model, lora: LoraArguments) -> None:
    """QLoRA: the embedding and head in 4-bit too (lmforge.modeling.quantize says why), unless one of
    them is trained through --modules_to_save or cannot be stored that way; either is logged."""
    from lmforge.modeling.quantize import embeddings_quantizable, quantize_embeddings

    names = {n for n, m in model.named_modules() if m is model.get_input_embeddings()
             or m is model.get_output_embeddings()}
    trained = [m for m in lora.modules_to_save if any(n == m or n.endswith("." + m) for n in names)]
    why = (f"--modules_to_save {','.join(trained)} trains them" if trained else embeddings_quantizable(model))
    if why:
        say(f"lmforge: QLoRA: embedding and head kept in bf16: {why}")
        return
    # The same storage dtype as the quantised linear layers (bf16, which FSDP can shard).
    done = quantize_embeddings(model, quant_storage=torch.bfloat16)
    say(f"lmforge: QLoRA: 4-bit NF4 {' and '.join(done)}")


def prepare_kbit_model(model) -> None:
    """k-bit preparation for QLoRA: freeze every base weight and keep the norms in fp32.

    Written here rather than with `peft.prepare_model_for_kbit_training` because that function
    casts every non-quantised weight to fp32, the (tied) embedding and output head included:
    with a 150k vocabulary that adds over 1 GiB to a 1B model and made plain HF + PEFT QLoRA
    peak higher than bf16 LoRA at the same batch. The head stays in bf16; the norms, small,
    go to fp32 for stable statistics. Gradient checkpointing, when asked, is turned on by the
    Trainer, and `apply_lora` keeps the input gradients it needs.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            module.to(torch.float32)


def check_module_names(model, names: list[str], flag: str) -> None:
    """Every name of `names` must match a module of `model` the way PEFT matches a list entry
    (the whole module path, or its tail after a dot). PEFT itself only refuses a list of which
    no name matches: `q_proj,qproj` would train q_proj alone and say nothing of the typo."""
    paths = [name for name, _ in model.named_modules() if name]
    unknown = [n for n in names if not any(p == n or p.endswith("." + n) for p in paths)]
    if unknown:
        leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and not any(m.children())})
        raise LmforgeError(f"{flag}: the model has no module named {', '.join(map(repr, unknown))}; "
                           f"its layer names are {', '.join(leaves)}")


def is_peft(model) -> bool:
    """Whether `model` is a PEFT model (LoRA adapters over a base model)."""
    return hasattr(model, "peft_config")


def apply_lora(model, lora: LoraArguments, gradient_checkpointing: bool = False,
               adapter_dtype: torch.dtype | None = None):
    """Wrap `model` with LoRA adapters through PEFT (k-bit preparation first under QLoRA).

    `adapter_dtype` (lmforge.modeling.optim.adapter_dtype): the trained weights are held in it, 16 bits,
    and the optimizer keeps their fp32 masters. PEFT otherwise keeps adapters in fp32 beside a
    16-bit base, and every adapted layer casts its input to fp32 and back on each use: two copies
    of the activations per linear layer, forward and backward (a fifth of the GPU time of LoRA
    DPO on the 0.5B shape, and as many extra kernels for a step bound by launching them). The
    computation is the same: autocast gives the matmul the same 16-bit rounding of the weight."""
    import peft

    if lora.lora_target_modules != ["all-linear"]:
        check_module_names(model, lora.lora_target_modules, "--lora_target_modules")
    check_module_names(model, lora.modules_to_save, "--modules_to_save")

    if lora.q_lora:
        prepare_kbit_model(model)
    config = peft.LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules[0] if lora.lora_target_modules == ["all-linear"]
        else lora.lora_target_modules,
        bias=lora.lora_bias,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise LmforgeError(f"cannot add LoRA adapters ({lora.lora_target_modules}): {e}") from None
    if adapter_dtype is not None:
        for param in model.parameters():
            if param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(adapter_dtype)
    if gradient_checkpointing or lora.q_lora:
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the graph.
        model.enable_input_require_grads()
    return model


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The model's decoder blocks: its modules of the classes it names in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_blocks(model, mode: str = "default", memory_budget: float = 1.0) -> int:
    """torch.compile every decoder block in place (regional compilation: the blocks share one
    compiled graph, so compiling costs about one block's time, not the model's). Returns how
    many were compiled; the block classes are the model's `_no_split_modules`. The blocks
    compile at their first call, under the settings of `compile_settings` (`memory_budget` is
    only said here)."""
    blocks = decoder_blocks(model)
    names = {type(b).__name__ for b in blocks}
    for block in blocks:
        block.compile(mode=None if mode == "default" else mode)
    say(f"lmforge: compiled {len(blocks)} decoder blocks ({', '.join(sorted(names)) or 'none found'}), "
        f"mode {mode}" + (f", activation memory budget {memory_budget:g}" if memory_budget < 1 else ""))
    return len(blocks)


def compile_settings(memory_budget: float = 1.0, blocks: int = 0, float8: bool = False) -> contextlib.ExitStack:
    """The compiler's settings compiled blocks run under, as a context (set while it is entered,
    as they were after): PyTorch's activation memory budget, read when a graph's backward is
    partitioned (below 1 the partitioner recomputes the cheapest activations instead of keeping
    them); and with float8 layers, room for one graph per block in dynamo's recompile limits
    (each block guards on its own float8 layers' config objects, so each compiles once; at the
    default limit of 8 the rest would fall back to eager, 2-3x slower than bf16)."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    stack = contextlib.ExitStack()
    stack.enter_context(functorch_config.patch(activation_memory_budget=memory_budget))
    if float8:
        room = 8 * (blocks + 1)
        stack.enter_context(dynamo_config.patch(
            recompile_limit=max(dynamo_config.recompile_limit, room),
            accumulated_recompile_limit=max(dynamo_config.accumulated_recompile_limit, 4 * room)))
    return stack


def gpu_memory_gib() -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
