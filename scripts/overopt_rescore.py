#!/usr/bin/env python3
"""Rescore an over-optimization experiment with a stricter repetition gate (a diagnostic).

The quality gold (r2m-experiments/src/gold.rs) fails a response as repetitive when more than
20% of its word 3-grams repeat. A policy can stay under that by changing a word in each repeat
("The film captivated audiences worldwide. It captivated audiences."). This script adds one
criterion to the repetition gate, calibrated like the fluency gate on the initial policy:

    near-verbatim  = content-word type-token ratio < tau
    content words  = the gold's words (gold.rs `words`) minus its FUNCTION_WORDS
    tau            = 5th percentile of that ratio over the initial policy's held-out responses
                     (step 0, the same in every run)

A response that already failed the repetition gate is unchanged; one that passed it and is
near-verbatim loses the gate's penalty (2.0), as if it had failed it. The script reads only the
experiment's files (no model): each finished run's `samples.jsonl` (the share of training samples
failing each rule) and `heldout.jsonl`. The runs that kept their held-out responses are copied
with their gold rescored, and r2m's own report (`r2m experiment overopt --report-only`, the
binary in $R2M, default target/release/r2m) gives their verdicts, beside the experiment's.

    python3 scripts/overopt_rescore.py docs/overopt/2026-12-07-sweep > rescore.md
"""

import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLD_RS = ROOT / "r2m-experiments" / "src" / "gold.rs"
R2M = os.environ.get("R2M", str(ROOT / "target" / "release" / "r2m"))
PENALTY = 2.0
# gold.rs's GoldConfig defaults (the sweep keeps them; only `finish` differs).
MAX_TRIGRAM_SHARE, MAX_WORD_SHARE, MAX_PUNCT_RUN, MAX_EXCLAMATIONS = 0.2, 0.3, 2, 3
SEPARATORS = set("“”‘«»—–…")


def function_words():
    """FUNCTION_WORDS, read from gold.rs so that the two cannot drift apart."""
    block = re.search(r"const FUNCTION_WORDS: &\[&str\] = &\[(.*?)\];", GOLD_RS.read_text(), re.S)
    return set(re.findall(r'"([^"]+)"', block.group(1)))


FUNCTION_WORDS = function_words()


def words(text):
    """gold.rs `words`: lower case, split at whitespace and ASCII punctuation but `'`."""
    text = text.lower().replace("’", "'")
    out, cur = [], ""
    for c in text:
        if c.isspace() or (c in string.punctuation and c != "'") or c in SEPARATORS:
            out.append(cur)
            cur = ""
        else:
            cur += c
    out.append(cur)
    return [w.strip("'") for w in out if w.strip("'")]


def punctuation_spam(text):
    bang_run = symbol_run = 0
    prev = None
    for c in text:
        bang_run = bang_run + 1 if c in "!?" else 0
        symbol = not c.isalnum() and not c.isspace()
        symbol_run = 0 if not symbol else (symbol_run + 1 if prev == c else 1)
        if bang_run > MAX_PUNCT_RUN or symbol_run > 3:
            return True
        prev = c
    return text.count("!") > MAX_EXCLAMATIONS


def repetitive(text):
    """gold.rs `repetitive` with the defaults."""
    w = words(text)
    tri = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    tri_share = (len(tri) - len(set(tri))) / len(tri) if tri else 0.0
    counts = {}
    for x in w:
        if x not in FUNCTION_WORDS:
            counts[x] = counts.get(x, 0) + 1
    top = max(counts.values(), default=0)
    return (tri_share > MAX_TRIGRAM_SHARE or (top >= 3 and top / max(1, len(w)) > MAX_WORD_SHARE)
            or punctuation_spam(text))


def content_ttr(text):
    c = [x for x in words(text) if x not in FUNCTION_WORDS]
    return len(set(c)) / len(c) if c else 1.0


def finished_runs(exp):
    for run in sorted((exp / "runs").iterdir()):
        if (run / "done.json").exists():
            yield run


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rescored(point, tau):
    """The held-out gold of one evaluation with near-verbatim text failing the repetition gate."""
    out = []
    for g, r in zip(point["gold"], point["responses"]):
        out.append(g - PENALTY if content_ttr(r) < tau and not repetitive(r) else g)
    return out


def verdicts_of_rescored_copy(exp, runs, heldout, tau):
    """Per-run verdicts (report.json's `methods.<m>.runs`) of a copy of `exp` whose held-out
    gold is rescored: r2m's own report (`--report-only`) computes them, as for the real gold."""
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        shutil.copy(exp / "experiment.toml", out)
        for run in runs:
            dest = out / "runs" / run.name
            dest.mkdir(parents=True)
            for f in ("metrics.jsonl", "done.json"):
                shutil.copy(run / f, dest)
            lines = [json.dumps(dict(p, gold=rescored(p, tau))) for p in heldout[run.name]]
            (dest / "heldout.jsonl").write_text("\n".join(lines) + "\n")
        subprocess.run([R2M, "experiment", "overopt", "--resume", str(out), "--report-only"],
                       check=True, stdout=subprocess.DEVNULL)
        return run_verdicts(out / "report.json")


def run_verdicts(report_json):
    """`{run name: its verdict}` from a report.json."""
    methods = json.loads(Path(report_json).read_text())["methods"]
    return {f"{m}-seed{v['seed']}": v for m, row in methods.items() for v in row["runs"]}


def main():
    exp = Path(sys.argv[1])
    runs = list(finished_runs(exp))
    heldout = {run.name: read_jsonl(run / "heldout.jsonl") for run in runs}
    # The held-out sampling seed depends only on the step: every run's step 0 holds the same
    # responses of the initial policy. Keep one copy of each.
    step0 = list(dict.fromkeys(r for pts in heldout.values() for p in pts
                               if p["step"] == 0 and p.get("responses") for r in p["responses"]))
    if not step0:
        sys.exit(f"{exp}: no finished run kept its step-0 held-out responses")
    tau = percentile([content_ttr(r) for r in step0], 0.05)
    # The replication check: a response the Python gate calls repetitive failed a gate in r2m.
    mismatched = sum(1 for pts in heldout.values() for p in pts for g, r in
                     zip(p["gold"], p.get("responses") or []) if repetitive(r) and g > -1.0)

    print(f"# Stricter repetition gate: a rescoring of `{exp}`\n")
    print(f"Generated by `python3 scripts/overopt_rescore.py {exp}`. Near-verbatim: content-word "
          f"type-token ratio below tau = {tau:.3f}, the 5th percentile of the initial policy's "
          f"{len(step0)} distinct step-0 held-out responses. Replication check: {mismatched} "
          "responses the script calls repetitive scored above -1 in r2m (0 expected).\n")

    print("## Training samples failing each rule (4 kept per step)\n")
    print("| run | steps 1-16: repetitive / near-verbatim | steps 65-80: repetitive / near-verbatim |")
    print("|---|---|---|")
    for run in runs:
        samples = read_jsonl(run / "samples.jsonl")
        cells = []
        for lo, hi in ((1, 16), (65, 80)):
            window = [s["response"] for s in samples if lo <= s["step"] <= hi]
            rep = sum(map(repetitive, window))
            near = sum(1 for r in window if not repetitive(r) and content_ttr(r) < tau)
            cells.append(f"{rep}/{len(window)} / {near}/{len(window)}")
        print(f"| {run.name} | {cells[0]} | {cells[1]} |")

    print("\n## Held-out gold, as r2m scored it and rescored (runs that kept every response)\n")
    print("Both verdicts come from r2m's report (`r2m experiment overopt --report-only`): the "
          "first from the experiment's own `report.json`, the second from a copy whose held-out "
          "gold is rescored.\n")
    print("| run | gate | peak step | peak (odd half) | final (odd half) | drop [95% CI] | falls |")
    print("|---|---|---|---|---|---|---|")
    kept = [run for run in runs if all(p.get("responses") for p in heldout[run.name])]
    verdicts = (("r2m's", run_verdicts(exp / "report.json")),
                ("stricter", verdicts_of_rescored_copy(exp, kept, heldout, tau)))
    for run in kept:
        for label, of in verdicts:
            v = of[run.name]
            d = v["drop"]
            print(f"| {run.name} | {label} | {v['peak_step']} | {v['gold_peak']:+.2f} | "
                  f"{v['gold_final_half']:+.2f} | {d['mean']:+.2f} [{d['ci95_low']:+.2f}, "
                  f"{d['ci95_high']:+.2f}] | {'yes' if v['overoptimized'] else 'no'} |")

if __name__ == "__main__":
    main()
