"""Triton kernel: dynamic per-row FP8 quantization of activations, in one launch.

Eager PyTorch needs four or five kernels for ``amax -> scale -> divide -> clamp -> cast`` and moves
the activation through memory each time; here one program per row reads it twice (the second read
hits cache) and writes one byte per value plus one fp32 scale. Imported lazily (CUDA path of
``codesign::fp8_linear``); tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codesign.ops.quantize import _MIN_SCALE, FP8_DTYPE, FP8_MAX

__all__ = ["quantize_rows_triton"]


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    FP8_MAX_VALUE: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(v))
    scale = tl.maximum(tl.max(acc, axis=0) / FP8_MAX_VALUE, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        # IEEE division (not the fast approximate one): the same bytes as the reference quantizer
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX_VALUE), FP8_MAX_VALUE)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [M, K], scale fp32 [M, 1]) of a 2-D activation, per row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_triton takes a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = min(max(triton.next_power_of_2(k), 16), 4096)
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0), FP8_MAX_VALUE=FP8_MAX, MIN_SCALE=_MIN_SCALE, BLOCK_K=block
    )
    return q, scale
