#!/usr/bin/env python3
"""Generate the PyTorch/transformers reference fixtures that r2m's Rust tests
compare against.

Writes (under --out, default tests/fixtures):
  smollm2_parity.json            SmolLM2-135M-Instruct (GGUF Q4_1, dequantized by
                                 transformers to f32): tokenization, top-50 last
                                 position logits, 32-token greedy continuations,
                                 chat template + tricky tokenizer strings.
  tiny/<name>/                   tiny random-weight HF checkpoints
                                 (config.json + *.safetensors)
  tiny/<name>.json               input_ids, full logits, final-norm hidden states

Usage:
  python3 scripts/reference/make_fixtures.py [--gguf PATH] [--out tests/fixtures]
         [--skip-smollm2] [--skip-tiny] [--config-style v5|legacy|both]
         [--export-hf /tmp/smollm2_hf]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_GGUF,
    REPO_ROOT,
    SMOLLM2_SHA256,
    f32,
    load_causal_lm,
    load_gguf_model,
    load_gguf_tokenizer,
    round_nested,
    set_threads,
    sha256_file,
)

GREEDY_NEW_TOKENS = 32
TOP_K = 50

# --------------------------------------------------------------------------
# SmolLM2 parity fixture
# --------------------------------------------------------------------------

CASES = [
    {"name": "plain_capital", "chat": False, "prompt": "The capital of France is"},
    {"name": "plain_story", "chat": False, "prompt": "Once upon a time, in a small village,"},
    {
        "name": "code_fibonacci",
        "chat": False,
        "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    },
    {
        "name": "chat_user",
        "chat": True,
        "prompt": "What is the boiling point of water?",
        "messages": [{"role": "user", "content": "What is the boiling point of water?"}],
    },
    {
        "name": "chat_system_user",
        "chat": True,
        "prompt": "Name three primary colors.",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
            {"role": "user", "content": "Name three primary colors."},
        ],
    },
]

TOKENIZER_STRINGS = [
    "Café naïve résumé Ångström",
    "I love 🦀 and 🚀!",
    "multiple    spaces   here",
    "line one\nline two\n\n\ttabbed\r\n",
    "12345 and 3.14159 and 1,000,000",
    "don't won't they'll I'm",
    " leading space",
    "trailing spaces   ",
    "你好，世界！今天天气很好。",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def render_chat(tok, messages) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str), type(text)
    return text


def chat_ids_via_template(tok, messages) -> list[int]:
    """Token ids straight from apply_chat_template (transformers 5 returns a
    BatchEncoding with return_dict=True; 4.x may return a list)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = out["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy loop: full forward each step (no KV cache), argmax, no EOS stop."""
    seq = list(ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        nxt = int(torch.argmax(logits).item())
        out.append(nxt)
        seq.append(nxt)
    return out


def make_smollm2(gguf: str, out_dir: Path) -> None:
    import transformers

    gguf_path = Path(gguf)
    print(f"[smollm2] hashing {gguf_path}")
    digest = sha256_file(gguf_path)
    if digest != SMOLLM2_SHA256:
        raise SystemExit(f"sha256 mismatch: {digest} != {SMOLLM2_SHA256}")

    tok = load_gguf_tokenizer(gguf)
    model = load_gguf_model(gguf)
    cfg = model.config
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "expected tied lm_head"

    cases = []
    for c in CASES:
        if c["chat"]:
            text = render_chat(tok, c["messages"])
        else:
            text = c["prompt"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_special = tok(text, add_special_tokens=True)["input_ids"]
        assert ids == ids_special, f"tokenizer added special tokens for {c['name']}: {ids_special[:3]}"
        if c["chat"]:
            tmpl_ids = chat_ids_via_template(tok, c["messages"])
            assert tmpl_ids == ids, f"apply_chat_template ids differ for {c['name']}"

        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, TOP_K)
        top_ids = [int(i) for i in top.indices.tolist()]
        top_logits = [f32(v) for v in top.values.tolist()]
        assert top_ids[0] == int(torch.argmax(logits)), "top-1 != argmax"
        assert all(a >= b for a, b in zip(top_logits, top_logits[1:])), "not descending"

        g = greedy(model, ids, GREEDY_NEW_TOKENS)
        assert g[0] == top_ids[0]
        gtext = tok.decode(g, skip_special_tokens=False)
        print(f"[smollm2] {c['name']}: {len(ids)} prompt tokens, top1={top_ids[0]} ({top_logits[0]:.4f})")
        print(f"          greedy: {gtext!r}")
        cases.append(
            {
                "name": c["name"],
                "prompt": c["prompt"],
                "chat": c["chat"],
                "messages": c.get("messages"),
                "text": text,
                "input_ids": ids,
                "top_ids": top_ids,
                "top_logits": top_logits,
                "greedy_ids": g,
                "greedy_text": gtext,
            }
        )

    tok_cases = []
    for s in TOKENIZER_STRINGS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        # Round trip sanity (byte-level BPE should be lossless).
        assert tok.decode(ids, skip_special_tokens=False) == s, f"decode round trip failed for {s!r}"
        tok_cases.append({"text": s, "ids": ids})

    fixture = {
        "model_file": gguf_path.name,
        "sha256": digest,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenize_note": (
            "input_ids = tokenizer(text, add_special_tokens=False).input_ids; for this GGUF "
            "(tokenizer.ggml.add_bos_token=false) add_special_tokens=True gives identical ids, i.e. no BOS "
            "is prepended. Chat 'text' = apply_chat_template(messages, tokenize=False, "
            "add_generation_prompt=True); its special tokens (<|im_start|>, <|im_end|>) are matched as "
            "single tokens inside the text, and ids equal apply_chat_template(tokenize=True)."
        ),
        "logits_note": (
            "Model = transformers GGUF loader (dequantized to float32, Q/K reverse-permuted), eager attention, "
            "no KV cache. top_ids/top_logits: top-50 of the last position's logits, descending; logits are "
            "float32 values written as shortest round-trip decimals. greedy_ids: 32 argmax steps (full "
            "recompute each step), not stopping at EOS."
        ),
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": cfg.vocab_size,
        "chat_template": tok.chat_template,
        "cases": cases,
        "tokenizer_cases": tok_cases,
    }
    out = out_dir / "smollm2_parity.json"
    out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"[smollm2] wrote {out} ({out.stat().st_size} bytes)")


def export_smollm2_hf(gguf: str, out: Path) -> None:
    """Save the transformers-dequantized GGUF model as a plain f32 HF checkpoint
    (what check_saved.py expects r2m to be able to write)."""
    model = load_gguf_model(gguf)
    # The weights are already dequantized f32 tensors; drop the GGUF "quantizer"
    # bookkeeping, otherwise save_pretrained refuses ("not serializable").
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    print(f"[export] wrote {out}: {sorted(p.name for p in out.iterdir())}")


# --------------------------------------------------------------------------
# Tiny random checkpoints
# --------------------------------------------------------------------------

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def tiny_specs():
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    return [
        {
            "name": "tiny-llama3",
            "config": LlamaConfig(
                **COMMON,
                num_key_value_heads=2,
                max_position_embeddings=512,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
            ),
            "dtype": torch.float32,
            "max_shard_size": "200KB",
            "seed": 1001,
        },
        {
            "name": "tiny-qwen2",
            "config": Qwen2Config(
                **COMMON,
                num_key_value_heads=2,
                max_position_embeddings=512,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
            ),
            "dtype": torch.bfloat16,
            "max_shard_size": None,
            "seed": 1002,
        },
        {
            "name": "tiny-neox",
            "config": GPTNeoXConfig(
                **COMMON,
                max_position_embeddings=512,
                rotary_pct=0.25,
                rotary_emb_base=10000,
                use_parallel_residual=True,
                tie_word_embeddings=False,
            ),
            "dtype": torch.float16,
            "max_shard_size": None,
            "seed": 1003,
        },
        {
            "name": "tiny-neox-seq",
            "config": GPTNeoXConfig(
                **COMMON,
                max_position_embeddings=512,
                rotary_pct=0.25,
                rotary_emb_base=10000,
                use_parallel_residual=False,
                tie_word_embeddings=False,
            ),
            "dtype": torch.float32,
            "max_shard_size": None,
            "seed": 1004,
        },
    ]


def init_weights(model, seed: int, std: float = 0.2, norm_noise: float = 0.1) -> None:
    """Large-ish random init so logits/hidden states are not all ~0.
    Norm weights = 1 + N(0, norm_noise); norm biases = N(0, norm_noise);
    everything else (embeddings, linears, biases) = N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params appear once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                val = (1.0 + norm_noise * noise) if name.endswith("weight") else norm_noise * noise
            else:
                val = std * noise
            p.copy_(val.to(p.dtype))


def final_norm_module(model):
    base = model.base_model
    for attr in ("norm", "final_layer_norm"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise RuntimeError(f"no final norm on {type(base)}")


def rewrite_config(config_path: Path, style: str) -> None:
    """transformers 5 writes `rope_parameters` (with rope_theta / partial_rotary_factor nested) and `dtype`.
    Checkpoints on the Hub (saved by transformers 4.x) use top-level `rope_theta`, `rope_scaling`,
    `rotary_pct`, `rotary_emb_base` and `torch_dtype`.
      v5:     leave config.json as transformers wrote it
      legacy: 4.x-style keys only
      both:   v5 keys plus the equivalent 4.x keys (same values)"""
    if style == "v5":
        return
    cfg = json.loads(config_path.read_text())
    rp = cfg.get("rope_parameters") or {}
    legacy = {}
    if "dtype" in cfg:
        legacy["torch_dtype"] = cfg["dtype"]
    if "rope_theta" in rp:
        if cfg["model_type"] == "gpt_neox":
            legacy["rotary_emb_base"] = rp["rope_theta"]
        else:
            legacy["rope_theta"] = rp["rope_theta"]
    if cfg["model_type"] == "gpt_neox":
        legacy["rotary_pct"] = rp.get("partial_rotary_factor", 1.0)
    else:
        rtype = rp.get("rope_type", "default")
        legacy["rope_scaling"] = (
            None if rtype == "default" else {k: v for k, v in rp.items() if k != "rope_theta"}
        )
    if style == "legacy":
        cfg.pop("rope_parameters", None)
        cfg.pop("dtype", None)
    elif style != "both":
        raise ValueError(style)
    cfg.update(legacy)
    cfg = dict(sorted(cfg.items()))
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_tiny(out_dir: Path, config_style: str = "both") -> None:
    from transformers import AutoModelForCausalLM

    tiny_dir = out_dir / "tiny"
    tiny_dir.mkdir(parents=True, exist_ok=True)
    for spec in tiny_specs():
        name = spec["name"]
        torch.manual_seed(spec["seed"])
        model = AutoModelForCausalLM.from_config(spec["config"])
        init_weights(model, spec["seed"])
        model = model.to(spec["dtype"]).eval()

        d = tiny_dir / name
        if d.exists():
            shutil.rmtree(d)
        save_kwargs = {"safe_serialization": True}
        if spec["max_shard_size"]:
            save_kwargs["max_shard_size"] = spec["max_shard_size"]
        model.save_pretrained(str(d), **save_kwargs)
        # drop generation_config.json: not needed by r2m, keeps dirs minimal
        gc = d / "generation_config.json"
        if gc.exists():
            gc.unlink()

        # Reference: reload what was saved, upcast to float32.
        ref = load_causal_lm(d)
        g = torch.Generator().manual_seed(spec["seed"] + 7)
        input_ids = torch.randint(0, spec["config"].vocab_size, (2, 12), generator=g)
        assert not torch.equal(input_ids[0], input_ids[1])

        captured = {}
        h = final_norm_module(ref).register_forward_hook(lambda m, a, o: captured.__setitem__("norm", o))
        with torch.no_grad():
            out = ref(input_ids, output_hidden_states=True)
        h.remove()
        normed = captured["norm"]
        last_hs = out.hidden_states[-1]
        same = torch.allclose(last_hs, normed, atol=0, rtol=0)
        print(f"[tiny] {name}: hidden_states[-1] is after final norm: {same}")
        hidden = normed[0]  # always use the explicitly captured post-norm tensor
        # logits must be lm_head(post-norm hidden)
        lm = ref.get_output_embeddings().weight
        bias = getattr(ref.get_output_embeddings(), "bias", None)
        re_logits = normed @ lm.T + (bias if bias is not None else 0)
        assert torch.allclose(re_logits, out.logits, atol=1e-5), "logits != lm_head(norm(h))"

        logits = out.logits.float()

        # Optionally add/replace 4.x-style config keys, then prove the reloaded model is identical.
        rewrite_config(d / "config.json", config_style)
        ref2 = load_causal_lm(d)
        with torch.no_grad():
            out2 = ref2(input_ids)
        assert torch.equal(out2.logits, out.logits), "config rewrite changed the model"
        rp1 = getattr(ref.config, "rope_parameters", None)
        rp2 = getattr(ref2.config, "rope_parameters", None)
        assert rp1 == rp2, (rp1, rp2)

        print(
            f"[tiny] {name}: logits std={logits.std():.3f} absmax={logits.abs().max():.3f} "
            f"hidden std={hidden.std():.3f}; files={sorted(p.name for p in d.iterdir())}"
        )
        fixture = {
            "model_dir": name,
            "model_type": spec["config"].model_type,
            "stored_dtype": str(spec["dtype"]).removeprefix("torch."),
            "config_style": config_style,
            "note": (
                "logits/hidden computed by transformers after reloading the saved dir with dtype=float32 "
                "(stored bf16/f16 weights upcast), eager attention, no padding, positions 0..seq-1. "
                "hidden = output of the final norm for sequence 0. Floats rounded to 7 significant digits."
            ),
            "input_ids": input_ids.tolist(),
            "logits": round_nested(logits),
            "hidden": round_nested(hidden),
        }
        (tiny_dir / f"{name}.json").write_text(json.dumps(fixture, separators=(",", ":")) + "\n")


def report_sizes(out_dir: Path) -> None:
    total = 0
    for p in sorted(out_dir.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.stat().st_size:>9}  {p.relative_to(out_dir)}")
    print(f"  {total:>9}  TOTAL")
    for d in sorted((out_dir / "tiny").iterdir()) if (out_dir / "tiny").exists() else []:
        if d.is_dir():
            sz = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            assert sz < 1_000_000, f"{d} too big: {sz}"
    assert total < 2_000_000, f"fixtures too big: {total}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct.Q4_1.gguf path")
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument(
        "--export-hf",
        metavar="DIR",
        help="also save the dequantized SmolLM2 as an f32 HF checkpoint in DIR (~540 MB; not a fixture)",
    )
    ap.add_argument(
        "--config-style",
        choices=["v5", "legacy", "both"],
        default="both",
        help="tiny config.json keys: as transformers 5 writes them (v5), 4.x/Hub style (legacy), or both",
    )
    args = ap.parse_args()

    set_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.export_hf:
        export_smollm2_hf(args.gguf, Path(args.export_hf))
    if not args.skip_smollm2:
        make_smollm2(args.gguf, out_dir)
    if not args.skip_tiny:
        make_tiny(out_dir, args.config_style)
    report_sizes(out_dir)


if __name__ == "__main__":
    main()
