#!/usr/bin/env python3
"""The r2m / PyTorch table from files of benchmark JSON lines (what `r2m bench` and
`scripts/reference/bench_torch.py --json` print; other lines are ignored).

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


def table(rows: list[dict]) -> str:
    torch = {key(r): r for r in rows if r.get("impl") == "torch"}
    lines = [f"{'case':<40} {'r2m tok/s':>10} {'torch tok/s':>12} {'r2m/torch':>10}  notes"]
    for r in rows:
        if r.get("impl") != "r2m" or r.get("scenario") not in ("generate", "train", "forward"):
            continue
        k = key(r)
        o = torch.get(k)
        mine, theirs = r.get("tokens_per_s"), (o or {}).get("tokens_per_s")
        ratio = f"{mine / theirs:.2f}x" if mine and theirs else "-"
        notes = []
        if r.get("mfu"):
            notes.append(f"r2m MFU {100 * r['mfu']:.1f}%")
        if o and o.get("mfu"):
            notes.append(f"torch MFU {100 * o['mfu']:.1f}%")
        lines.append(f"{' '.join(map(str, k)):<40} {mine or 0:>10.1f} {theirs or 0:>12.1f} {ratio:>10}  {', '.join(notes)}")
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
