#!/usr/bin/env bash
# GPU: packed == unpacked in bf16 for sdpa and flex_attention, then the SFT throughput bench.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/datasets*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 bench/packed_equality_gpu.py 2>&1 | grep -E "packed vs|Error|error" | tail -5
python3 bench/sft_throughput.py --shapes qwen2.5-0.5b llama-3.2-1b --steps 16 --attn sdpa 2>&1 | grep -vE "Warning|warn" | tail -8
python3 bench/sft_throughput.py --shapes qwen2.5-0.5b --steps 16 --attn flex_attention 2>&1 | grep -vE "Warning|warn" | tail -5
