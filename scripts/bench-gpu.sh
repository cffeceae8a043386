#!/usr/bin/env bash
# r2m against PyTorch on an NVIDIA GPU, same machine, same sizes, SmolLM2-135M architecture with
# random weights (speed does not depend on their values, and no checkpoint has to be copied).
#
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p r2m-cli --no-default-features --features cuda
#   (or --features cuda-fusion: burn's kernel fusion; pass the plain `cuda` build as BASELINE_R2M)
#   bash scripts/bench-gpu.sh target/release/r2m OUT_DIR [BASELINE_R2M]
#
# Run from the repository root (`r2m bench check` reads tests/fixtures). Writes OUT_DIR/*.txt
# (human lines and one JSON line per case) and prints the r2m / PyTorch table; with a baseline
# build (an older r2m; else this build with R2M_ATTENTION_KERNEL=0), its generate rows form their
# own column. Peaks for MFU: 989 TFLOP/s dense
# bf16 on H100/H200 SXM.
#
# BUDGET (seconds, default 3600): steps are in order of importance; those that would start after
# it are skipped and each step's timeout is cut to what is left, so a time-boxed machine still
# returns every finished number.
set -u
# Decoding's cubecl attention kernel is off by default on CUDA until `bench check` has passed
# there with it: this script turns it on, so check.txt is that check (the baseline column turns
# it off again).
export R2M_ATTENTION_KERNEL=${R2M_ATTENTION_KERNEL:-1}
R2M=${1:-target/release/r2m}
OUT=${2:-bench-gpu}
BASE=${3:-}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
CFG="$HERE/reference/smollm2-135m-config.json"
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# cubecl keeps compiled kernels (PTX) and autotune results under ./target, so the second and later
# processes skip most of the compiling.
[ -e cubecl.toml ] || printf '[compilation]\ncache = "target"\n\n[autotune]\ncache = "target"\n' >cubecl.toml

BUDGET=${BUDGET:-3600}
left() { local l=$((BUDGET - SECONDS)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
step() { # timeout command...
  local t; t=$(left "$1"); shift
  if [ "$t" -le 5 ]; then echo "skipped (budget): $*"; return; fi
  echo "[$SECONDS s] $*" >&2
  timeout "$t" "$@"
}
gen() { # binary dtype batches iters
  step 200 "$1" --device cuda --dtype "$2" bench --model "random:$CFG" generate \
    --gen-batches "$3" --iters "$4"
}
train() { # binary dtype peak
  step 60 "$1" --device cuda --dtype "$2" bench --model "random:$CFG" train \
    --batch 8 --seq 128 --iters 3 --peak-tflops "$3"
  step 60 "$1" --device cuda --dtype "$2" bench --model "random:$CFG" train \
    --batch 32 --seq 512 --iters 3 --peak-tflops "$3"
}
torch() { # dtype scenario extra-args...
  local dt=$1 sc=$2; shift 2
  PYTHONUNBUFFERED=1 step 150 python3 "$HERE/reference/bench_torch.py" --json --device cuda \
    --dtype "$dt" --random-init --scenarios "$sc" --iters 3 --gen-iters 2 "$@"
}
as_baseline() { sed -E 's/^\{/{"label":"baseline",/'; }

step 90 "$R2M" --device cuda --dtype bf16 bench --model "random:$CFG" check 2>&1 | tee "$OUT/check.txt"
gen "$R2M" bf16 64,8,1 2 2>&1 | tee "$OUT/r2m_bf16.txt"
torch bf16 generate --gen-batches 64,8,1 2>&1 | tee "$OUT/torch_bf16.txt"
train "$R2M" bf16 989 2>&1 | tee -a "$OUT/r2m_bf16.txt"
torch bf16 train --batch 8 --seq 128 2>&1 | tee -a "$OUT/torch_bf16.txt"
torch bf16 train --batch 32 --seq 512 2>&1 | tee -a "$OUT/torch_bf16.txt"
# The baseline column: the older build if given, else this one with decoding's attention kernel
# off (R2M_ATTENTION_KERNEL=0: the tensor-op path, six kernels a layer instead of one).
if [ -n "$BASE" ]; then
  gen "$BASE" bf16 64,8 1 2>&1 | as_baseline | tee "$OUT/base_bf16.txt"
else
  R2M_ATTENTION_KERNEL=0 gen "$R2M" bf16 64,8 1 2>&1 | as_baseline | tee "$OUT/base_bf16.txt"
fi
# Kernels per decoded token (batch 64, bf16), and which ones (scripts/count_kernels.sh).
step 120 env MODEL="random:$CFG" bash "$HERE/count_kernels.sh" "$R2M" cuda 64 -- --dtype bf16 \
  2>&1 | tee "$OUT/kernels.txt"
step 90 "$R2M" --device cuda bench --model "random:$CFG" check 2>&1 | tee -a "$OUT/check.txt"
gen "$R2M" f32 64,8 1 2>&1 | tee "$OUT/r2m_f32.txt"
torch f32 generate --gen-batches 64,8 2>&1 | tee "$OUT/torch_f32.txt"
train "$R2M" f32 494 2>&1 | tee -a "$OUT/r2m_f32.txt"
torch f32 train --batch 8 --seq 128 2>&1 | tee -a "$OUT/torch_f32.txt"
# Kernels per training step (scripts/count_train_kernels.sh).
step 120 bash "$HERE/count_train_kernels.sh" "$R2M" cuda -- --dtype bf16 2>&1 | tee "$OUT/train-kernels.txt"
python3 "$HERE/bench_table.py" "$OUT"/*.txt | tee "$OUT/table.txt"
