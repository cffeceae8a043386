#!/usr/bin/env python3
"""Generate the PEFT LoRA fixtures that r2m's LoRA tests compare against (dev tooling only).

Needs `peft` besides requirements.txt (generated with peft 0.21.2, torch 2.15.0,
transformers 5.24.0; CPU, float32, eager attention).

Writes (under --out, default tests/fixtures/lora):
  <name>/adapter_config.json         a random PEFT LoRA adapter, as PEFT's save_pretrained
  <name>/adapter_model.safetensors   writes it, for one of the tiny checkpoints in
                                     tests/fixtures/tiny
  <name>.json                        the base dir, input_ids, and the logits of
                                     PeftModel.from_pretrained(base, <name>) on them

  tiny-llama3-lora: r 4, alpha 8, rsLoRA, q/v/o/gate/down of the top block only
                    (layers_to_transform = [1]);
  tiny-neox-lora:   r 2, alpha 4, query_key_value (fused q/k/v), dense and dense_4h_to_h
                    of every block.

A and B are random (normal, std 0.1, seeded), so the adapters change the logits.

Check mode: `--check DIR` loads an adapter r2m wrote (DIR/adapter_config.json,
DIR/adapter_model.safetensors) with PEFT onto the base named in DIR/r2m_logits.json and
compares PEFT's logits with r2m's (that file's `logits`), exit code 1 above --tol.
`cargo test -p r2m-tests -- --ignored lora::write_an_adapter_for_the_peft_check` writes
such a DIR (target/lora-peft-check).

Usage:
  python3 scripts/reference/make_lora_fixture.py [--out tests/fixtures/lora]
  python3 scripts/reference/make_lora_fixture.py --check target/lora-peft-check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, load_causal_lm, round_nested, set_threads  # noqa: E402

TINY = REPO_ROOT / "tests" / "fixtures" / "tiny"

SPECS = [
    {
        "name": "tiny-llama3-lora",
        "base": "tiny-llama3",
        "seed": 11,
        "lora": dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    },
    {
        "name": "tiny-neox-lora",
        "base": "tiny-neox",
        "seed": 12,
        "lora": dict(
            r=2,
            lora_alpha=4,
            target_modules=["query_key_value", "dense", "dense_4h_to_h"],
        ),
    },
]


def peft_logits(base_dir: Path, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base with the adapter, both loaded fresh from disk (float32, eager)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir), str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits.float()


def make(out_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in SPECS:
        name, base_dir = spec["name"], TINY / spec["base"]
        base = load_causal_lm(base_dir)
        cfg = LoraConfig(
            task_type="CAUSAL_LM",
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=False,
            **spec["lora"],
        )
        model = get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        d = out_dir / name
        if d.exists():
            shutil.rmtree(d)
        model.save_pretrained(str(d))
        # A path relative to tests/fixtures rather than this machine's absolute one.
        cfg_path = d / "adapter_config.json"
        saved = json.loads(cfg_path.read_text())
        saved["base_model_name_or_path"] = f"tiny/{spec['base']}"
        cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        if (d / "README.md").exists():
            (d / "README.md").unlink()

        g = torch.Generator().manual_seed(spec["seed"] + 7)
        input_ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=g)
        logits = peft_logits(base_dir, d, input_ids)
        plain = load_causal_lm(base_dir)
        with torch.no_grad():
            base_logits = plain(input_ids).logits.float()
        moved = (logits - base_logits).abs().max().item()
        print(f"[lora] {name}: logits std={logits.std():.3f}, max |adapted - base| = {moved:.3f}")
        assert moved > 1e-2, "the adapter should change the logits"
        fixture = {
            "base": f"tiny/{spec['base']}",
            "adapter": name,
            "note": (
                "logits of peft.PeftModel.from_pretrained(base, adapter) in float32, eager attention, "
                "no padding. Floats rounded to 7 significant digits."
            ),
            "input_ids": input_ids.tolist(),
            "logits": round_nested(logits),
        }
        (out_dir / f"{name}.json").write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
        files = sorted(p.name for p in d.iterdir())
        print(f"[lora] {name}: {files}")


def check(adapter_dir: Path, tol: float) -> int:
    spec = json.loads((adapter_dir / "r2m_logits.json").read_text())
    base_dir = REPO_ROOT / "tests" / "fixtures" / spec["base"]
    input_ids = torch.tensor(spec["input_ids"])
    logits = peft_logits(base_dir, adapter_dir, input_ids)
    want = torch.tensor(spec["logits"], dtype=torch.float32)
    diff = (logits - want).abs().max().item()
    print(f"[check] {adapter_dir}: max |PEFT - r2m| = {diff:.3e} (tol {tol:g})")
    return 0 if diff <= tol else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "lora")
    ap.add_argument("--check", type=Path, help="an r2m-written adapter dir with r2m_logits.json")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    if args.check is not None:
        sys.exit(check(args.check, args.tol))
    make(args.out)


if __name__ == "__main__":
    main()
