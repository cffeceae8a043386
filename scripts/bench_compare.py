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

  # RL steps of a run config, r2m against TRL's RLOOTrainer (scripts/reference/trl_rloo_step.py):
  python3 scripts/bench_compare.py --scenarios rl-step --config configs/r2m-smollm2-hh.toml --repeat 2

rl-step: prepares once, under --prep-dir (default runs/bench-rl-step), the policy as an HF dir
(`r2m export`, so both sides run the same f32 weights) and a reward model of the same architecture
with a seeded random head (no trained RM needed); then runs `r2m bench rl-step --methods vanilla
--set reward.model=RM` and the TRL script alternately, one process at a time, each for
--rl-warmup + --rl-steps RL steps, and compares the means over the steps after the warm-up (r2m's
are recomputed from its `step N:` lines; its own JSON mean includes step 1).

Every JSON line of every side is also appended to --out (default bench-results.jsonl), tagged with
its side (`label`) and round (`rep`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_table import json_lines, table  # noqa: E402

CONFIG = HERE / "reference" / "smollm2-135m-config.json"
TRL_SCRIPT = HERE / "reference" / "trl_rloo_step.py"
VENV_PYTHON = HERE / "reference" / ".venv" / "bin" / "python"


def run_capture(cmd: list[str], timeout: float) -> tuple[list[dict], str]:
    """Run `cmd`; its stdout's JSON lines (the other lines echoed) and its stderr."""
    print("$", " ".join(map(str, cmd)), flush=True)
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(f"  timed out after {timeout:.0f}s", flush=True)
    else:
        out, err = p.stdout, p.stderr
        if p.returncode != 0:
            print(f"  exit {p.returncode}\n{p.stderr[-3000:]}", flush=True)
    return json_lines(out, echo=True), err


def run(cmd: list[str], timeout: float) -> list[dict]:
    return run_capture(cmd, timeout)[0]


# ---------------------------------------------------------------------------------------------
# rl-step: r2m against TRL's RLOOTrainer

PHASES = ("generate_s", "logprobs_s", "reward_s", "update_s")
# r2m bench rl-step's stderr, one line per step (vanilla arm)
R2M_STEP = re.compile(r"^step (\d+):.*?\bvanilla ([\d.]+)s \(generate ([\d.]+), log-probs ([\d.]+), "
                      r"reward ([\d.]+), update ([\d.]+), rm update ([\d.]+)\)")


def r2m_after_warmup(row: dict, stderr: str, warmup: int) -> dict:
    """r2m's row with `methods.vanilla` recomputed over the steps after `warmup` from its `step N:`
    lines (its JSON mean covers every step); the JSON's own mean is kept as `mean_all_steps`."""
    steps = []
    for line in stderr.splitlines():
        m = R2M_STEP.match(line.strip())
        if m:
            v = [float(x) for x in m.groups()[1:]]
            steps.append(dict(zip(("step_s", *PHASES, "rm_update_s"), v), step=int(m.group(1))))
    van = row.get("methods", {}).get("vanilla")
    timed = steps[warmup:]
    if van is None or not timed:
        return row
    mean = {k: sum(s[k] for s in timed) / len(timed) for k in ("step_s", *PHASES, "rm_update_s")}
    return {**row, "methods": {**row["methods"], "vanilla": {**van, **mean}},
            "mean_all_steps": van, "steps": steps,
            "mean_over": f"steps {warmup + 1}..{len(steps)} ({warmup} warm-up step(s) excluded)"}


def rl_config(path: str, sets: list[str]) -> dict:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for s in sets:
        key, _, val = s.partition("=")
        try:
            v = tomllib.loads(f"v = {val.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            v = val.strip()
        *parents, last = key.strip().split(".")
        t = cfg
        for p in parents:
            t = t.setdefault(p, {})
        t[last] = v
    return cfg


def prepare_rl(a, python: str) -> tuple[Path, Path]:
    """The policy as an HF dir (r2m's export of `model.policy`) and a random-head RM on it, made
    once under --prep-dir."""
    cfg = rl_config(a.config, a.set)
    policy_name = str(cfg.get("model", {}).get("policy", "smollm2"))
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", policy_name).strip("_")
    prep = Path(a.prep_dir)
    policy, rm = prep / f"policy-{tag}", prep / f"rm-random-{tag}"
    if not (policy / "config.json").exists():
        cmd = [a.r2m, "export", "--device", "cpu", "--model", policy_name, "--out", policy]
        print("$", " ".join(map(str, cmd)), flush=True)
        subprocess.run([str(c) for c in cmd], check=True)
    if not (rm / "config.json").exists():
        cmd = [python, TRL_SCRIPT, "--make-rm", rm, "--policy", policy]
        print("$", " ".join(map(str, cmd)), flush=True)
        subprocess.run([str(c) for c in cmd], check=True)
    return policy, rm


def rl_cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def rl_table(rows: list[dict]) -> str:
    """Per impl: s/step and its phases (mean over the runs of each run's post-warm-up mean), peak
    RSS, and TRL / r2m (how many times faster r2m is)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("scenario") == "rl-step" and r.get("impl") in ("r2m", "trl"):
            if r["impl"] == "r2m" and r.get("label") == "baseline":
                continue
            van = r.get("methods", {}).get("vanilla")
            if van:
                by.setdefault(r["impl"], []).append({**van, "peak_rss_mib": r.get("peak_rss_mib")})
    if not by:
        return "rl-step: no results"
    cols = ("step_s", *PHASES)
    head = f"{'impl':<5} {'runs':>4} {'s/step':>18}" + "".join(
        f" {c[:-2]:>10}" for c in cols[1:]) + f" {'peak RSS MiB':>13}"
    lines = ["rl-step (vanilla RLOO), seconds per RL step after the warm-up; mean [min-max] over runs",
             head]
    means: dict[str, dict[str, float]] = {}
    for impl in ("r2m", "trl"):
        rs = by.get(impl)
        if not rs:
            continue
        vals = {c: [r[c] for r in rs if r.get(c) is not None] for c in cols}
        means[impl] = {c: sum(v) / len(v) for c, v in vals.items() if v}
        rss = [r["peak_rss_mib"] for r in rs if r.get("peak_rss_mib")]
        lines.append(f"{impl:<5} {len(rs):>4} {rl_cell(vals['step_s']):>18}" + "".join(
            f" {rl_cell(vals[c]):>10}" for c in cols[1:]) + f" {rl_cell(rss, 0):>13}")
    if "r2m" in means and "trl" in means:
        ratio = lambda c: (f"{means['trl'][c] / means['r2m'][c]:.2f}x"  # noqa: E731
                           if means["r2m"].get(c) and c in means["trl"] else "-")
        lines.append(f"trl / r2m: {ratio('step_s')} per step (r2m that many times faster); "
                     + ", ".join(f"{c[:-2]} {ratio(c)}" for c in cols[1:]))
    return "\n".join(lines)


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
    g = ap.add_argument_group("rl-step (r2m against TRL's RLOOTrainer)")
    g.add_argument("--config", default="configs/r2m-smollm2-hh.toml", help="the RL run config (TOML)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --config on both sides (repeatable)")
    g.add_argument("--rl-steps", type=int, default=3, help="timed RL steps per run")
    g.add_argument("--rl-warmup", type=int, default=1, help="RL steps before those, left out of the means")
    g.add_argument("--prep-dir", default="runs/bench-rl-step",
                   help="where the policy HF dir and the random-head RM are made once")
    g.add_argument("--python", default=None,
                   help="Python with TRL (default: scripts/reference/.venv/bin/python when it exists)")
    g.add_argument("--skip-trl", action="store_true")
    a = ap.parse_args()

    scen = [s for s in a.scenarios.split(",") if s != "rl-step"]
    rows: list[dict] = []
    if "rl-step" in a.scenarios.split(","):
        rows += rl_step(a)
    if not scen:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return
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


def rl_step(a) -> list[dict]:
    python = a.python or (str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable)
    policy, rm = prepare_rl(a, python)
    sets = [x for s in a.set for x in ("--set", s)]
    total = a.rl_warmup + a.rl_steps
    r2m_cmd = [a.r2m, "--device", a.device, "--dtype", a.dtype, "bench", "rl-step",
               "--config", a.config, "--rl-steps", str(total), "--methods", "vanilla",
               *sets, "--set", f"reward.model={rm}"]
    trl_cmd = [python, TRL_SCRIPT, "--config", a.config, *sets, "--rl-steps", str(a.rl_steps),
               "--warmup-steps", str(a.rl_warmup), "--policy", policy, "--rm", rm,
               "--threads", str(a.threads), "--device", a.device, "--dtype", a.dtype]
    rows: list[dict] = []
    for rep in range(a.repeat):
        load = os.getloadavg()[0]
        if not a.skip_r2m:
            out, err = run_capture(r2m_cmd, a.timeout)
            rows += [{**r2m_after_warmup(r, err, a.rl_warmup), "label": "r2m", "rep": rep,
                      "loadavg_1m_before": round(load, 2)} for r in out]
            for line in err.splitlines():
                if R2M_STEP.match(line.strip()) or "prompts kept" in line:
                    print("  " + line.strip(), flush=True)
        load = os.getloadavg()[0]
        if not a.skip_trl:
            out, err = run_capture(trl_cmd, a.timeout)
            rows += [{**r, "label": "trl", "rep": rep, "loadavg_1m_before": round(load, 2)} for r in out]
            for line in err.splitlines():
                if line.startswith("step ") or "prompts kept" in line:
                    print("  " + line.strip(), flush=True)
    print()
    print(rl_table(rows))
    print(f"(1-minute load average before each run: "
          f"{', '.join(str(r.get('loadavg_1m_before')) for r in rows)}; on 2 cores anything above ~2 "
          f"means the timings are disturbed)")
    return rows


if __name__ == "__main__":
    main()
