#!/usr/bin/env bash
# GPU: the host-wait audit and the SFT bench rows after the batch-extras /
# no-mask / unrepeated-heads changes. SHAPES / METHODS / ONLY / STEPS select;
# NO_TESTS skips the GPU tests; AUDIT=1 adds --sync_audit. Full log in $OUT/host-wait-SHAPE-METHOD.log.
set -uo pipefail
W=/tmp/lmforge-gpu
mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH LMFORGE_CACHE=$W/cache PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/host-wait-${SHAPES:-qwen2.5-0.5b}-${METHODS:-full}.log
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "
import torch, transformers, inspect
from lmforge.modeling import attention
from torch.nn.attention.varlen import varlen_attn
attention.register_varlen()
print('torch', torch.__version__, 'transformers', transformers.__version__, 'varlen_attn', inspect.signature(varlen_attn))
print('varlen: enable_gqa', attention._Kernel.gqa, 'native grouped heads', attention._Kernel.native_gqa)"
if [ -z "${NO_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/modeling/test_varlen.py} 2>&1 | tail -8
fi
python3 bench/sft_throughput.py --shapes ${SHAPES:-qwen2.5-0.5b} --methods ${METHODS:-full} --steps ${STEPS:-24} \
  ${AUDIT:+--sync_audit} --only ${ONLY:-seed-style lmforge+compile+varlen+bf16 lmforge+compile+flex+bf16} 2>&1 \
  | grep -vE "Warning|warnings.warn|Loading weights"
} 2>&1 | tee $LOG | grep -E "^\{\"|device:|^run|^qwen|^llama|rror|Traceback|sync audit|/step|passed|failed|skipped|varlen|torch"
