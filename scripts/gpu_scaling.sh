#!/usr/bin/env bash
# Scaling on 4 and 8 GPUs, on nvidia-h200-x8 (on nvidia-h200-x4: GPUS="2 4"), from the
# repository root:
#
#     bash scripts/gpu_scaling.sh          # the same command again until no row is pending
#
# Full SFT of a 7B shape (SHAPE, default bench/configs/qwen2.5-7b.json: 7.62B parameters, random
# init, saved once as the base with the Qwen2.5 tokenizer, whose 151,665 tokens fit its 152,064
# vocabulary) under FSDP2 full_shard (--fsdp "full_shard auto_wrap") and under DeepSpeed ZeRO-3
# (--deepspeed zero3) on each of GPUS (default 2 4 8), then LoRA (r 16, all linear layers, bf16
# base) under ZeRO-2 on LORA_GPUS (default 8). Every run is `torchrun --nproc_per_node N -m
# lmforge.sft`: packed rows of MAXLEN (2048) tokens, --bf16 True, BATCH rows per GPU a step (the
# global batch grows with N: scaling at a fixed load per GPU), STEPS (12) steps, timed from step
# WARMUP (4) on. The data are synthetic ShareGPT conversations whose lengths follow
# bench/sft_throughput.py's records. scripts/gpu_scaling_report.py then prints one row per run
# from lmforge's own logs (tokens_per_second, peak_gpu_memory_gib): useful tokens/s of all GPUs
# and per GPU, MFU (6N + attention per token against 989 TFLOP/s, the dense bf16 peak of an
# H100 and of an H200), peak memory, and the scaling efficiency against 2 GPUs of the same engine.
#
# Memory, and why gradient checkpointing (GC=True) with BATCH=4: full SFT holds fp32 weights,
# fp32 gradients and AdamW's two fp32 moments, 16 bytes a parameter = 122 GB for 7.62B; sharded
# that is 61 GB per GPU on 2 GPUs (ZeRO-3 adds bf16 copies: about 70 GB) and 15 GB on 8. Without
# checkpointing one 2048-token row keeps about 17 GB of activations on this shape, so 4 rows
# would not fit beside the 2-GPU states on a 141 GB H200; with it (FSDP: the fsdp_config's
# activation_checkpointing, which recomputes inside each sharded layer without a second
# all-gather; ZeRO: --gradient_checkpointing) 4 rows take a few GB. The recomputed forward is
# not counted in the MFU (model FLOPs, not hardware FLOPs).
#
# Each call runs what fits in TOTAL seconds (a device command may take 10 minutes; a 7B run takes
# a few) and leaves the rest pending; runs done are kept in W (under /tmp: as long as the machine
# stays warm), so the same command again goes on where the last one stopped, and every call
# prints the whole table. FRESH=1 starts over. A run is stopped once its last step is logged:
# lmforge's final save of a 7B model (gathered whole, 15-30 GB written) takes longer than the
# timed steps and is not what this measures; SAVE=1 keeps it (the report then reads
# trainer_state.json instead of the log). Every launch is killed, with all its processes, past
# LIMIT seconds or the end of TOTAL.
#
# CPU dry run (no GPU: FSDP runs as DDP there, DeepSpeed one process):
#     SKIP_INSTALL=1 DATA=../shared/data SHAPE=tiny GPUS=2 LORA_GPUS=2 DS_NPROC=1 STEPS=6 WARMUP=2 \
#         BATCH=1 MAXLEN=256 RECORDS=200 LIMIT=600 TOTAL=1800 nice -n 10 bash scripts/gpu_scaling.sh
set -uo pipefail
# NVLink multicast stays off on the shared device (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

DATA=${DATA:-.devdata}
SHAPE=${SHAPE:-bench/configs/qwen2.5-7b.json}
TOKENIZER=${TOKENIZER:-$DATA/tokenizers/qwen2.5-0.5b-instruct}
GPUS=${GPUS:-2 4 8}
ENGINES=${ENGINES:-fsdp zero3}
LORA_GPUS=${LORA_GPUS-8}     # empty: no LoRA run
DS_NPROC=${DS_NPROC:-}       # processes of every DeepSpeed run (CPU dry run: 1); default the GPU count
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
LOG_EVERY=${LOG_EVERY:-$WARMUP}  # logs sync the host with the GPUs: only as often as the timing needs
BATCH=${BATCH:-4}            # packed rows per GPU a step
MAXLEN=${MAXLEN:-2048}
RECORDS=${RECORDS:-3000}     # ~2M tokens: more than the 8-GPU runs' 12 x 8 x 4 rows of 2048
GC=${GC:-True}
SAVE=${SAVE:-0}
LIMIT=${LIMIT:-420}          # seconds one launch may take (loading the 7B base is most of it)
TOTAL=${TOTAL:-560}          # seconds for this call: no launch starts with less than MIN_START left
MIN_START=${MIN_START:-150}
PORT_BASE=${PORT_BASE:-29600}
W=${W:-/tmp/lmforge-scale-$(basename "$SHAPE" .json)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LMFORGE_CACHE=$W/cache
if [ $((STEPS % LOG_EVERY)) != 0 ] || [ $((WARMUP % LOG_EVERY)) != 0 ] || [ "$WARMUP" -ge "$STEPS" ]; then
    # The timing reads lmforge's logs: one must fall on step WARMUP and one on the last step.
    echo "gpu_scaling: STEPS ($STEPS) and WARMUP ($WARMUP) must be multiples of LOG_EVERY ($LOG_EVERY), WARMUP < STEPS"
    exit 2
fi

if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -n "${FRESH:-}" ] && rm -rf "$W"
mkdir -p "$W"/runs "$W"/logs "$W"/rc

# The runs of one work directory must be comparable: the settings they ran with are kept, and a
# call with others stops here (FRESH=1 or another W).
SETTINGS="SHAPE=$SHAPE BATCH=$BATCH STEPS=$STEPS WARMUP=$WARMUP LOG_EVERY=$LOG_EVERY MAXLEN=$MAXLEN RECORDS=$RECORDS GC=$GC"
if [ -f "$W"/settings ] && [ "$(cat "$W"/settings)" != "$SETTINGS" ]; then
    echo "gpu_scaling: $W holds runs made with $(cat "$W"/settings); this call has $SETTINGS: FRESH=1 or another W"
    exit 2
fi
echo "$SETTINGS" > "$W"/settings

GPU_COUNT=0
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
    GPU_COUNT=$(nvidia-smi -L | grep -c "^GPU")
fi
python3 -c "import torch, transformers, accelerate, peft, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__, 'GPUs', torch.cuda.device_count())" 2>&1 | grep -v "real_accelerator"
echo "gpu_scaling: $SETTINGS GPUS=\"$GPUS\" ENGINES=\"$ENGINES\" LORA_GPUS=$LORA_GPUS -> $W"

remaining() { echo $((TOTAL - SECONDS)); }

# Built once per work directory (the 7B base is 15 GB in bf16 and takes a minute or two), each
# step within LIMIT seconds.
python3 scripts/gpu_scaling_report.py check "$SHAPE" "$TOKENIZER" || exit 2
if [ ! -f "$W"/base.done ]; then
    rm -rf "$W"/base
    timeout -s KILL "$LIMIT" python3 scripts/gpu_multi_check.py base "$SHAPE" "$TOKENIZER" "$W"/base 2>&1 \
        | grep -E "^base:|Error" && touch "$W"/base.done
fi
[ -f "$W"/base.done ] || { echo "gpu_scaling: the base model was not built"; exit 1; }
if [ ! -f "$W"/stats.json ]; then
    timeout -s KILL "$LIMIT" python3 scripts/gpu_scaling_report.py data "$W"/base "$RECORDS" "$MAXLEN" "$W" 2>&1 \
        | grep -vE "Warning|warn"
    [ -f "$W"/stats.json ] || exit 1
fi
# Tokenized once into the shared cache; every run then finds it there.
timeout -s KILL "$LIMIT" python3 -m lmforge prepare --tokenizer_name "$W"/base --data_path "$W"/data.json \
    --model_max_length "$MAXLEN" > "$W"/logs/prepare.log 2>&1 || tail -5 "$W"/logs/prepare.log
grep -E "records|tokens" "$W"/logs/prepare.log | tail -2

# FSDP's own activation checkpointing: the shipped full_shard config with it on.
python3 - "$W"/fsdp_config.json "$GC" <<'EOF'
import json, sys
import lmforge.config as c
config = json.load(open(c.shipped_fsdp_config(c.DEFAULT_FSDP_CONFIG)))
config["activation_checkpointing"] = sys.argv[2].lower() == "true"
json.dump(config, open(sys.argv[1], "w"), indent=1)
EOF

COMMON=(--model_name_or_path "$W"/base --data_path "$W"/data.json --model_max_length "$MAXLEN" --bf16 True
        --tf32 True --per_device_train_batch_size "$BATCH" --max_steps "$STEPS" --learning_rate 2e-5
        --warmup_steps 2 --logging_steps "$LOG_EVERY" --seed 7 --report_to none --disable_tqdm True
        --save_strategy no --overwrite_output_dir True)

# PID: PID and all its descendants. torchrun starts its workers in sessions of their own, so
# killing the launcher's process group alone would leave them running (and holding GPUs).
descendants() {
    local pids=("$1") i=0
    while [ "$i" -lt "${#pids[@]}" ]; do
        pids+=($(ps -o pid= --ppid "${pids[$i]}" 2> /dev/null))
        i=$((i + 1))
    done
    echo "${pids[@]}"
}

# PID: SIGKILL to PID's process group and all its descendants, then wait until they are gone
# (their GPU memory and ports free for the next run). Not SIGTERM: lmforge answers it with a
# checkpoint, which for a 7B model is the whole optimizer state.
stop_tree() {
    local all waited=0
    all=$(descendants "$1")
    kill -KILL -- -"$1" $all 2> /dev/null
    while [ "$waited" -lt 60 ] && ps -o pid= -p "${all// /,}" > /dev/null 2>&1; do sleep 1; waited=$((waited + 1)); done
    sleep 2
}

command -v setsid > /dev/null || setsid() { "$@"; }  # without it a launch over its limit cannot be stopped whole

# NAME NPROC FLAGS...: one run into runs/NAME, unless an earlier call finished it (rc/NAME).
run() {
    local name=$1 nproc=$2; shift 2
    local log="$W"/logs/"$name".log port=$((PORT_BASE + $(grep -n "^$name " "$W"/plan | cut -d: -f1)))
    [ -f "$W"/rc/"$name" ] && return
    if [ "$GPU_COUNT" -gt 0 ] && [ "$nproc" -gt "$GPU_COUNT" ]; then
        echo "[${SECONDS}s] $name: skipped (needs $nproc GPUs, this machine has $GPU_COUNT)"
        return
    fi
    local limit=$LIMIT cut=""
    if [ "$(remaining)" -lt "$MIN_START" ]; then
        echo "[${SECONDS}s] $name: not started ($(remaining)s left of TOTAL; the next call runs it)"
        return
    fi
    if [ "$(remaining)" -lt "$limit" ]; then limit=$(remaining); cut=1; fi
    rm -rf "$W"/runs/"$name"
    echo "torchrun --nproc_per_node $nproc -m lmforge.sft ... $*" > "$log"
    local start=$SECONDS rc=0 note=""
    setsid torchrun --nproc_per_node "$nproc" --master_port "$port" -m lmforge.sft "${COMMON[@]}" \
        --output_dir "$W"/runs/"$name" "$@" < /dev/null >> "$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        if [ "$SAVE" = 0 ] && grep -q "lmforge: step $STEPS/$STEPS " "$log"; then
            { stop_tree "$pid"; wait "$pid"; } 2> /dev/null  # the shell's "Killed" notice of the job, unwanted here
            note="stopped once step $STEPS was logged"
            echo "gpu_scaling: $note" >> "$log"
            break
        fi
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            { stop_tree "$pid"; wait "$pid"; } 2> /dev/null
            echo "killed past ${limit}s" >> "$log"
            rc=124
            break
        fi
        sleep 1
    done
    if [ -z "$note" ] && [ "$rc" = 0 ]; then wait "$pid"; rc=$?; fi
    if [ "$rc" = 124 ] && [ -n "$cut" ]; then
        # Cut short by this call's end, not by its own limit: pending, the next call runs it again.
        echo "[${SECONDS}s] $name: cut at the end of TOTAL after $((SECONDS - start))s; the next call runs it"
        return
    fi
    echo "$rc $((SECONDS - start)) $note" > "$W"/rc/"$name"
    echo "[${SECONDS}s] $name: rc=$rc ($((SECONDS - start))s)${note:+ $note}"
    # The weights of a run with SAVE=1 (15-30 GB each) would fill the disk; the logs stay.
    rm -f "$W"/runs/"$name"/*.safetensors
}

# The plan, in order: each engine on each GPU count, then LoRA. The 2-GPU runs are the references.
: > "$W"/plan
for engine in $ENGINES; do
    for n in $GPUS; do
        case $engine in fsdp) p=$n ;; *) p=${DS_NPROC:-$n} ;; esac
        grep -q "^$engine-$p " "$W"/plan || echo "$engine-$p $p" >> "$W"/plan
    done
done
for n in $LORA_GPUS; do
    p=${DS_NPROC:-$n}
    grep -q "^lora_zero2-$p " "$W"/plan || echo "lora_zero2-$p $p" >> "$W"/plan
done

while read -r name nproc <&3; do
    case $name in
        fsdp-*) run "$name" "$nproc" --fsdp "full_shard auto_wrap" --fsdp_config "$W"/fsdp_config.json ;;
        zero3-*) run "$name" "$nproc" --deepspeed zero3 --gradient_checkpointing "$GC" ;;
        lora_zero2-*) run "$name" "$nproc" --deepspeed zero2 --gradient_checkpointing "$GC" --lora True \
                          --lora_r 16 --lora_alpha 32 --torch_dtype bfloat16 ;;
    esac
done 3< "$W"/plan

python3 scripts/gpu_scaling_report.py report "$W" "$WARMUP" 2>&1 | grep -vE "Warning|warn|real_accelerator"
if [ -n "${OUT:-}" ]; then
    cp "$W"/table.txt "$OUT"/gpu_scaling_table.txt 2> /dev/null
    tar -czf "$OUT"/gpu_scaling_logs.tar.gz -C "$W" logs rc plan settings stats.json 2> /dev/null
fi
echo "total ${SECONDS}s"
