#!/usr/bin/env bash
# Copy an over-optimization experiment's small outputs into docs/ (issue 27): the settings, the
# report, the plots and, per run, its metrics, held-out evaluations and samples. Never
# checkpoints. Rerun it as runs finish: it copies the finished runs.
#
#   scripts/overopt-publish.sh runs/sweep/final docs/overopt/2026-12-07-sweep
set -euo pipefail
exp=${1:?experiment directory}
dest=${2:?destination under docs/}
mkdir -p "$dest"
for f in experiment.toml report.md report.json proxy-rm/proxy_rm.json; do
  if [ -f "$exp/$f" ]; then cp "$exp/$f" "$dest/"; fi
done
if [ -d "$exp/plots" ]; then
  mkdir -p "$dest/plots"
  cp "$exp"/plots/*.png "$dest/plots/" 2>/dev/null || true
fi
for run in "$exp"/runs/*/; do
  [ -d "$run" ] || continue
  name=$(basename "$run")
  if [ ! -f "$run/done.json" ]; then echo "$name: unfinished, not copied"; continue; fi
  mkdir -p "$dest/runs/$name"
  for f in metrics.jsonl heldout.jsonl samples.jsonl done.json; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$dest/runs/$name/"; fi
  done
done
du -sh "$dest"
