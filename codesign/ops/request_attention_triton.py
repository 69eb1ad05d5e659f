"""Triton kernel for ``codesign::request_attention``: candidate queries against their request's K/V.

The query rows of head h are the (candidate, lq) pairs, M = N·Lq of them, grouped by request. The
grid is (query blocks, heads); every block lies inside one request: request r owns
``cdiv(count_r·Lq, BLOCK_M)`` consecutive blocks. A program finds its request from the offsets itself
(one vectorized prefix sum over the R block counts, so the launch needs no host sync and no helper
kernels), loads its BLOCK_M query rows once, then streams the request's K/V in BLOCK_L tiles with an
online softmax: every K/V tile is read once per block of candidates, never copied per candidate.
The grid has ``cdiv(M, BLOCK_M) + R`` blocks, an upper bound on the blocks requests need; programs
past the last one return at once. Imported lazily (CUDA path only); tested on CPU with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codesign.ops.request_attention import mask_per_request

__all__ = ["MAX_REQUESTS", "request_attention_triton"]

# Each program loads all R block counts at once (one vector of next_pow2(R + 1) lanes); beyond this the
# op uses its composite implementation instead.
MAX_REQUESTS = 4096

_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = 0, 1, 2


@triton.jit
def _request_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    offsets_ptr,
    R,
    LQ,
    L,
    DH,
    DV,
    scale,
    stride_qn,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kr,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_mr,
    stride_mh,
    stride_mq,
    stride_ml,
    stride_on,
    stride_oh,
    stride_ol,
    stride_od,
    MASK_KIND: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)

    # which request owns block `pid`: blocks are handed out request by request
    lanes = tl.arange(0, BLOCK_R)
    in_r = lanes < R
    starts = tl.load(offsets_ptr + lanes, mask=in_r, other=0)
    ends = tl.load(offsets_ptr + lanes + 1, mask=in_r, other=0)
    blocks = ((ends - starts) * LQ + BLOCK_M - 1) // BLOCK_M
    last_block = tl.cumsum(blocks, 0)  # one past each request's last block
    r = tl.sum((last_block <= pid).to(tl.int32), 0)
    if r >= R:
        return
    mine = lanes == r
    first_block = tl.sum(tl.where(mine, last_block - blocks, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0)
    row_end = tl.sum(tl.where(mine, ends, 0), 0)

    m = row_start * LQ + (pid - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < row_end * LQ
    n = m // LQ
    lq = m % LQ
    d = tl.arange(0, BLOCK_DH)
    e = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + n[:, None] * stride_qn + h * stride_qh + lq[:, None] * stride_ql + d[None, :] * stride_qd,
        mask=row_ok[:, None] & (d[None, :] < DH),
        other=0.0,
    )
    k_base = k_ptr + r * stride_kr + h * stride_kh
    v_base = v_ptr + r * stride_vr + h * stride_vh

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        keys = l0 + tl.arange(0, BLOCK_L)
        key_ok = keys < L
        kt = tl.load(
            k_base + keys[None, :] * stride_kl + d[:, None] * stride_kd,
            mask=key_ok[None, :] & (d[:, None] < DH),
            other=0.0,
        )
        s = (tl.dot(q, kt, input_precision="ieee") if IEEE else tl.dot(q, kt)) * scale
        if MASK_KIND != 0:
            mvals = tl.load(
                mask_ptr
                + r * stride_mr
                + h * stride_mh
                + lq[:, None] * stride_mq
                + keys[None, :] * stride_ml,
                mask=row_ok[:, None] & key_ok[None, :],
                other=0,
            )
            # bool: True attends; float: added to the scores
            s = tl.where(mvals != 0, s, float("-inf")) if MASK_KIND == 1 else s + mvals.to(tl.float32)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # a row with nothing to attend to yet keeps -inf: subtract 0 there so exp gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        p = tl.exp(s - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        vt = tl.load(
            v_base + keys[:, None] * stride_vl + e[None, :] * stride_vd,
            mask=key_ok[:, None] & (e[None, :] < DV),
            other=0.0,
        )
        pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee") if IEEE else tl.dot(p.to(vt.dtype), vt)
        acc = acc * rescale[:, None] + pv
        row_max = new_max
    # fully masked rows: zeros, as torch's SDPA gives
    out = tl.where(row_sum[:, None] > 0, acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None], 0.0)
    tl.store(
        out_ptr + n[:, None] * stride_on + h * stride_oh + lq[:, None] * stride_ol + e[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (e[None, :] < DV),
    )


def _pow2(x: int, low: int, high: int | None = None) -> int:
    p = max(low, triton.next_power_of_2(max(1, x)))
    return p if high is None else min(p, high)


def request_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request_offsets: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Run the kernel; ``blocks=(BLOCK_M, BLOCK_L)`` overrides the size heuristic (tests, tuning).

    BLOCK_M follows the mean query rows per request (16..64: small requests waste less of a block),
    BLOCK_L the history length (16..64).
    """
    n, heads, lq, dh = q.shape
    requests, length, dv = k.shape[0], k.shape[2], v.shape[3]
    if requests > MAX_REQUESTS:
        raise ValueError(f"request_attention_triton: at most {MAX_REQUESTS} requests, got {requests}")
    out = torch.empty((n, heads, lq, dv), device=q.device, dtype=q.dtype)
    if n == 0 or requests == 0:
        return out
    rows = n * lq
    if blocks is None:
        block_m, block_l = _pow2(rows // requests, 16, 64), _pow2(length, 16, 64)
    else:
        block_m, block_l = blocks
    mask = mask_per_request(attn_mask, requests)
    mask_strides: tuple[int, ...]
    if mask is None:
        kind, mask_arg, mask_strides = _NO_MASK, out, (0, 0, 0, 0)
    else:
        if mask.dtype == torch.bool:
            kind, mask = _BOOL_MASK, mask.view(torch.uint8)
        else:
            kind = _ADDITIVE_MASK
        mask_arg = mask.expand(requests, heads, lq, length)  # broadcast dims get stride 0
        mask_strides = mask_arg.stride()
    offsets = request_offsets.to(device=q.device, dtype=torch.int64).contiguous()
    grid = (triton.cdiv(rows, block_m) + requests, heads)
    _request_attention_kernel[grid](
        q,
        k,
        v,
        mask_arg,
        out,
        offsets,
        requests,
        lq,
        length,
        dh,
        dv,
        float(scale) if scale is not None else 1.0 / dh**0.5,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask_strides,
        *out.stride(),
        MASK_KIND=kind,
        IEEE=q.dtype == torch.float32,
        BLOCK_R=_pow2(requests + 1, 16),
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        BLOCK_DH=_pow2(dh, 16),
        BLOCK_DV=_pow2(dv, 16),
        num_warps=4,
    )
    return out
