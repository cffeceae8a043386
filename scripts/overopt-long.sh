#!/usr/bin/env bash
# A diagnostic beside the over-optimization sweep (issue 27): vanilla seed 1 run on to step
# 140 (configs/overopt/long.toml), with the sweep's proxy, to see whether held-out gold falls
# after step 80. Resumable: rerun the same command. Publishes to docs/overopt/2026-12-07-long.
#
#   scripts/overopt-long.sh runs/sweep runs/long
set -euo pipefail
sweep=${1:?the sweep root, whose final/proxy-rm is reused}
exp=${2:?experiment directory}
r2m=${R2M:-target/release/r2m}
docs=${DOCS:-docs/overopt/2026-12-07-long}
if [ ! -d "$exp/proxy-rm" ]; then
  mkdir -p "$exp"
  cp -r "$sweep/final/proxy-rm" "$sweep/final/rm-pairs.jsonl" "$sweep/final/rm-eval-pairs.jsonl" "$exp/"
fi
echo "== long: $(date -u +%FT%TZ)"
if [ -f "$exp/experiment.toml" ]; then
  "$r2m" experiment overopt --resume "$exp"
else
  "$r2m" experiment overopt --config configs/overopt/long.toml --out "$exp"
fi
scripts/overopt-publish.sh "$exp" "$docs"
echo "== long: finished $(date -u +%FT%TZ)"
