#!/usr/bin/env bash
# GPU: lmforge's varlen attention (PyTorch's built-in flash varlen kernel) — the GPU
# tests, then the SFT bench rows against flex. ONLY / SHAPES / METHODS select.
set -uo pipefail
DATA=${DATA:-.devdata}
W=/tmp/lmforge-gpu
mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH LMFORGE_CACHE=$W/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, 'varlen_attn', inspect.signature(varlen_attn))"
if [ -z "${NO_TESTS:-}" ]; then
LMFORGE_SHARED_DATA=$DATA python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/modeling/test_varlen.py tests/data/test_pack.py} 2>&1 | tail -6
fi
python3 bench/sft_throughput.py --shapes ${SHAPES:-qwen2.5-0.5b} --methods ${METHODS:-full} --steps ${STEPS:-16} \
  --only ${ONLY:-seed-style lmforge+compile+flex+bf16 lmforge+compile+varlen+bf16 lmforge+compile+varlen+bf16+budget lmforge+compile+varlen} 2>&1 \
  | grep -vE "Warning|warn|Loading weights" | grep -E "^\{\"|device:|^run|^qwen|^llama|Error|error|Traceback" | tail -40
