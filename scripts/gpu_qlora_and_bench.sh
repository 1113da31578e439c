#!/usr/bin/env bash
# GPU: QLoRA with 4-bit embedding/head (tests, load memory), then the SFT bench
# (full SFT with fused loss / compiled blocks / Liger; LoRA and QLoRA rows).
set -uo pipefail
DATA=${DATA:-.devdata}
W=/tmp/lmforge-gpu
mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH LMFORGE_CACHE=$W/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
LMFORGE_SHARED_DATA=$DATA python3 -m pytest -q -p no:cacheprovider -rs tests/test_lora.py tests/modeling/test_loss.py 2>&1 | tail -4
for vocab in 128256; do
python3 - $W/llama1b-$vocab $vocab <<'PY'
import sys, json, torch, transformers
from lmforge.tokenizer import train_bpe_tokenizer
cfg = json.load(open("bench/configs/llama-3.2-1b.json")); cfg["vocab_size"] = int(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
train_bpe_tokenizer(["hello world"] * 10, 300).save_pretrained(sys.argv[1])
PY
python3 scripts/gpu_qlora_memory.py $W/llama1b-$vocab 2>&1 | grep -E "base after|Error|QLoRA"
done
python3 bench/sft_throughput.py --shapes ${SHAPES:-qwen2.5-0.5b llama-3.2-1b} --methods ${METHODS:-full} --liger 2>&1 | grep -vE "Warning|warn|Loading weights" | grep -E "^\{\"|device:|^run|^qwen|^llama|Error|error" | tail -40
