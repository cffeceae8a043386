#!/usr/bin/env python3
"""PyTorch baseline for SmolLM2-135M-Instruct, to compare r2m's throughput against
(`r2m bench`, r2m-cli/src/bench.rs prints the same JSON keys).

Model: by default the GGUF (Q4_1, dequantized to f32 by transformers); with
--random-init the same architecture from smollm2-135m-config.json with random
weights (speed does not depend on the values; no GGUF or tokenizer needed, so
this is the mode for a GPU machine the GGUF cannot be copied to).

Scenarios (tokens/s, median of --iters timed runs after warm-up):
  forward   no-grad forward, batch x seq tokens per iteration
  train     forward + backward + AdamW step, loss = mean next-token cross-entropy;
            batch x seq tokens per step. All params trainable, or with
            --train-top N only the top N decoder blocks + the final norm
            (embeddings / tied LM head and the lower blocks frozen, as r2m's
            `trainable = "top:N"`). Also reports achieved TFLOP/s and MFU.
  generate  HF generate() with its KV cache, prompt --gen-prompt random token ids,
            exactly --gen-new new tokens (min_new_tokens = max_new_tokens, so EOS
            never stops it), for each of --gen-batches and --gen-modes
            (greedy; sampled = temperature 1, no top-k / top-p);
            tokens/s = batch x new tokens / wall time (prefill included)

  python3 scripts/reference/bench_torch.py [--scenarios forward,train,generate] [--json]
  python3 scripts/reference/bench_torch.py --device cuda --dtype bf16 --random-init --json

Each scenario prints a human line and one JSON line (--json: the JSON lines only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DEFAULT_GGUF, load_gguf_model, set_threads  # noqa: E402

DEFAULT_CONFIG = str(HERE / "smollm2-135m-config.json")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
# Dense tensor-core peaks of an H100 SXM / H200 (TFLOP/s), used for MFU when the GPU name
# matches and --peak-tflops is not given. TF32 is what f32 matmuls run at with --tf32; with
# --no-tf32 they run on the plain FP32 units (67 TFLOP/s).
PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.0, "f32": 67.0}


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies from /proc/stat, to flag runs disturbed by a noisy host."""
    try:
        vals = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return vals[7], sum(vals)
    except (OSError, IndexError, ValueError):
        return None


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process in MiB (VmHWM, as r2m reports it)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except (ImportError, OSError):
        return None


def set_tf32(on: bool) -> None:
    """Allow (or forbid) TF32 for f32 cuBLAS matmuls and cuDNN convolutions."""
    try:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once the new API was used
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.fp32_precision = "tf32" if on else "ieee"


def tf32_enabled() -> bool:
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # mixed legacy / new (fp32_precision) API use
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops() -> float:
    """Quick calibration: f32 1024x1024 matmul GFLOP/s on the CPU with the configured threads."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n = 10
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def gpu_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Calibration on the GPU: 8192^3 matmul TFLOP/s in the benchmark dtype (TF32 per --tf32)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = time.perf_counter() - t0
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * reps / dt / 1e12


LAST_STEAL_PCT = None
LAST_CPU_UTIL = None
CALIBRATION_GFLOPS = None
CALIBRATION_GPU_TFLOPS = None


def timed(fn, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Run `fn` `warmup` times, then time `iters` runs (synchronizing the GPU before each clock
    read, so queued kernels are counted). Resets the GPU peak-memory counter first, so
    peak_gpu_mib is that of this configuration."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    c0 = cpu_times()
    p0, w0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    c1 = cpu_times()
    global LAST_STEAL_PCT, LAST_CPU_UTIL
    # process CPU seconds per wall second; ~= --threads when the cores are not shared
    LAST_CPU_UTIL = round((time.process_time() - p0) / (time.perf_counter() - w0), 2)
    LAST_STEAL_PCT = None
    if c0 and c1 and c1[1] > c0[1]:
        LAST_STEAL_PCT = round(100.0 * (c1[0] - c0[0]) / (c1[1] - c0[1]), 1)
    return times


def emit(args, rec: dict) -> None:
    """One human line (unless --json) and one JSON line; keys as r2m bench prints them."""
    dev = args.device_obj
    rec = {"impl": "torch", "backend": args.device, **rec, "dtype": args.dtype,
           "peak_rss_mib": peak_rss_mib()}
    if dev.type == "cuda":
        rec["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        rec["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
        rec["tf32"] = tf32_enabled()
        rec["gpu"] = torch.cuda.get_device_name(dev)
        rec["matmul_tflops"] = CALIBRATION_GPU_TFLOPS
    rec.update({"model": "random-init" if args.random_init else "gguf", "attn": args.attn,
                "threads": args.threads, "torch": torch.__version__, "cpu_util": LAST_CPU_UTIL,
                "cpu_steal_pct": LAST_STEAL_PCT, "matmul_gflops": CALIBRATION_GFLOPS})
    if not args.json:
        s = rec["scenario"]
        if s == "generate":
            what = f"batch={rec['batch']} {rec['mode']} prompt={rec['prompt_len']} new={rec['new_tokens']}"
        else:
            what = f"batch={rec['batch']}x{rec['seq']}"
            if rec.get("train_top") is not None:
                what += f" top:{rec['train_top']}"
        line = (f"torch {s:<8} backend={args.device} {args.dtype} {what} "
                f"{rec['ms_per_iter']:.1f} ms/iter {rec['tokens_per_s']:.1f} tokens/s")
        if rec.get("tflops") is not None:
            line += f" {rec['tflops']:.2f} TFLOP/s"
        if rec.get("mfu") is not None:
            line += f" MFU {100 * rec['mfu']:.1f}%"
        line += f" peak_rss={rec['peak_rss_mib']:.0f} MiB"
        if "peak_gpu_mib" in rec:
            line += f" peak_gpu={rec['peak_gpu_mib']:.0f} MiB tf32={'on' if rec['tf32'] else 'off'}"
        if rec.get("loss_first") is not None:
            line += f" loss {rec['loss_first']}->{rec['loss_last']}"
        print(line, flush=True)
    print(json.dumps(rec), flush=True)


def random_ids(vocab: int, shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(device)


def bench_forward(model, args, vocab):
    ids = random_ids(vocab, (args.batch, args.seq), 0, args.device_obj)
    model.eval()

    def step():
        with torch.inference_mode():
            model(ids, use_cache=False)

    times = timed(step, args.warmup, args.iters, args.device_obj)
    med = statistics.median(times)
    emit(args, {"scenario": "forward", "batch": args.batch, "seq": args.seq,
                "ms_per_iter": med * 1e3, "tokens_per_s": args.batch * args.seq / med,
                "median_s": round(med, 4), "iters": args.iters})


def set_trainable(model, train_top: int | None) -> list[torch.nn.Parameter]:
    """All params, or (--train-top N) the top N decoder blocks + the final norm."""
    for p in model.parameters():
        p.requires_grad_(train_top is None)
    if train_top is not None:
        layers = model.model.layers
        if not 0 <= train_top <= len(layers):
            raise SystemExit(f"--train-top {train_top}: the model has {len(layers)} blocks")
        for layer in list(layers)[len(layers) - train_top:]:
            layer.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_flops_per_token(model, seq: int) -> float:
    """Training FLOPs per token, PaLM appendix B (as r2m bench computes it):
        6 x (non-embedding params + LM head params) + 12 x layers x hidden x seq
    6N = 2N forward + 4N backward matmul FLOPs; the LM head counts even when tied to the
    embedding (it is a matmul, the embedding lookup is not); the second term is the attention
    score and value matmuls (QK^T and AV, forward + backward). Only meaningful when every
    layer is trained (with --train-top the frozen blocks have no backward)."""
    c = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    p_body = unique - emb.numel() - (0 if head is emb else head.numel())
    p_head = head.numel()
    return 6.0 * (p_body + p_head) + 12.0 * c.num_hidden_layers * c.hidden_size * seq


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device_obj.type != "cuda":
        return None
    name = torch.cuda.get_device_name(args.device_obj)
    if "H100" not in name and "H200" not in name:
        return None
    if args.dtype == "bf16":
        return PEAK_TFLOPS["bf16"]
    return PEAK_TFLOPS["tf32" if tf32_enabled() else "f32"]


def bench_train(model, args, vocab):
    dev = args.device_obj
    ids = random_ids(vocab, (args.batch, args.seq), 1, dev)
    model.train()
    params = set_trainable(model, args.train_top)
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    times = timed(step, args.warmup_train, args.iters, dev)
    med = statistics.median(times)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None  # free the gradients (and below the AdamW state) before the next scenario
    del opt
    tps = args.batch * args.seq / med
    tflops = train_flops_per_token(model, args.seq) * tps / 1e12 if args.train_top is None else None
    peak = peak_tflops(args)
    mfu = tflops / peak if tflops is not None and peak else None
    emit(args, {"scenario": "train", "batch": args.batch, "seq": args.seq, "train_top": args.train_top,
                "ms_per_iter": med * 1e3, "tokens_per_s": tps, "tflops": tflops, "mfu": mfu,
                "peak_tflops": peak, "trainable_params": sum(p.numel() for p in params),
                "median_s": round(med, 4), "iters": args.iters,
                "loss_first": round(losses[0].item(), 4), "loss_last": round(losses[-1].item(), 4)})
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def bench_generate(model, args, vocab, mode, batch):
    dev = args.device_obj
    ids = random_ids(vocab, (batch, args.gen_prompt), 2, dev)
    mask = torch.ones_like(ids)
    model.eval()
    n_new = args.gen_new
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    if mode == "greedy":
        sampling = {"do_sample": False}
    else:  # plain sampling from the softmax: no temperature change, no top-k / top-p
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(3)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, use_cache=True, **sampling,
                max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad,
            )
        assert out.shape == (batch, args.gen_prompt + n_new), out.shape

    times = timed(run, args.gen_warmup, args.gen_iters, dev)
    med = statistics.median(times)
    emit(args, {"scenario": "generate", "mode": mode, "batch": batch, "seq": n_new,
                "prompt_len": args.gen_prompt, "new_tokens": n_new,
                "ms_per_iter": med * 1e3, "tokens_per_s": batch * n_new / med,
                "median_s": round(med, 4), "iters": args.gen_iters})


def build_model(args):
    if args.random_init:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig.from_json_file(args.config)
        torch.manual_seed(0)
        # Build directly on the GPU (faster init); f32 first, then cast like the GGUF path.
        with torch.device(args.device_obj):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
        model.float()
    else:
        model = load_gguf_model(args.gguf, attn=args.attn)
        # Weights are plain f32 after dequantization; drop the GGUF quantizer marker so
        # nothing treats the model as quantized (e.g. for training).
        model.hf_quantizer = None
        model.is_quantized = False
    model.to(device=args.device_obj, dtype=DTYPES[args.dtype])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--random-init", action="store_true",
                    help="random weights of the --config architecture instead of the GGUF")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="HF LlamaConfig JSON for --random-init")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=list(DTYPES))
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="cuda: allow TF32 for f32 matmuls (default on; --no-tf32 for strict f32)")
    ap.add_argument("--scenarios", default="forward,train,generate")
    ap.add_argument("--json", action="store_true", help="print only the JSON lines")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="forward warm-up runs")
    ap.add_argument("--warmup-train", type=int, default=1)
    ap.add_argument("--train-top", type=int, default=None,
                    help="train: only the top N decoder blocks (+ final norm) trainable")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="train: dense peak TFLOP/s for MFU (default on H100/H200: 989 bf16, "
                         "494 f32 with TF32, 67 f32 without)")
    ap.add_argument("--gen-prompt", type=int, default=64)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--gen-batches", default="1,8,64")
    ap.add_argument("--gen-modes", default="greedy,sampled")
    ap.add_argument("--gen-iters", type=int, default=None, help="timed generate runs (default --iters)")
    ap.add_argument("--gen-warmup", type=int, default=1, help="full-length warm-up runs per configuration")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa|eager)")
    args = ap.parse_args()
    if args.gen_iters is None:
        args.gen_iters = args.iters

    set_threads(args.threads)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - {"forward", "train", "generate"}
    if unknown:
        ap.error(f"unknown scenarios: {sorted(unknown)}")
    modes = [m.strip() for m in args.gen_modes.split(",") if m.strip()]
    if set(modes) - {"greedy", "sampled"}:
        ap.error(f"--gen-modes: unknown {sorted(set(modes) - {'greedy', 'sampled'})} (greedy, sampled)")
    batches = [int(x) for x in args.gen_batches.split(",") if x.strip()]

    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: torch.cuda.is_available() is False")
        set_tf32(args.tf32)
        args.device_obj = torch.device("cuda", torch.cuda.current_device())
        print(f"device: {torch.cuda.get_device_name(args.device_obj)}, dtype {args.dtype}, "
              f"tf32 {'on' if tf32_enabled() else 'off'}", file=sys.stderr)
    else:
        args.device_obj = torch.device("cpu")

    model = build_model(args)
    vocab = model.config.vocab_size
    global CALIBRATION_GFLOPS, CALIBRATION_GPU_TFLOPS
    CALIBRATION_GFLOPS = round(matmul_gflops(), 1)
    if args.device == "cuda":
        CALIBRATION_GPU_TFLOPS = round(gpu_matmul_tflops(args.device_obj, DTYPES[args.dtype]), 1)

    for s in scenarios:
        if s == "forward":
            bench_forward(model, args, vocab)
        elif s == "train":
            bench_train(model, args, vocab)
        elif s == "generate":
            for mode in modes:
                for b in batches:
                    bench_generate(model, args, vocab, mode, b)


if __name__ == "__main__":
    main()
