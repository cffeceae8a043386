"""Shared helpers for the r2m reference scripts (dev tooling only; PyTorch is
never a runtime dependency of r2m)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF = str(Path.home() / ".cache" / "r2m" / "smollm2" / SMOLLM2_FILE)

REPO_ROOT = Path(__file__).resolve().parents[2]


def set_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_kwarg() -> str:
    """transformers >= 4.56 / 5.x renamed `torch_dtype` to `dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (4, 56):
        return "dtype"
    return "torch_dtype"


def load_causal_lm(path: str | os.PathLike, gguf_file: str | None = None, attn: str | None = "eager"):
    """Load an HF causal LM in float32 (bf16/f16 checkpoints are upcast)."""
    from transformers import AutoModelForCausalLM

    kwargs = {_dtype_kwarg(): torch.float32}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.eval()
    return model


def load_gguf_model(gguf_path: str, attn: str | None = "eager"):
    p = Path(gguf_path)
    return load_causal_lm(p.parent, gguf_file=p.name, attn=attn)


def load_gguf_tokenizer(gguf_path: str):
    from transformers import AutoTokenizer

    p = Path(gguf_path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def f32(x: float) -> float:
    """Shortest decimal that round-trips to the same float32 value."""
    import numpy as np

    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def sig7(x: float) -> float:
    return float(f"{x:.7g}")


def round_nested(t: torch.Tensor):
    """Tensor -> nested lists of floats rounded to 7 significant digits."""
    flat = [sig7(v) for v in t.detach().to(torch.float64).reshape(-1).tolist()]
    shape = list(t.shape)

    def build(offset: int, dims: list[int]):
        if not dims:
            return flat[offset]
        step = 1
        for d in dims[1:]:
            step *= d
        return [build(offset + i * step, dims[1:]) for i in range(dims[0])]

    return build(0, shape)
