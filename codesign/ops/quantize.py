"""Scaled low-precision formats: FP8 (e4m3) and INT8 with per-row or per-tensor scales.

``q = clamp(t / scale)`` stored in one byte per value, ``scale = amax / format_max`` in fp32, and
``t ≈ q * scale``. Per-row scales follow each row's own range (one outlier row does not crush the
others); a per-tensor scale is one number for the whole tensor. Used offline for weights and
embedding tables, and at run time for activations (dynamic scaling: the scale of every call's own
rows, so there is no calibration drift).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "FORMATS",
    "FP8_DTYPE",
    "FP8_MAX",
    "GRANULARITIES",
    "QuantFormat",
    "dequantize",
    "quantize",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
GRANULARITIES = ("row", "tensor")
# a row of zeros gets this scale (any positive value quantizes it to zeros)
_MIN_SCALE = 1e-12


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    name: str
    dtype: torch.dtype
    max_value: float
    rounds: bool  # integers round to nearest; FP8 rounds in the cast itself


FORMATS = {
    "fp8": QuantFormat("fp8", FP8_DTYPE, FP8_MAX, rounds=False),
    "int8": QuantFormat("int8", torch.int8, 127.0, rounds=True),
}


def _format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown quantized format {name!r}; choose from {sorted(FORMATS)}")
    return FORMATS[name]


def quantize(
    t: torch.Tensor, fmt: str = "fp8", granularity: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a 2-D tensor: ``scale`` is fp32 of shape [rows, 1] (row) or [1, 1] (tensor)."""
    f = _format(fmt)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose from {GRANULARITIES}")
    if t.dim() != 2:
        raise ValueError(f"quantize takes a 2-D tensor, got shape {tuple(t.shape)}")
    x = t.float()
    amax = x.abs().amax(dim=1, keepdim=True) if granularity == "row" else x.abs().amax().reshape(1, 1)
    scale = (amax / f.max_value).clamp_min(_MIN_SCALE)
    scaled = (x / scale).clamp(-f.max_value, f.max_value)
    if f.rounds:
        scaled = scaled.round()
    return scaled.to(f.dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``q`` with its scale ([rows, 1], [rows] or one value)."""
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    return q.float() * s
