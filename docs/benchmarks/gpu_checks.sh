#!/usr/bin/env bash
# GPU figures and checks of docs/benchmarks.md ("GPU"), run as one script on a lent GPU machine from the repository
# root: python3 there already holds torch, timm, safetensors and the other dependencies, so semask runs from the
# checkout (PYTHONPATH) without an install. Results go to ${OUT:-gpu_out}: benchmark JSON files, logs, demo.json.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
S="python3 -m semask"
T=$(mktemp -d)
step() { echo; echo "=== $* ($(date +%T))"; }
step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'timm', timm.__version__)"
step "benchmark: SeMask-T 512, bf16, inference + train"
timeout 110 $S benchmark --device cuda --precision bf16 --model semask_tiny_fpn --size 512 --batch-size 8 \
    --train-batch-size 8 --tasks inference train --json "$OUT/gpu_tiny512_bf16.json"
step "benchmark: SeMask-L 640, bf16, inference + train"
timeout 110 $S benchmark --device cuda --precision bf16 --model semask_large_fpn --size 640 --batch-size 4 \
    --train-batch-size 4 --tasks inference train --json "$OUT/gpu_large640_bf16.json"
step "benchmark: SeMask-L 640, bf16, train with gradient checkpointing"
timeout 80 $S benchmark --device cuda --precision bf16 --model semask_large_fpn --size 640 --batch-size 4 \
    --train-batch-size 4 --tasks train --grad-checkpointing --json "$OUT/gpu_large640_bf16_ckpt.json"
step "demo on the GPU (toy preset, seed 0, precision auto = bf16 on this GPU)"
start=$SECONDS; timeout 150 $S demo --work-dir "$T/demo" --data-root "$T/toy" --no-progress \
    > "$OUT/demo.log" 2>&1; echo "demo wall $((SECONDS - start)) s"; tail -n 25 "$OUT/demo.log"; cp "$T/demo/demo.json" "$OUT/" 2>/dev/null
step "fp16 autocast with GradScaler, 60 steps"
timeout 60 $S train toy --work-dir "$T/fp16" --no-progress --set data.root="$T/toy" train.precision=fp16 \
    schedule.iters=60 train.eval_interval=60 train.checkpoint_interval=60 2>&1 | tail -n 6
step "torchrun, NCCL, 1 process, SyncBatchNorm forced on, 40 steps"
timeout 60 torchrun --standalone --nproc_per_node=1 -m semask train toy --work-dir "$T/ddp" --no-progress \
    --set data.root="$T/toy" model.sync_bn=true schedule.iters=40 train.eval_interval=40 train.checkpoint_interval=40 2>&1 | tail -n 6
echo; echo "=== done ($(date +%T))"
