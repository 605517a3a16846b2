"""One answer to "which half precision": bf16 where the device supports it, fp16 on GPUs without
bf16 (a T4), full precision on a CPU. Training's autocast mode and the weights' compute dtype
both follow it, so "auto" never means two different things."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MODE_OF_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}


def auto_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """quant.compute_dtype: the dtype frozen weights compute in."""
    return auto_dtype(device) if name == "auto" else DTYPES[name]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX). Without it torch falls back to
    a reference bf16 GEMM that is many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_mode(name: str) -> str:
    """train.mixed_precision as accelerate names it ("bf16", "fp16" or "no"). On a CPU, "auto" is
    bf16 autocast only where the CPU has native bf16 matmuls."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "bf16" if cpu_has_fast_bf16() else "no"
    return _MODE_OF_DTYPE[auto_dtype(torch.device("cuda"))]
