#!/usr/bin/env python3
"""Pick each tuned method's RM learning rate from the tuning experiments (issue 27).

    python3 scripts/overopt_pick.py runs/sweep >> runs/sweep/sweep.toml

Reads ROOT/tune-*/report.json and experiment.toml (its `set` holds `r2m.lr=...`). For each
method, the rate whose run ended with the higher held-out gold (`methods.<m>.gold_final`: every
held-out prompt's samples at the last evaluation) wins; ties go to the smaller rate.
Prints the `[method_set]` table to stdout (the oracle, an upper bound that is not tuned, gets the
largest rate tried) and the table of what it compared to stderr.
"""
import json
import sys
import tomllib
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep")
    results: dict[str, list[tuple[float, float]]] = {}
    rates = set()
    for exp in sorted(root.glob("tune-*")):
        report = exp / "report.json"
        if not report.exists():
            sys.exit(f"{report}: missing (has the tuning experiment finished?)")
        cfg = tomllib.loads((exp / "experiment.toml").read_text())
        lr = cfg.get("r2m_lr")
        for s in cfg.get("set", []):
            key, _, value = s.partition("=")
            if key.strip() == "r2m.lr":
                lr = float(value)
        rates.add(lr)
        for method, m in json.loads(report.read_text())["methods"].items():
            results.setdefault(method, []).append((lr, m["gold_final"]["mean"]))
    if not results:
        sys.exit(f"{root}: no tune-* experiments")
    print("held-out gold at the end of each tuning run:", file=sys.stderr)
    picks = {}
    for method, rows in sorted(results.items()):
        for lr, gold in sorted(rows):
            print(f"  {method:15s} r2m.lr={lr:g}: {gold:+.3f}", file=sys.stderr)
        picks[method] = max(sorted(rows), key=lambda r: r[1])[0]
    picks["oracle"] = max(rates)
    print("\n[method_set]")
    for method, lr in picks.items():
        print(f'{method} = ["r2m.lr={lr:g}"]')
    for method, lr in picks.items():
        print(f"  picked {method}: r2m.lr={lr:g}", file=sys.stderr)


if __name__ == "__main__":
    main()
