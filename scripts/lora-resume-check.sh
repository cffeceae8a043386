#!/usr/bin/env bash
# A LoRA R2M run on SmolLM2 (configs/r2m-smollm2-hh.toml with model.trainable = lora) run twice:
# straight through, and killed with SIGKILL once its step-3 checkpoint exists, then resumed.
# The two must write the same metrics (timings aside) and byte-identical adapters; the adapter
# must then drive `r2m generate`.
#
#   scripts/lora-resume-check.sh RM_DIR [OUT_DIR]      (release binary at target/release/r2m)
set -euo pipefail
rm_dir=${1:?usage: $0 RM_DIR [OUT_DIR]}
out=${2:-runs/lora-resume-check}
r2m=${R2M:-target/release/r2m}
steps=${STEPS:-6}
sets=(--set model.trainable=lora --set "reward.model=$rm_dir" --set "run.steps=$steps"
      --set run.checkpoint_every=3)
rm -rf "$out"
mkdir -p "$out"

echo "== straight run"
/usr/bin/time -f "straight: %e s, peak RSS %M KB" \
  "$r2m" train --config configs/r2m-smollm2-hh.toml "${sets[@]}" --set "run.out=$out/straight" \
  >"$out/straight.log" 2>&1

echo "== killed after the step-3 checkpoint, then resumed"
"$r2m" train --config configs/r2m-smollm2-hh.toml "${sets[@]}" --set "run.out=$out/killed" \
  >"$out/killed.log" 2>&1 &
pid=$!
until [ -d "$out/killed/checkpoints/step-000003" ]; do sleep 1; done
kill -9 "$pid" || true
wait "$pid" || true
echo "killed at: $(wc -l <"$out/killed/metrics.jsonl") metrics lines"
"$r2m" train --resume "$out/killed" >>"$out/killed.log" 2>&1

strip() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    m = json.loads(l)
    print(json.dumps({k: v for k, v in m.items() if not k.startswith("time_")}, sort_keys=True))
' "$1"; }
if diff <(strip "$out/straight/metrics.jsonl") <(strip "$out/killed/metrics.jsonl") >/dev/null; then
  echo "metrics: identical ($(wc -l <"$out/straight/metrics.jsonl") steps, timings aside)"
else
  echo "metrics: DIFFER"; exit 1
fi
if cmp -s "$out/straight/adapter/adapter_model.safetensors" "$out/killed/adapter/adapter_model.safetensors"; then
  echo "adapter: byte-identical ($(du -h "$out/straight/adapter/adapter_model.safetensors" | cut -f1))"
else
  echo "adapter: DIFFERS"; exit 1
fi
du -sh "$out/straight/checkpoints"/* "$out/straight/adapter" "$out/straight"
echo "== r2m generate --adapter"
"$r2m" generate --model smollm2 --adapter "$out/straight/adapter" --chat --max-new-tokens 48 \
  --prompt "How do I keep my houseplants alive?"
