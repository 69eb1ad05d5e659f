"""Triton GEMM with a fused epilogue, for ``codesign::broadcast_linear`` and ``codesign::fused_linear``.

    out[m, n] = act(sum_k x[m, k] * w[n, k] + row[row_index[m], n] + bias[n])

Each program computes a BLOCK_M x BLOCK_N tile; after the K loop it loads ``row_index`` for its
rows and adds the matching per-request rows, so the [M, N] user tensor never exists in memory.
Without a row (``fused_linear``) the epilogue is bias + activation only: one kernel where eager
PyTorch launches a GEMM and a separate pointwise kernel. Imported lazily (CUDA path only);
tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ACTIVATION_CODES", "broadcast_linear_triton", "fused_linear_triton"]

ACTIVATION_CODES = {"none": 0, "relu": 1, "sigmoid": 2, "gelu": 3, "tanh": 4}

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (32, 64, 64, 4, 4),
        (16, 64, 64, 4, 4),
    )
]


@triton.jit
def _broadcast_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    row_ptr,
    idx_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    HAS_ROW: tl.constexpr,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
            mask=(rn[None, :] < N) & (rk[:, None] < K),
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_ROW:
        req = tl.load(idx_ptr + rm, mask=rm < M, other=0)
        acc += tl.load(row_ptr + req[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0).to(
            tl.float32
        )
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = tl.sigmoid(acc)
    elif ACT == 3:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 4:
        acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


_autotuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_broadcast_linear_kernel)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row: torch.Tensor | None,
    row_index: torch.Tensor | None,
    activation: str,
    blocks: tuple[int, int, int] | None,
) -> torch.Tensor:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATION_CODES)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    # absent operands get a placeholder pointer that the kernel never reads (HAS_BIAS / HAS_ROW off)
    bias_arg = bias if bias is not None else out
    row_arg = row if row is not None else out
    idx = row_index.contiguous() if row_index is not None else out
    args = (
        x2,
        weight,
        bias_arg,
        row_arg,
        idx,
        out,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        row_arg.stride(0),
        row_arg.stride(1),
        out.stride(0),
        out.stride(1),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_ROW": row is not None,
        "ACT": ACTIVATION_CODES[activation],
        "IEEE": x.dtype == torch.float32,
    }
    if blocks is not None:
        bm, bn, bk = blocks
        fixed_grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _broadcast_linear_kernel[fixed_grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

        _autotuned[grid](*args, **flags)
    return out.reshape(*lead, n)


def broadcast_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row: torch.Tensor,
    row_index: torch.Tensor,
    activation: str = "none",
    *,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Run the kernel; ``blocks=(BLOCK_M, BLOCK_N, BLOCK_K)`` skips autotuning (tests, interpreter)."""
    return _launch(x, weight, bias, row, row_index, activation, blocks)


def fused_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "none",
    *,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` in one kernel (the same GEMM, no per-request row)."""
    return _launch(x, weight, bias, None, None, activation, blocks)
