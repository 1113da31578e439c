#!/usr/bin/env bash
# GPU checks for LoRA / QLoRA / DeepSpeed, run on the device machine from the repository root:
#   bash scripts/gpu_lora_deepspeed.sh DATA_DIR
# DATA_DIR mirrors ../shared/data. Wheels for bitsandbytes, deepspeed (+ hjson, pydantic) and
# datasets are carried in .whl/. Prints: the test suite on the GPU stack (QLoRA tests run
# there), bf16 LoRA vs QLoRA on a Llama-3.2-1B shape (memory after load, peak at 8 x 2048),
# and `deepspeed --module lmforge.sft` with the shipped zero2 / zero3 configs on one GPU.
set -uo pipefail
DATA=${1:-../shared/data}
W=/tmp/lmforge-gpu4
mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH LMFORGE_CACHE=$W/cache
TOK=$DATA/tokenizers/qwen2.5-0.5b-instruct
python3 -c "import torch, transformers, peft, bitsandbytes, deepspeed; print('stack:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep stack:
echo "== tests (GPU stack) =="
LMFORGE_SHARED_DATA=$DATA python3 -m pytest -q -p no:cacheprovider -x -rs tests 2>&1 | tail -6
echo "== base: Llama-3.2-1B shape, Qwen2.5 vocabulary, random init, bf16 =="
python3 - $TOK $W/llama1b <<'PY'
import sys, json, torch, transformers
cfg = json.load(open("bench/configs/llama-3.2-1b.json")); cfg["vocab_size"] = 151936
config = transformers.AutoConfig.for_model(**cfg)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2]); transformers.AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
print(f"params {sum(p.numel() for p in model.parameters())/1e9:.3f}B")
PY
for mode in lora q_lora; do
  echo "== $mode: pretrain --lora, 8 x 2048 tokens a step, gradient checkpointing, 8 steps =="
  flag="--lora True --torch_dtype bfloat16"; [ $mode = q_lora ] && flag="--q_lora True"
  python3 -m lmforge pretrain --model_name_or_path $W/llama1b --train_files $DATA/llama_factory/c4_demo.jsonl \
    --block_size 2048 --per_device_train_batch_size 8 --max_steps 8 --bf16 True --gradient_checkpointing True \
    --learning_rate 2e-4 --logging_steps 2 --save_strategy no --report_to none --disable_tqdm True \
    --output_dir $W/$mode $flag 2>&1 | grep -E "lmforge:|'loss'|train_runtime|Error|error" | grep -v "training text"
done
for z in zero2 zero3; do
  echo "== deepspeed --module lmforge.sft --deepspeed $z (one GPU, Qwen2.5-0.5B shape, 10 steps) =="
  deepspeed --num_gpus 1 --module lmforge.sft --config_name bench/configs/qwen2.5-0.5b.json --tokenizer_name $TOK \
    --data_path $DATA/fastchat_dummy_conversation.json --output_dir $W/$z --bf16 True --max_steps 10 \
    --per_device_train_batch_size 8 --learning_rate 1e-4 --logging_steps 5 --save_steps 5 --report_to none \
    --disable_tqdm True --deepspeed $z 2>&1 | grep -E "lmforge:|'loss'|train_runtime|Error|error" | grep -v "training data"
  python3 - $W/$z <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("saved model loads:", sys.argv[1], f"{sum(p.numel() for p in m.parameters())/1e6:.1f}M params,",
      "all finite:", all(torch.isfinite(p).all().item() for p in m.parameters()))
PY
done
