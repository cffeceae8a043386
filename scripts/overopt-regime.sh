#!/usr/bin/env bash
# The over-optimization regime search (issue 27): short vanilla runs on seed 0, one experiment
# directory per setting under ROOT, each resumable (rerun the script: finished settings are
# skipped, an interrupted one continues). The proxy RM of the first setting is copied to the
# others (same proxy settings), so only the RL runs differ.
#
#   nohup scripts/overopt-regime.sh runs/regime > runs/regime.log 2>&1 &
set -euo pipefail
root=${1:-runs/regime}
r2m=${R2M:-target/release/r2m}
mkdir -p "$root"
# name | overrides of configs/overopt/regime.toml (r2m experiment overopt flags)
settings=(
  "A-top4-lr1e-4-kl0|"
  "B-lora-all-lr2e-4-kl0|--set model.trainable=lora --set lora.r=16 --set lora.alpha=32 --set optim.lr=2e-4 --steps 32"
  "D-top4-lr1e-4-kl0-80steps|--steps 80"
  "C-top4-lr1e-4-kl0.01|--set algo.kl_coef=0.01"
)
first=""
for s in "${settings[@]}"; do
  name=${s%%|*}; flags=${s#*|}
  exp="$root/$name"
  if [ -f "$exp/report.json" ]; then echo "== $name: done"; first=${first:-$exp}; continue; fi
  if [ -n "$first" ] && [ ! -d "$exp/proxy-rm" ]; then
    mkdir -p "$exp"
    cp -r "$first/proxy-rm" "$first/rm-pairs.jsonl" "$first/rm-eval-pairs.jsonl" "$exp/"
  fi
  echo "== $name: $(date -u +%FT%TZ)"
  if [ -f "$exp/experiment.toml" ]; then
    "$r2m" experiment overopt --resume "$exp"
  else
    # shellcheck disable=SC2086
    "$r2m" experiment overopt --config configs/overopt/regime.toml --out "$exp" $flags
  fi
  first=${first:-$exp}
  echo "== $name: finished $(date -u +%FT%TZ)"
done
