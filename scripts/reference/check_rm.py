#!/usr/bin/env python3
"""Reward models against transformers' *ForSequenceClassification (dev tooling only).

Two modes:

  # 1. Check a reward model r2m saved: transformers must load it as a sequence
  #    classifier and give the same scores r2m gave (`r2m eval-rm --scores FILE`).
  python3 scripts/reference/check_rm.py check RM_DIR SCORES_JSONL [--limit 24] [--tol 1e-3]

  # 2. Write the committed fixture tests/fixtures/tiny/tiny-llama3-rm{,.json}: the
  #    tiny Llama-3 checkpoint plus a seeded `score.weight`, and the rewards
  #    transformers computes for a few sequences (each scored alone, no padding).
  python3 scripts/reference/check_rm.py fixture [--out tests/fixtures/tiny]

SCORES_JSONL lines: {"line", "chosen_ids", "rejected_ids", "chosen", "rejected"}.
Exits 1 when a score differs by more than --tol.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, _dtype_kwarg, set_threads  # noqa: E402


def load_rm(path):
    from transformers import AutoModelForSequenceClassification

    kwargs = {_dtype_kwarg(): torch.float32, "attn_implementation": "eager"}
    model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    model.eval()
    assert model.config.num_labels == 1, model.config.num_labels
    return model


def score(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


def check(args) -> int:
    model = load_rm(args.rm_dir)
    print(f"loaded {args.rm_dir} as {type(model).__name__}")
    worst = 0.0
    n = 0
    agree = 0
    with open(args.scores) as f:
        for raw in f:
            if n >= args.limit:
                break
            rec = json.loads(raw)
            c = score(model, rec["chosen_ids"])
            r = score(model, rec["rejected_ids"])
            d = max(abs(c - rec["chosen"]), abs(r - rec["rejected"]))
            worst = max(worst, d)
            agree += (c > r) == (rec["chosen"] > rec["rejected"])
            n += 1
            print(f"  line {rec['line']:>5}: transformers ({c:+.5f}, {r:+.5f})  r2m ({rec['chosen']:+.5f}, {rec['rejected']:+.5f})  max|diff| {d:.2e}")
    print(f"{n} pairs, max |reward diff| {worst:.3e}, same preference on {agree}/{n}")
    return 0 if worst <= args.tol else 1


def fixture(args) -> int:
    from safetensors.torch import save_file

    src = REPO_ROOT / "tests/fixtures/tiny/tiny-llama3"
    out_dir = Path(args.out) / "tiny-llama3-rm"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(src, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    g = torch.Generator().manual_seed(7)
    save_file({"score.weight": torch.randn(1, hidden, generator=g)}, str(out_dir / "score.safetensors"))
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["score.weight"] = "score.safetensors"
    index_path.write_text(json.dumps(index, indent=2))
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    cfg["num_labels"] = 1
    cfg["id2label"] = {"0": "LABEL_0"}
    cfg["label2id"] = {"LABEL_0": 0}
    cfg["pad_token_id"] = 0
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    model = load_rm(out_dir)
    # The untied lm_head of the causal checkpoint is unused by a sequence classifier.
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, cfg["vocab_size"], (n,), generator=g).tolist() for n in (5, 9, 12, 3)]
    rewards = [score(model, s) for s in seqs]
    fx = {
        "source": "scripts/reference/check_rm.py fixture (transformers LlamaForSequenceClassification, f32, each sequence alone)",
        "sequences": seqs,
        "rewards": rewards,
    }
    (Path(args.out) / "tiny-llama3-rm.json").write_text(json.dumps(fx, indent=1))
    print(f"wrote {out_dir} and tiny-llama3-rm.json: rewards {rewards}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("check")
    c.add_argument("rm_dir")
    c.add_argument("scores")
    c.add_argument("--limit", type=int, default=24)
    c.add_argument("--tol", type=float, default=1e-3)
    f = sub.add_parser("fixture")
    f.add_argument("--out", default=str(REPO_ROOT / "tests/fixtures/tiny"))
    args = p.parse_args()
    set_threads(args.threads)
    return check(args) if args.mode == "check" else fixture(args)


if __name__ == "__main__":
    sys.exit(main())
