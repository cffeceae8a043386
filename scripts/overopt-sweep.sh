#!/usr/bin/env bash
# The over-optimization sweep (issue 27), in the regime where vanilla over-optimizes (setting D
# of scripts/overopt-regime.sh). Resumable: rerun it and finished runs are skipped, an
# interrupted one continues from its last checkpoint.
#
#   nohup scripts/overopt-sweep.sh runs/sweep > runs/sweep.log 2>&1 &
#
# 1. Tuning (configs/overopt/tune.toml): R2M and iterative-head on seed 100, r2m.lr in
#    {1e-5, 1e-4}, one experiment per value (ROOT/tune-lr*).
# 2. The final sweep (configs/overopt/sweep.toml plus each method's tuned rate, picked by
#    scripts/overopt_pick.py into ROOT/sweep.toml): every method on the evaluation seeds, in
#    ROOT/final.
# 3. The report rebuilt from the finished runs, and published (scripts/overopt-publish.sh).
#
# Every experiment uses the same proxy RM (same data seed and proxy settings): the first one
# found under runs/regime or ROOT is copied, so only the RL runs differ.
set -euo pipefail
root=${1:-runs/sweep}
r2m=${R2M:-target/release/r2m}
mkdir -p "$root"

proxy_src=""
for d in runs/regime/D-top4-lr1e-4-kl0-80steps "$root"/tune-lr1e-4; do
  if [ -f "$d/proxy-rm/config.json" ] || [ -f "$d/proxy-rm/reward_head.json" ]; then proxy_src=$d; break; fi
done

# experiment NAME CONFIG [flags...]: run (or resume) one experiment directory under ROOT.
experiment() {
  local name=$1 config=$2; shift 2
  local exp="$root/$name"
  if [ -f "$exp/report.json" ] && [ -f "$exp/done" ]; then echo "== $name: done"; return; fi
  if [ -n "$proxy_src" ] && [ ! -d "$exp/proxy-rm" ]; then
    mkdir -p "$exp"
    cp -r "$proxy_src/proxy-rm" "$proxy_src/rm-pairs.jsonl" "$proxy_src/rm-eval-pairs.jsonl" "$exp/"
  fi
  echo "== $name: $(date -u +%FT%TZ)"
  if [ -f "$exp/experiment.toml" ]; then
    "$r2m" experiment overopt --resume "$exp"
  else
    "$r2m" experiment overopt --config "$config" --out "$exp" "$@"
  fi
  touch "$exp/done"
  echo "== $name: finished $(date -u +%FT%TZ)"
}

# Tuning, unless ROOT/sweep.toml (the final config with the picks) exists already: on a fresh
# machine, `mkdir -p ROOT && cp docs/overopt/2026-12-07-tuning/sweep.toml ROOT/` skips it.
if [ ! -f "$root/sweep.toml" ]; then
  experiment tune-lr1e-4 configs/overopt/tune.toml --set r2m.lr=1e-4
  experiment tune-lr1e-5 configs/overopt/tune.toml --set r2m.lr=1e-5
fi

# The final sweep's config: configs/overopt/sweep.toml and the tuned rate of each method
# (written once, so that a resumed sweep keeps the choice).
if [ ! -f "$root/sweep.toml" ]; then
  picks=$(python3 scripts/overopt_pick.py "$root")
  { cat configs/overopt/sweep.toml; echo "$picks"; } > "$root/sweep.toml.tmp"
  mv "$root/sweep.toml.tmp" "$root/sweep.toml"
fi
# The finished runs published under docs/ (metrics, held-out evaluations, samples, done.json:
# all the report reads) count as finished, on a fresh machine too: only the others run. Among
# them, vanilla on seed 0 is setting D of the regime search (same settings, same seed).
docs=${DOCS:-docs/overopt/2026-12-07-sweep}
for run in "$docs"/runs/*/; do
  name=$(basename "$run")
  if [ -f "$run/done.json" ] && [ ! -d "$root/final/runs/$name" ]; then
    mkdir -p "$root/final/runs"
    cp -r "$run" "$root/final/runs/$name"
    echo "== $name: restored from $docs"
  fi
done
experiment final "$root/sweep.toml"
# A proxy trained anew (fresh machine) must be the one the published runs used.
if [ -f "$docs/proxy_rm.json" ] && ! cmp -s "$docs/proxy_rm.json" "$root/final/proxy-rm/proxy_rm.json"; then
  echo "WARNING: $root/final/proxy-rm/proxy_rm.json differs from $docs/proxy_rm.json: the runs restored from docs used another proxy"
fi

# The report again, by the binary at hand (a report fix made while the sweep ran reaches it here),
# and the small outputs copied under docs/.
"$r2m" experiment overopt --resume "$root/final" --report-only > /dev/null
scripts/overopt-publish.sh "$root/final" "$docs"
echo "== report: $root/final/report.md"
