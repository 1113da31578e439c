#!/usr/bin/env bash
# DPO on the GPU device, run from the repository root:
#   bash scripts/gpu_dpo.sh                 # one H100: tests, then LoRA DPO on a Qwen2.5-0.5B shape
#   SHAPE=tiny STEPS=6 bash scripts/gpu_dpo.sh   # a dry run of the same path on a CPU
# DATA (default .devdata) holds tokenizers/qwen2.5-0.5b-instruct (and what the tests read).
# It installs carried wheels from .whl/ if any, runs tests/test_dpo.py, then
# bench/dpo_throughput.py: random-init model, synthetic pairs (prompt ~300 tokens, answers ~200),
# LoRA r16 all-linear, bf16, 8 pairs a step. The last line: tokens/s, pairs/s, peak GPU memory.
set -uo pipefail
DATA=${DATA:-.devdata}
SHAPE=${SHAPE:-qwen2.5-0.5b}
STEPS=${STEPS:-40}
W=${W:-/tmp/lmforge-dpo}
mkdir -p "$W"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export LMFORGE_CACHE=$W/cache TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
$PY - <<'PY'
import torch, transformers, peft
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
print("stack:", dev, "| torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)
PY
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests/test_dpo.py =="
  LMFORGE_SHARED_DATA=$DATA timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_dpo.py 2>&1 | tail -6
fi
echo "== LoRA DPO, $SHAPE, random init, bf16, $STEPS steps =="
timeout 200 $PY bench/dpo_throughput.py --tokenizer "$DATA/tokenizers/qwen2.5-0.5b-instruct" --shape "$SHAPE" \
  --steps "$STEPS" --warmup "${WARMUP:-5}" --batch "${BATCH:-8}" --work "$W/bench" 2>&1 \
  | grep -vE "Warning|warn\(|Loading weights|Writing model|^\s*$" | tail -15
