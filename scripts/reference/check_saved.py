#!/usr/bin/env python3
"""Check an HF-format checkpoint directory (e.g. one written by r2m) against a
reference fixture.

  python3 scripts/reference/check_saved.py DIR FIXTURE_JSON [--tol 1e-3]

DIR is loaded with AutoModelForCausalLM (dtype=float32, eager attention).
FIXTURE_JSON may be
  * tests/fixtures/smollm2_parity.json : for every case, the last-position
    logits at the fixture's top_ids are compared with top_logits;
  * tests/fixtures/tiny/<name>.json    : the full [batch][seq][vocab] logits
    are compared (and, informationally, the final-norm hidden states).
Prints the max |diff| per case and overall; exits 1 if it exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_causal_lm, set_threads  # noqa: E402


def final_norm_output(model, input_ids):
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "final_layer_norm", None)
    captured = {}
    hook = norm.register_forward_hook(lambda m, a, o: captured.__setitem__("h", o)) if norm is not None else None
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    if hook is not None:
        hook.remove()
    hidden = captured.get("h", out.hidden_states[-1])
    return out.logits.float(), hidden.float()


def check_smollm2(model, fx) -> float:
    worst = 0.0
    for case in fx["cases"]:
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        top_ids = torch.tensor(case["top_ids"])
        want = torch.tensor(case["top_logits"], dtype=torch.float32)
        got = logits[top_ids]
        diff = (got - want).abs().max().item()
        argmax_ok = int(torch.argmax(logits)) == case["top_ids"][0]
        print(f"  {case['name']:<20} max|diff| over top-{len(top_ids)} = {diff:.3e}  argmax matches: {argmax_ok}")
        worst = max(worst, diff)
    return worst


def check_tiny(model, fx) -> float:
    ids = torch.tensor(fx["input_ids"])
    want = torch.tensor(fx["logits"], dtype=torch.float32)
    logits, hidden = final_norm_output(model, ids)
    if logits.shape != want.shape:
        raise SystemExit(f"shape mismatch: got {tuple(logits.shape)}, fixture {tuple(want.shape)}")
    worst = 0.0
    for b in range(ids.shape[0]):
        d = (logits[b] - want[b]).abs().max().item()
        print(f"  sequence {b}: max|logit diff| = {d:.3e}")
        worst = max(worst, d)
    if "hidden" in fx:
        hd = (hidden[0] - torch.tensor(fx["hidden"], dtype=torch.float32)).abs().max().item()
        print(f"  sequence 0: max|hidden diff| = {hd:.3e} (informational)")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="HF checkpoint dir (config.json + *.safetensors)")
    ap.add_argument("fixture", help="fixture JSON")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)

    fx = json.loads(Path(args.fixture).read_text(encoding="utf-8"))
    model = load_causal_lm(args.dir)
    print(f"loaded {args.dir} ({type(model).__name__}); fixture {args.fixture}")
    if "cases" in fx:
        worst = check_smollm2(model, fx)
    elif "logits" in fx:
        worst = check_tiny(model, fx)
    else:
        raise SystemExit("unrecognised fixture format")
    ok = worst <= args.tol
    print(f"max |logit diff| = {worst:.3e} (tol {args.tol:g}) -> {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
