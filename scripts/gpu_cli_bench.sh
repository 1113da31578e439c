#!/usr/bin/env bash
# The side-by-side throughput of the command lines (bench/cli_throughput.py) on the GPU device,
# from the repository root:
#   ROWS="0.5b-full-seed 0.5b-full-trl 0.5b-full-lmforge" bash scripts/gpu_cli_bench.sh
# Wheels in .whl/ (trl, datasets, dill, multiprocess, liger-kernel; bitsandbytes for QLoRA rows;
# cut-cross-entropy for PARTS=cce)
# are installed first; DATA (default .devdata) holds tokenizers/qwen2.5-0.5b-instruct and what
# TESTS (pytest arguments, optional; their output in $OUT/tests.log) read; PARTS (optional) names
# parts of bench/step_parts.py to time first; MEMORY=1 adds each row's peak-memory breakdown.
# The table and results.json go to $OUT when set. The Hopper wheels (flash-attn-4, torchao) are
# installed when they travel: scripts/gpu_hopper_env.sh says how, over two calls.
set -uo pipefail
DATA=${DATA:-.devdata}
W=${W:-/tmp/lmforge-cli-bench}
OUT=${OUT:-$W}
mkdir -p "$W" "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
source scripts/gpu_hopper_env.sh  # flash-attn-4 / torchao where .hopper* travelled (see that file)
export LMFORGE_CACHE=$W/cache TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
  LMFORGE_SHARED_DATA=$DATA timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rfEs $TESTS \
    > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/tests.log" | tail -12
fi
if [ -n "${PARTS:-}" ]; then  # parts of a step timed alone (bench/step_parts.py)
  timeout "${PARTS_TIMEOUT:-180}" python3 bench/step_parts.py $PARTS 2>&1 | grep -v Warning | tail -20
fi
[ -z "${ROWS-x}" ] && exit 0  # ROWS set and empty: tests and parts only
python3 bench/cli_throughput.py --tokenizer "$DATA/tokenizers/qwen2.5-0.5b-instruct" --work "$W" \
  --rows ${ROWS:-0.5b-full-seed 0.5b-full-trl 0.5b-full-lmforge} --steps "${STEPS:-50}" --warmup "${WARMUP:-10}" \
  --timeout "${ROW_TIMEOUT:-300}" --profile "${PROFILE:-0}" ${MEMORY:+--memory} 2>&1 | tee "$OUT/bench.log" | cut -c1-2000
cp "$W/results.json" "$W"/results/*.trace.json.gz "$W"/results/*.memory.txt "$OUT/" 2>/dev/null || true
