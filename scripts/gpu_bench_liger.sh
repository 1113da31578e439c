#!/usr/bin/env bash
# GPU: the SFT throughput bench with and without Liger kernels (liger-kernel wheel carried).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/datasets*.whl .whl/dill*.whl .whl/multiprocess*.whl .whl/liger_kernel*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))"
python3 bench/sft_throughput.py --shapes qwen2.5-0.5b llama-3.2-1b --steps 16 --attn sdpa --liger 2>&1 | grep -vE "Warning|warn" | tail -8
