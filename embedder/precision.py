"""Encode precision: fp32, bf16 (CPU with bf16 instructions, or GPU) or fp16 (GPU);
or int8, an ONNX export with int8 dense layers run by onnxruntime on the CPU (embedder/quantized.py).

"auto" picks what the hardware runs natively (fp16 on a GPU, bf16 on a CPU with AVX512-BF16 or AMX,
else fp32), and every run compares it with fp32 on a sample of its own texts: below a mean cosine of
0.99 it falls back to fp32. On a CPU the weights stay in fp32 under autocast (half-precision
weights are slower there); on a GPU the GPU encoder holds fp16/bf16 weights, which are faster there
(embedder/token_batches.py; docs/performance.md, "GPU").
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
MIN_MEAN_COSINE = 0.99


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (Linux /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> fp16 on CUDA, bf16 on a CPU with bf16 instructions, else fp32; others as given
    (fp16 on a CPU is refused: CPUs have no fast fp16 path)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("precision fp16 needs a GPU (embed.device: cuda); on a CPU use bf16 or fp32")
    if precision == "int8":
        from embedder.quantized import available

        if device.startswith("cuda"):
            raise ValueError("precision int8 runs on the CPU (onnxruntime); on a GPU use fp16 or fp32")
        if not available():
            raise ValueError("precision int8 needs onnx and onnxruntime: pip install -e '.[onnx]'")
    return precision


def autocast(precision: str, device: str):
    """The torch autocast context for `precision` on `device` (a no-op for fp32, and for int8,
    which does not run in torch)."""
    if precision in ("fp32", "int8"):
        return nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def cosine_report(reference: np.ndarray, other: np.ndarray) -> dict:
    """Mean and min cosine between rows of two (n, d) arrays."""
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = other / np.linalg.norm(other, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    return {"mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6), "sample": len(cos)}
