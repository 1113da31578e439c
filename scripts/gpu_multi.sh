#!/usr/bin/env bash
# DDP / FSDP / ZeRO on several GPUs, on the 2-GPU device (nvidia-h200-x2), from the repository root:
#
#     bash scripts/gpu_multi.sh          # about 5-6 minutes; the table at the end
#
# A random-init model of the Qwen2.5-0.5B shape (bench/configs/qwen2.5-0.5b.json) with the Qwen2.5
# tokenizer is saved once as the base; the same data (FastChat's dummy conversations, packed
# into rows of MAXLEN tokens), seed and global batch then train STEPS steps under: one GPU (the
# reference), DDP (torchrun), FSDP2 full_shard (and with CPU offload), DeepSpeed ZeRO-2, ZeRO-3,
# ZeRO-3 + offload, `accelerate launch` (DDP), two torchrun "nodes" of one GPU each meeting at a
# c10d rendezvous on localhost, LoRA on one GPU and LoRA + ZeRO-3; an FSDP run and a LoRA +
# ZeRO-3 run are SIGKILLed inside the save of their last checkpoint and rerun, which resumes from
# the one before; the LoRA + ZeRO-3 adapter is merged with `lmforge merge`.
# scripts/gpu_multi_check.py then prints one row per run: per-step losses against the reference,
# the saved model's tensors against the base's, the saved weights' logits against the logits the
# in-memory model computed at the end of its run (tests/hooks.py --record_logits), peak memory, wall time.
# Every run is `lmforge sft` started through tests/hooks.py, which adds the test callbacks
# (recording those logits; pausing inside a save for the killed runs).
#
# Runs overlap (PAR at a time; two 0.5B runs fit one H200 many times over), so wall times are not
# throughput figures. Every launch is killed, with all its processes, past its time limit, and no
# launch starts once TOTAL seconds are near, so the table always prints.
#
# CPU dry run (no GPU: FSDP runs as DDP there, DeepSpeed runs one process):
#     SKIP_INSTALL=1 DATA=../shared/data SHAPE=tiny STEPS=4 OFFLOAD_STEPS=2 MAXLEN=256 DS_NPROC=1 PAR=2 \
#         TOTAL=3000 LIMIT=600 bash scripts/gpu_multi.sh
set -uo pipefail
# NVLink multicast stays off on the shared device (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

DATA=${DATA:-.devdata}
SHAPE=${SHAPE:-bench/configs/qwen2.5-0.5b.json}
STEPS=${STEPS:-20}
OFFLOAD_STEPS=${OFFLOAD_STEPS:-10}
NPROC=${NPROC:-2}
DS_NPROC=${DS_NPROC:-$NPROC}
BATCH=${BATCH:-8}          # the global batch: one-GPU runs take all of it, N-process runs BATCH/N each
MAXLEN=${MAXLEN:-512}
PAR=${PAR:-6}              # launches at a time
LIMIT=${LIMIT:-200}        # seconds one launch may take
TOTAL=${TOTAL:-420}        # seconds for the whole script: no launch starts in its last 90
PORT_BASE=${PORT_BASE:-29400}
W=${W:-/tmp/lmforge-multi}
HOOKS=$PWD/tests/hooks.py  # `lmforge COMMAND` with test callbacks (a script path: any launcher takes it)
export GPU_MULTI_BF16=${BF16:-True}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LMFORGE_CACHE=$W/cache

if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf "$W"
mkdir -p "$W"/runs "$W"/logs "$W"/rc "$W"/logits
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, accelerate, peft, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__, 'GPUs', torch.cuda.device_count())" 2>&1 | grep -v "real_accelerator"

# ZeRO offload steps with DeepSpeedCPUAdam, a C++ op the wheel leaves to build on first use:
# built once here, in the background, before the offload runs need it.
python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" > "$W"/logs/cpu_adam_build.log 2>&1 &
BUILD_PID=$!

python3 scripts/gpu_multi_check.py base "$SHAPE" "$DATA"/tokenizers/qwen2.5-0.5b-instruct "$W"/base 2>&1 | grep -E "^base:|Error"
# Tokenized once into the shared cache; every run then finds it there.
python3 -m lmforge prepare --tokenizer_name "$W"/base --data_path "$DATA"/fastchat_dummy_conversation.json \
    --model_max_length "$MAXLEN" > "$W"/logs/prepare.log 2>&1 || tail -5 "$W"/logs/prepare.log
grep -E "records|tokens" "$W"/logs/prepare.log | head -3

COMMON=(--model_name_or_path "$W"/base --data_path "$DATA"/fastchat_dummy_conversation.json
        --model_max_length "$MAXLEN" --bf16 "$GPU_MULTI_BF16" --logging_steps 1 --learning_rate 1e-4 --warmup_steps 2
        --seed 7 --report_to none --disable_tqdm True --save_strategy no --dataloader_num_workers 0)
# LoRA without dropout: its draws differ between one process and two, the comparison must not.
LORA=(--lora True --lora_dropout 0 --learning_rate 1e-3)

remaining() { echo $((TOTAL - 80 - SECONDS)); }
command -v setsid > /dev/null || setsid() { "$@"; }  # without it a launch over its limit cannot be stopped whole

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

# NAME LIMIT CMD...: CMD in a process group of its own, killed whole (group and descendants)
# past LIMIT seconds; output appended to logs/NAME.log.
run_limited() {
    local name=$1 limit=$2; shift 2
    local left; left=$(remaining)
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -lt 10 ] && { echo "no time left" >> "$W"/logs/"$name".log; return 124; }
    setsid "$@" >> "$W"/logs/"$name".log 2>&1 &
    local pid=$!
    ( sleep "$limit"; echo "killed past ${limit}s" >> "$W"/logs/"$name".log
      all=$(descendants "$pid"); kill -TERM -- -"$pid" $all
      sleep 15; kill -KILL -- -"$pid" $all ) > /dev/null 2>&1 &
    local dog=$!
    wait "$pid"
    local rc=$?
    kill "$dog" 2> /dev/null
    return $rc
}

# KIND PORT: the launcher words (array L, followed by the script $HOOKS and its arguments) and
# the per-process batch (PER) for KIND.
launcher() {
    case $1 in
        gpu0) L=(env CUDA_VISIBLE_DEVICES=0 python3); PER=$BATCH ;;
        gpu1) L=(env CUDA_VISIBLE_DEVICES=1 python3); PER=$BATCH ;;
        torchrun) L=(torchrun --nproc_per_node "$NPROC" --master_port "$2"); PER=$((BATCH / NPROC)) ;;
        deepspeed) L=(deepspeed --num_gpus "$DS_NPROC" --master_port "$2"); PER=$((BATCH / DS_NPROC)) ;;
        accelerate) L=(accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no
                       --dynamo_backend no --main_process_port "$2"); PER=$((BATCH / NPROC)) ;;
    esac
}

finish() {  # NAME RC START
    echo "$2 $((SECONDS - $3))" > "$W"/rc/"$1"
    echo "[${SECONDS}s] $1: rc=$2 ($((SECONDS - $3))s)"
}

# NAME KIND PORT [FLAGS...]: one run into runs/NAME.
train() {
    local name=$1 kind=$2 port=$3 start=$SECONDS; shift 3
    launcher "$kind" "$port"
    run_limited "$name" "$LIMIT" "${L[@]}" "$HOOKS" --record_logits "$W"/logits/"$name".pt sft "${COMMON[@]}" \
        --output_dir "$W"/runs/"$name" --per_device_train_batch_size "$PER" --max_steps "$STEPS" "$@"
    finish "$name" $? "$start"
}

# NAME KIND PORT [FLAGS...]: checkpoints every STEPS/2 steps; SIGKILLed (the whole process group)
# while it writes checkpoint-STEPS, after the files and before the manifest; then the same command
# again, which must resume from checkpoint-STEPS/2, train the rest and save.
train_killed_and_resumed() {
    local name=$1 kind=$2 port=$3 start=$SECONDS; shift 3
    launcher "$kind" "$port"
    local flags=("${COMMON[@]}" --output_dir "$W"/runs/"$name" --per_device_train_batch_size "$PER"
                 --max_steps "$STEPS" "$@" --save_strategy steps --save_steps $((STEPS / 2)))
    setsid "${L[@]}" "$HOOKS" --pause_save "$STEPS":600 sft "${flags[@]}" > "$W"/logs/"$name"-killed.log 2>&1 &
    local pid=$! waited=0
    until grep -q "pausing .* inside the save" "$W"/logs/"$name"-killed.log 2> /dev/null; do
        sleep 1
        waited=$((waited + 1))
        if ! kill -0 "$pid" 2> /dev/null || [ "$waited" -ge "$LIMIT" ]; then break; fi
    done
    kill -KILL -- -"$pid" $(descendants "$pid") 2> /dev/null
    wait "$pid" 2> /dev/null
    sleep 2  # the killed workers' GPU memory and ports released
    echo "gpu_multi: first run killed after ${waited}s; checkpoints: $(ls "$W"/runs/"$name" | grep checkpoint | tr '\n' ' ')" \
        >> "$W"/logs/"$name".log
    run_limited "$name" "$LIMIT" "${L[@]}" "$HOOKS" --record_logits "$W"/logits/"$name".pt sft "${flags[@]}"
    finish "$name" $? "$start"
}

# PORT: two torchrun launches of one process each, as two machines would start them, meeting
# at a c10d rendezvous; one GPU each.
multinode() {
    local name=multinode port=$1 start=$SECONDS
    local rdzv=(--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint localhost:"$port" --rdzv_id lmforge-mn)
    local flags=("$HOOKS" --record_logits "$W"/logits/$name.pt sft "${COMMON[@]}" --output_dir "$W"/runs/$name
                 --per_device_train_batch_size $((BATCH / 2)) --max_steps "$STEPS")
    run_limited $name-node1 "$LIMIT" env CUDA_VISIBLE_DEVICES=1 torchrun "${rdzv[@]}" --node_rank 1 "${flags[@]}" &
    local other=$!
    run_limited $name "$LIMIT" env CUDA_VISIBLE_DEVICES=0 torchrun "${rdzv[@]}" --node_rank 0 "${flags[@]}"
    local rc=$?
    wait "$other"
    local rc1=$?
    finish $name $((rc > rc1 ? rc : rc1)) "$start"
}

wait_for_build_then() {  # CMD...: CMD once the DeepSpeedCPUAdam build is done
    while kill -0 "$BUILD_PID" 2> /dev/null; do sleep 1; done
    "$@"
}

# Start a job (a function call) once fewer than PAR run; none starts in the last 90 seconds.
# ONLY="fsdp fsdp_resume ..." runs those alone (ref and lora_ref are the references).
job() {
    local words=" $* " name
    name=$(echo "$words" | grep -oE " (train|train_killed_and_resumed) [a-z0-9_]+ " | awk '{print $2}')
    [ -z "$name" ] && name=multinode
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    while [ "$(jobs -rp | grep -cvx "$BUILD_PID")" -ge "$PAR" ]; do sleep 1; done
    if [ "$(remaining)" -lt 10 ]; then
        echo "skipped (no time left): $*"
        return
    fi
    "$@" &
}

# The longest first: the killed-and-resumed pairs.
P=$PORT_BASE
job train ref gpu0 $((P + 10))
job train lora_ref gpu1 $((P + 20)) "${LORA[@]}"
job train_killed_and_resumed fsdp_resume torchrun $((P + 30)) --fsdp "full_shard auto_wrap"
job train_killed_and_resumed lora_zero3_resume deepspeed $((P + 40)) "${LORA[@]}" --deepspeed zero3
job train ddp torchrun $((P + 50))
job train fsdp torchrun $((P + 60)) --fsdp "full_shard auto_wrap"
job train zero2 deepspeed $((P + 70)) --deepspeed zero2
job train zero3 deepspeed $((P + 80)) --deepspeed zero3
job train lora_zero3 deepspeed $((P + 90)) "${LORA[@]}" --deepspeed zero3
job multinode $((P + 100))
job wait_for_build_then train zero3_offload deepspeed $((P + 110)) --deepspeed zero3_offload --max_steps "$OFFLOAD_STEPS"
job train fsdp_offload torchrun $((P + 120)) --fsdp "full_shard auto_wrap offload" --max_steps "$OFFLOAD_STEPS"
job train accelerate_ddp accelerate $((P + 130))
wait

if grep -qiE "error|failed" "$W"/logs/cpu_adam_build.log; then
    echo "DeepSpeedCPUAdam build failed:"; grep -iE "error" "$W"/logs/cpu_adam_build.log | tail -3
fi
if [ -d "$W"/runs/lora_zero3 ]; then
    start=$SECONDS
    python3 -m lmforge merge --base "$W"/base --adapter "$W"/runs/lora_zero3 --output "$W"/runs/lora_zero3_merged \
        > "$W"/logs/lora_zero3_merged.log 2>&1
    finish lora_zero3_merged $? "$start"
fi

python3 scripts/gpu_multi_check.py report "$W" 2>&1 | grep -vE "Warning|warn|Loading weights|real_accelerator"
rc=$?
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT"/gpu_multi_logs.tar.gz -C "$W" logs rc 2> /dev/null
fi
echo "total ${SECONDS}s"
