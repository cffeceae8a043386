#!/usr/bin/env bash
# r2m against PyTorch on an NVIDIA GPU, same machine, same sizes, SmolLM2-135M architecture with
# random weights (speed does not depend on their values, and no checkpoint has to be copied).
#
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p r2m-cli --no-default-features --features cuda
#   bash scripts/bench-gpu.sh target/release/r2m OUT_DIR
#
# Writes OUT_DIR/{r2m,torch}_{bf16,f32}.txt (human lines and one JSON line per case) and prints
# the r2m / PyTorch table. Peaks for MFU: 989 TFLOP/s dense bf16 on H100/H200 SXM.
set -u
R2M=${1:-target/release/r2m}
OUT=${2:-bench-gpu}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
CFG="$HERE/reference/smollm2-135m-config.json"
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# BUDGET (seconds, default 3600): steps that would start after it are skipped, and each step's
# timeout is cut to what is left, so a time-boxed machine still returns every finished number.
BUDGET=${BUDGET:-3600}
left() { local l=$((BUDGET - SECONDS)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
step() { # timeout command...
  local t; t=$(left "$1"); shift
  if [ "$t" -le 5 ]; then echo "skipped (budget): $*"; return; fi
  timeout "$t" "$@"
}

r2m() { # dtype peak file
  local dt=$1 peak=$2 f=$3
  step 240 "$R2M" --device cuda --dtype "$dt" bench --model "random:$CFG" generate train \
    --gen-batches 1,8,64 --iters 2 --batch 8 --seq 128 --peak-tflops "$peak" 2>&1 | tee -a "$f"
  step 90 "$R2M" --device cuda --dtype "$dt" bench --model "random:$CFG" train \
    --batch 8 --seq 128 --iters 2 --train-top 2 2>&1 | tee -a "$f"
  step 120 "$R2M" --device cuda --dtype "$dt" bench --model "random:$CFG" train \
    --batch 32 --seq 512 --iters 3 --peak-tflops "$peak" 2>&1 | tee -a "$f"
}
torch() { # dtype file
  local dt=$1 f=$2
  PYTHONUNBUFFERED=1 step 150 python3 "$HERE/reference/bench_torch.py" --json --device cuda \
    --dtype "$dt" --random-init --scenarios generate,train --gen-batches 1,8,64 --iters 3 \
    --gen-iters 2 --batch 8 --seq 128 2>&1 | tee -a "$f"
  PYTHONUNBUFFERED=1 step 60 python3 "$HERE/reference/bench_torch.py" --json --device cuda \
    --dtype "$dt" --random-init --scenarios train --train-top 2 --batch 8 --seq 128 2>&1 | tee -a "$f"
  PYTHONUNBUFFERED=1 step 60 python3 "$HERE/reference/bench_torch.py" --json --device cuda \
    --dtype "$dt" --random-init --scenarios train --batch 32 --seq 512 2>&1 | tee -a "$f"
}

torch bf16 "$OUT/torch_bf16.txt"
r2m bf16 989 "$OUT/r2m_bf16.txt"
torch f32 "$OUT/torch_f32.txt"
r2m f32 494 "$OUT/r2m_f32.txt"
python3 "$HERE/bench_table.py" "$OUT"/*.txt | tee "$OUT/table.txt"
