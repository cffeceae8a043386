#!/usr/bin/env python3
"""r2m against PyTorch, side by side on the same machine, in one command.

Runs `r2m bench` and `scripts/reference/bench_torch.py` with the same sizes, one after the
other, collects their JSON lines and prints tokens/s of each with the ratio r2m / PyTorch.

  # CPU (2 threads for PyTorch, as many as flex uses), real SmolLM2 weights:
  python3 scripts/bench_compare.py --device cpu --model gguf --scenarios generate,train \
      --gen-batches 1,8
  # GPU, random weights of the SmolLM2 architecture (speed does not depend on the values):
  python3 scripts/bench_compare.py --device cuda --dtype bf16 --model random

  # Before/after an optimisation on a noisy machine: an older build as a third column, 2 rounds:
  python3 scripts/bench_compare.py --baseline /tmp/r2m-before --repeat 2 --scenarios generate \
      --gen-batches 1,8

Every JSON line of every side is also appended to --out (default bench-results.jsonl), tagged with
its side (`label`) and round (`rep`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_table import json_lines, table  # noqa: E402

CONFIG = HERE / "reference" / "smollm2-135m-config.json"


def run(cmd: list[str], timeout: float) -> list[dict]:
    print("$", " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"  timed out after {timeout:.0f}s", flush=True)
        p = None
    else:
        out = p.stdout
        if p.returncode != 0:
            print(f"  exit {p.returncode}\n{p.stderr[-3000:]}", flush=True)
    return json_lines(out, echo=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r2m", default="target/release/r2m", help="the r2m binary")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--model", default="gguf", choices=["gguf", "random"],
                    help="gguf: the real SmolLM2 weights; random: its architecture, random weights")
    ap.add_argument("--scenarios", default="generate,train")
    ap.add_argument("--gen-batches", default="1,8,64")
    ap.add_argument("--gen-prompt", type=int, default=64)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--train-top", type=int, default=None)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak of the accelerator for --dtype, for MFU")
    ap.add_argument("--timeout", type=float, default=1800, help="per side, seconds")
    ap.add_argument("--out", default="bench-results.jsonl")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-r2m", action="store_true")
    ap.add_argument("--baseline", default=None,
                    help="an older r2m binary to compare against (before/after an optimisation)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every side this many times, alternating, and average (noisy machines)")
    a = ap.parse_args()

    scen = a.scenarios.split(",")
    r2m_model = f"random:{CONFIG}" if a.model == "random" else "smollm2"
    r2m_cmd = [a.r2m, "--device", a.device, "--dtype", a.dtype, "bench", *scen,
               "--model", r2m_model, "--batch", str(a.batch), "--seq", str(a.seq),
               "--iters", str(a.iters), "--gen-batches", a.gen_batches,
               "--gen-prompt", str(a.gen_prompt), "--gen-new", str(a.gen_new)]
    if a.train_top is not None:
        r2m_cmd += ["--train-top", str(a.train_top)]
    if a.peak_tflops:
        r2m_cmd += ["--peak-tflops", str(a.peak_tflops)]
    torch_cmd = [sys.executable, str(HERE / "reference" / "bench_torch.py"), "--json",
                 "--device", a.device, "--dtype", a.dtype, "--scenarios", a.scenarios,
                 "--batch", str(a.batch), "--seq", str(a.seq), "--iters", str(a.iters),
                 "--gen-iters", str(a.iters), "--gen-batches", a.gen_batches,
                 "--gen-prompt", str(a.gen_prompt), "--gen-new", str(a.gen_new),
                 "--threads", str(a.threads)]
    if a.model == "random":
        torch_cmd += ["--random-init"]
    if a.train_top is not None:
        torch_cmd += ["--train-top", str(a.train_top)]

    def tagged(rows: list[dict], label: str, rep: int) -> list[dict]:
        return [{**r, "label": label, "rep": rep} for r in rows]

    # Alternate the sides within each repeat, so that a slow spell of the machine hits all of them.
    rows: list[dict] = []
    for rep in range(a.repeat):
        if a.baseline:
            rows += tagged(run([a.baseline, *r2m_cmd[1:]], a.timeout), "baseline", rep)
        if not a.skip_r2m:
            rows += tagged(run(r2m_cmd, a.timeout), "r2m", rep)
        if not a.skip_torch:
            rows += tagged(run(torch_cmd, a.timeout), "torch", rep)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    print()
    print(table(rows))

if __name__ == "__main__":
    main()
