#!/usr/bin/env bash
# The GPU check quoted in the README, run on the device machine from the repository root:
#   bash scripts/gpu_check.sh DATA_DIR
# DATA_DIR mirrors ../shared/data (the Qwen2.5 tokenizer and the FastChat dummy conversations).
# It installs carried wheels from .whl/ if any, prints the stack, runs the test suite, then a
# 50-step `lmforge sft` of a Qwen2.5-0.5B-shaped model (config only, random init, bf16) and
# loads the output in plain transformers to generate.
set -uo pipefail
DATA=${1:-../shared/data}
OUT=${OUT:-/tmp/lmforge-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) >= 24)'; then
    wheels=.whl/*.whl
  else
    wheels=$(ls .whl/*.whl | grep -v pyarrow)
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 - <<'PY'
import torch, transformers, peft, accelerate, datasets, pyarrow, tokenizers
print("stack:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| accelerate", accelerate.__version__, "| datasets", datasets.__version__,
      "| pyarrow", pyarrow.__version__, "| tokenizers", tokenizers.__version__)
PY
echo "== tests (GPU stack) =="
LMFORGE_SHARED_DATA=$DATA python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -5
echo "== sft: Qwen2.5-0.5B shape, random init, bf16, 50 steps =="
rm -rf "$OUT/sft"
python3 -m lmforge sft --config_name "$DATA/tokenizers/qwen2.5-0.5b-instruct" \
  --tokenizer_name "$DATA/tokenizers/qwen2.5-0.5b-instruct" \
  --data_path "$DATA/fastchat_dummy_conversation.json" --output_dir "$OUT/sft" \
  --bf16 True --tf32 True --max_steps 50 --per_device_train_batch_size 8 --learning_rate 1e-4 \
  --warmup_steps 5 --model_max_length 2048 --logging_steps 10 --save_steps 25 --report_to none \
  --disable_tqdm True --data_cache_dir "$OUT/cache" 2>&1 | grep -v Warning
echo "== load in plain transformers and generate =="
python3 - "$OUT/sft" <<'PY'
import sys, torch, json
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda()
n = sum(p.numel() for p in model.parameters())
ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                              return_tensors="pt")["input_ids"].cuda()
gen = model.generate(ids, max_new_tokens=40, do_sample=False)
new = gen[0, ids.shape[1]:].tolist()
print(f"params {n/1e6:.1f}M; generated {len(new)} tokens; ended with <|im_end|>: {new[-1] == tok.convert_tokens_to_ids('<|im_end|>')}")
print("answer:", repr(tok.decode(new, skip_special_tokens=True)))
state = json.load(open(f"{out}/trainer_state.json"))
print("losses:", [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h])
print("peak GPU memory (GiB):", round(torch.cuda.max_memory_allocated() / 2**30, 2))
PY
