#!/usr/bin/env python3
"""PyTorch CPU baseline for SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to f32
by transformers), to compare r2m's throughput against.

Scenarios (tokens/s):
  forward   no-grad forward, batch x seq tokens per iteration
  train     forward + backward + AdamW step, all params trainable,
            loss = mean next-token cross-entropy; batch x seq tokens per step
  generate  HF generate(), greedy, KV cache, prompt --gen-prompt tokens,
            exactly --gen-new new tokens (min_new_tokens = max_new_tokens);
            tokens/s = new tokens x batch / wall time (prefill included)

  python3 scripts/reference/bench_torch.py [--scenarios forward,train,generate] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_GGUF, load_gguf_model, set_threads  # noqa: E402


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies from /proc/stat, to flag runs disturbed by a noisy host."""
    try:
        vals = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return vals[7], sum(vals)
    except (OSError, IndexError, ValueError):
        return None


def matmul_gflops() -> float:
    """Quick calibration: f32 1024x1024 matmul GFLOP/s with the configured threads."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n = 10
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def timed(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    c0 = cpu_times()
    p0, w0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    c1 = cpu_times()
    global LAST_STEAL_PCT, LAST_CPU_UTIL
    # process CPU seconds per wall second; ~= --threads when the cores are not shared
    LAST_CPU_UTIL = round((time.process_time() - p0) / (time.perf_counter() - w0), 2)
    if c0 and c1 and c1[1] > c0[1]:
        LAST_STEAL_PCT = round(100.0 * (c1[0] - c0[0]) / (c1[1] - c0[1]), 1)
    return times


LAST_STEAL_PCT = None
LAST_CPU_UTIL = None
CALIBRATION_GFLOPS = None


def emit(args, rec: dict) -> None:
    rec = {"impl": "pytorch", **rec, "threads": args.threads, "torch": torch.__version__,
           "cpu_util": LAST_CPU_UTIL, "cpu_steal_pct": LAST_STEAL_PCT, "matmul_gflops": CALIBRATION_GFLOPS}
    if args.json:
        print(json.dumps(rec), flush=True)
    else:
        extra = ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("impl", "scenario", "tokens_per_s"))
        print(f"{rec['scenario']:>9}: {rec['tokens_per_s']:10.1f} tok/s  ({extra})", flush=True)


def bench_forward(model, args, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    model.eval()

    def step():
        with torch.inference_mode():
            model(ids, use_cache=False)

    times = timed(step, args.warmup, args.iters)
    med = statistics.median(times)
    emit(args, {"scenario": "forward", "batch": args.batch, "seq": args.seq,
                "tokens_per_s": args.batch * args.seq / med, "median_s": round(med, 4),
                "iters": args.iters})


def bench_train(model, args, vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        losses.append(loss.item())

    times = timed(step, args.warmup_train, args.iters)
    med = statistics.median(times)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    emit(args, {"scenario": "train", "batch": args.batch, "seq": args.seq,
                "tokens_per_s": args.batch * args.seq / med, "median_s": round(med, 4),
                "iters": args.iters, "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)})


def bench_generate(model, args, vocab, batch):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, args.gen_prompt), generator=g)
    mask = torch.ones_like(ids)
    model.eval()
    n_new = args.gen_new
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id

    def run(n):
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
            )
        assert out.shape == (batch, args.gen_prompt + n), out.shape
        return out

    for _ in range(args.warmup):
        run(8)
    times = timed(lambda: run(n_new), 0, args.gen_iters)
    med = statistics.median(times)
    emit(args, {"scenario": "generate", "batch": batch, "seq": n_new, "prompt": args.gen_prompt,
                "tokens_per_s": batch * n_new / med, "median_s": round(med, 4), "iters": args.gen_iters})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--scenarios", default="forward,train,generate")
    ap.add_argument("--json", action="store_true", help="one JSON line per scenario")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--warmup-train", type=int, default=1)
    ap.add_argument("--gen-prompt", type=int, default=64)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--gen-iters", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa|eager)")
    args = ap.parse_args()

    set_threads(args.threads)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - {"forward", "train", "generate"}
    if unknown:
        ap.error(f"unknown scenarios: {sorted(unknown)}")

    model = load_gguf_model(args.gguf, attn=args.attn)
    # Weights are plain f32 after dequantization; drop the GGUF quantizer marker so
    # nothing treats the model as quantized (e.g. for training).
    model.hf_quantizer = None
    model.is_quantized = False
    for p in model.parameters():
        p.requires_grad_(False)
    vocab = model.config.vocab_size
    global CALIBRATION_GFLOPS
    CALIBRATION_GFLOPS = round(matmul_gflops(), 1)

    for s in scenarios:
        if s == "forward":
            bench_forward(model, args, vocab)
        elif s == "train":
            bench_train(model, args, vocab)
        elif s == "generate":
            for b in [int(x) for x in args.gen_batches.split(",")]:
                bench_generate(model, args, vocab, b)


if __name__ == "__main__":
    main()
