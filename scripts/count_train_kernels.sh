#!/usr/bin/env bash
# Kernels launched per training step, per layer and outside the layers, from cubecl's kernel log
# (every cubecl backend: wgpu, cuda).
#
#   bash scripts/count_train_kernels.sh R2M_BINARY [DEVICE] [-- extra bench args]
#
# Runs `r2m bench train --batch 2 --seq 16` (forward, backward and AdamW over all weights) on
# SmolLM2-135M's architecture with random weights (scripts/reference/smollm2-135m-config.json), cut
# to 2 and to 3 layers, each with 1 and with 2 timed steps. The difference between 2 steps and 1 is
# a step's kernels; the difference between 3 layers and 2 is one layer's. Prints both counts and a
# layer's kernels by name. Run from the repository root, e.g.
# `bash scripts/count_train_kernels.sh target/release/r2m wgpu` (`-- --dtype bf16` on CUDA).
set -euo pipefail
R2M=$(realpath "$1")
DEVICE=${2:-wgpu}
shift $(( $# < 2 ? $# : 2 ))
[ "${1:-}" = "--" ] && shift
CONFIG=$(realpath scripts/reference/smollm2-135m-config.json)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
for layers in 2 3; do
  sed -E "s/\"num_hidden_layers\": *[0-9]+/\"num_hidden_layers\": $layers/" "$CONFIG" >"config-$layers.json"
  grep -q "\"num_hidden_layers\": $layers" "config-$layers.json"
  for steps in 1 2; do
    log="kernels-$layers-$steps.log"
    printf '[profiling.logger]\nlevel = "minimal"\nfile = "%s/%s"\n' "$WORK" "$log" >cubecl.toml
    "$R2M" --device "$DEVICE" bench --model "random:$WORK/config-$layers.json" train --batch 2 \
      --seq 16 --iters "$steps" "$@" >/dev/null
    # One line per launch; keep the kernel's name, not its runtime suffix or generic parameters.
    sed -E 's/^Executing //; s/ \| (Wgpu|Cuda)Runtime.*//' "$log" | cut -d'|' -f1-2 |
      sort | uniq -c | awk '{c=$1; $1=""; print substr($0,2) "\t" c}' | sort >"hist-$layers-$steps.txt"
  done
done
lines() { wc -l <"kernels-$1.log"; }
step2=$(( $(lines 2-2) - $(lines 2-1) ))
step3=$(( $(lines 3-2) - $(lines 3-1) ))
echo "kernels per training step (batch 2 x 16, $DEVICE): per layer $(( step3 - step2 )), outside the layers $(( step2 - 2 * (step3 - step2) ))"
# A layer's kernels by name: (3 layers: 2 steps - 1 step) - (2 layers: 2 steps - 1 step).
awk -F'\t' 'FNR == 1 { f++ } { c[$1] += (f == 1 || f == 4 ? 1 : -1) * $2 }
  END { for (n in c) if (c[n]) printf "%6d  %s\n", c[n], n }' \
  hist-3-2.txt hist-3-1.txt hist-2-2.txt hist-2-1.txt | sort -rn
