#!/usr/bin/env python3
"""The r2m / PyTorch table from files of benchmark JSON lines (what `r2m bench` and
`scripts/reference/bench_torch.py --json` print; other lines are ignored). Repeated runs of a case
are averaged (the range is shown); r2m rows labelled `"label": "baseline"` (an older build, from
`bench_compare.py --baseline`) get their own column.

  python3 scripts/bench_table.py OUT/*.txt
"""

from __future__ import annotations

import json
import sys


def dtype(r: dict) -> str:
    if "dtype" in r:
        return r["dtype"]
    return "bf16" if "bf16" in str(r.get("backend", "")) else "f32"


def key(r: dict) -> tuple:
    s = r.get("scenario")
    if s == "generate":
        return (dtype(r), s, f"batch {r.get('batch')}", r.get("mode"))
    top = r.get("train_top")
    return (dtype(r), s, f"{r.get('batch')}x{r.get('seq')}", f"top:{top}" if top else "all")


def side(r: dict) -> str | None:
    """Which column a row belongs to: `torch`, `r2m`, or `baseline` (an older r2m build)."""
    if r.get("impl") == "torch":
        return "torch"
    if r.get("impl") == "r2m":
        return "baseline" if r.get("label") == "baseline" else "r2m"
    return None


def cell(values: list[float]) -> str:
    """Mean, with the range when there are several runs."""
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} [{min(values):.1f}-{max(values):.1f}]"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "-"
    return f"{(sum(a) / len(a)) / (sum(b) / len(b)):.2f}x"


def table(rows: list[dict]) -> str:
    """One line per case: r2m and PyTorch tokens/s (mean [min-max] over repeated runs) and their
    ratio; with baseline rows, also the baseline build and r2m / baseline."""
    cases: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        who = side(r)
        if who is None or r.get("scenario") not in ("generate", "train", "forward"):
            continue
        cases.setdefault(key(r), {}).setdefault(who, []).append(r)
    with_base = any("baseline" in c for c in cases.values())
    head = f"{'case':<40} {'r2m tok/s':>22} {'torch tok/s':>22} {'r2m/torch':>10}"
    if with_base:
        head += f" {'baseline tok/s':>22} {'r2m/baseline':>12}"
    lines = [head + "  notes"]
    for k, by in cases.items():
        if "r2m" not in by:
            continue
        tps = {w: [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")] for w, rs in by.items()}
        mine, theirs, base = tps.get("r2m", []), tps.get("torch", []), tps.get("baseline", [])
        line = f"{' '.join(map(str, k)):<40} {cell(mine):>22} {cell(theirs):>22} {ratio(mine, theirs):>10}"
        if with_base:
            line += f" {cell(base):>22} {ratio(mine, base):>12}"
        notes = []
        for who, label in (("r2m", "r2m"), ("torch", "torch")):
            mfu = [r["mfu"] for r in by.get(who, []) if r.get("mfu")]
            if mfu:
                notes.append(f"{label} MFU {100 * sum(mfu) / len(mfu):.1f}%")
        lines.append(f"{line}  {', '.join(notes)}")
    return "\n".join(lines)


def json_lines(text: str, echo: bool = False) -> list[dict]:
    """The JSON objects among `text`'s lines; with `echo`, print the other lines indented."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        elif line and echo:
            print("  " + line, flush=True)
    return rows


def read(paths: list[str]) -> list[dict]:
    return [r for p in paths for r in json_lines(open(p, errors="replace").read())]


if __name__ == "__main__":
    print(table(read(sys.argv[1:])))
