#!/usr/bin/env bash
# Second GPU check: the LoRA / QLoRA tests on the GPU stack, and base-model memory after loading
# (bf16 vs 4-bit) for the Llama-3.2-1B shape with the Qwen2.5 vocabulary and with its own.
set -uo pipefail
DATA=${1:-../shared/data}
W=/tmp/lmforge-gpu4b
mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH LMFORGE_CACHE=$W/cache
LMFORGE_SHARED_DATA=$DATA python3 -m pytest -q -p no:cacheprovider -rs tests/test_lora.py 2>&1 | tail -4
for vocab in 151936 128256; do
python3 - $DATA/tokenizers/qwen2.5-0.5b-instruct $W/llama1b-$vocab $vocab <<'PY'
import sys, json, torch, transformers
cfg = json.load(open("bench/configs/llama-3.2-1b.json")); cfg["vocab_size"] = int(sys.argv[3])
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
if cfg["vocab_size"] >= 151665:
    transformers.AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
else:  # a tokenizer smaller than the vocabulary, so the embedding keeps its 128,256 rows
    from lmforge.tokenizer import train_bpe_tokenizer
    train_bpe_tokenizer(["hello world"] * 10, 300).save_pretrained(sys.argv[2])
print(f"Llama-3.2-1B shape, vocab {sys.argv[3]}: {sum(p.numel() for p in model.parameters())/1e9:.3f}B params")
PY
python3 scripts/gpu_qlora_memory.py $W/llama1b-$vocab 2>&1 | grep -E "base after|Error"
done
