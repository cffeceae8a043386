#!/usr/bin/env bash
# Kernels launched per decoded token, from cubecl's kernel log (every cubecl backend: wgpu, cuda).
#
#   [MODEL=smollm2] bash scripts/count_kernels.sh R2M_BINARY [DEVICE] [BATCH] [-- extra bench args]
#
# Runs `r2m bench generate` twice, with 4 and 8 new tokens (prompt 8; each run is a warm-up plus a
# timed generate, greedy and sampled: 4 generates), and logs every kernel launch through a
# `cubecl.toml` in a scratch directory. The difference between the two runs, divided by the 16
# extra decoding steps, is the kernels per decoded token; the histogram of that difference says
# which kernels they are (a binary built with `--features wgpu` or `cuda`). Example: `bash scripts/count_kernels.sh target/release/r2m wgpu 8`; on a
# machine without the GGUF, `MODEL=random:scripts/reference/smollm2-135m-config.json` (same
# architecture, made-up weights; run from the repository root) and `-- --dtype bf16` on CUDA.
set -euo pipefail
R2M=$(realpath "$1")
DEVICE=${2:-wgpu}
MODEL=${MODEL:-smollm2}
case $MODEL in random:/*) ;; random:*) MODEL="random:$PWD/${MODEL#random:}" ;; esac
BATCH=${3:-8}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# 4 generates (warm-up and timed, greedy and sampled) x (8 - 4) more tokens in the second run.
STEPS=$(( 4 * (8 - 4) ))
for n in 4 8; do
  printf '[profiling.logger]\nlevel = "minimal"\nfile = "%s/kernels-%s.log"\n' "$WORK" "$n" >cubecl.toml
  "$R2M" --device "$DEVICE" bench --model "$MODEL" generate --gen-batches "$BATCH" --gen-prompt 8 \
    --gen-new "$n" --iters 1 "$@" >/dev/null
  # One line per launch; keep the kernel's name, not its runtime suffix or generic parameters.
  sed -E 's/^Executing //; s/ \| (Wgpu|Cuda)Runtime.*//' "kernels-$n.log" | cut -d'|' -f1-2 |
    sort | uniq -c | awk '{c=$1; $1=""; print substr($0,2) "\t" c}' | sort >"hist-$n.txt"
done
echo "kernels per decoded token (batch $BATCH, $DEVICE): $(( ($(wc -l <kernels-8.log) - $(wc -l <kernels-4.log)) / STEPS ))"
join -t $'\t' -a 2 -e 0 -o 0,1.2,2.2 hist-4.txt hist-8.txt |
  awk -F'\t' -v steps="$STEPS" '{d=($3-$2)/steps; if (d>0) printf "%8.1f  %s\n", d, $1}' | sort -rn
