#!/usr/bin/env bash
# LoRA against top:N and full fine-tuning (issue 25): `r2m bench rl-step` on SmolLM2, 4 prompts x
# 4 samples x 64 tokens (configs/r2m-smollm2-hh.toml), one arm per process so each peak RSS is
# that arm's; then `r2m bench train` tokens/s with and without LoRA.
#
#   scripts/bench-lora.sh RM_DIR      (release binary at target/release/r2m; ~15 min on 2 cores)
set -euo pipefail
rm_dir=${1:?usage: $0 RM_DIR}
r2m=${R2M:-target/release/r2m}
steps=${RL_STEPS:-3}
arm() {
  local name=$1; shift
  echo "== rl-step $name"
  "$r2m" bench rl-step --config configs/r2m-smollm2-hh.toml --rl-steps "$steps" --methods r2m \
    --set "reward.model=$rm_dir" "$@" 2>&1 | grep -v '^step\|^backend\|loaded\|records read\|prompts kept'
}
arm top:4 --set model.trainable=top:4
arm "lora r16 top:4" --set model.trainable=lora --set lora.r=16 --set lora.alpha=32 --set lora.layers=top:4
arm "lora r16 all" --set model.trainable=lora --set lora.r=16 --set lora.alpha=32 --set lora.layers=all
arm all --set model.trainable=all
for a in "--train-top 4" "--train-top 4 --lora 16" "--lora 16" ""; do
  echo "== train $a"
  # shellcheck disable=SC2086
  "$r2m" bench train --batch 4 --seq 128 --iters 3 $a 2>&1 | grep '^r2m'
done
