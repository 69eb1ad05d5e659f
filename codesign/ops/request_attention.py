"""``codesign::request_attention``: candidate queries attending to their request's keys and values.

    out[n] = SDPA(q[n], k[request_of(n)], v[request_of(n)])      request_of(n) = r  iff  offsets[r] <= n < offsets[r+1]

Target attention in a ranking model (each candidate's query over the user's history) reads K/V that
are request-level. After request sharing computes them once per request (R rows), plain SDPA still
needs them per candidate: ``index_select(k_R, 0, request_index)`` materializes an [N, H, L, dh] copy
for every candidate, which dominates at large N. This op takes K/V with one row per request and the
request offsets instead; it equals SDPA on the gathered K/V up to fp32 rounding and never builds them.

Shapes: ``q`` [N, H, Lq, dh] (rows grouped by request, as ``offsets`` says), ``k`` [R, H, L, dh],
``v`` [R, H, L, dv], ``request_offsets`` [R+1] int64 (``offsets[0] == 0``, ``offsets[R] == N``; empty
requests allowed). ``attn_mask`` (bool: True attends; float: added to the scores) broadcasts to
[R, H, Lq, L], i.e. one mask per request (or one for all); ``scale`` defaults to ``1/sqrt(dh)``, as in
SDPA. Fully masked rows give zeros, as torch's SDPA does.

CPU: one SDPA call per request over its candidate block (``[1, H, c·Lq, dh]`` against the request's
K/V) when requests are few or large; with many small requests, candidates are padded to the largest
request and one batched SDPA runs over all of them (``use_padding``: measured, see
``benchmarks/request_attention.py``). CUDA: a Triton kernel with one program per (candidate block of
one request, head) that streams the request's K/V tiles with an online softmax
(``request_attention_triton``).

>>> out = torch.ops.codesign.request_attention(q, k_r, v_r, offsets, None, None)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from codesign.analysis.costs import OpCost, io_bytes, register_cost
from codesign.analysis.graph_queries import tensor_arg
from codesign.analysis.shapes import ConcreteShapes

__all__ = [
    "mask_per_request",
    "request_attention",
    "request_attention_cpu",
    "request_attention_reference",
    "use_padding",
]

# Padding every request to the largest one and running one batched SDPA beats a loop of R calls when
# the loop's per-call overhead dominates: many requests of few candidates each. Measured on the host
# CPU (H=4, L=64, dh=16): padded wins from 8 requests of <= 64 candidates on average (2x at 64 x 16),
# the loop from 128 on average (1.3x at 32 x 128); padding may at most quadruple the query rows.
_PAD_MIN_REQUESTS = 8
_PAD_MAX_MEAN_ROWS = 64
_PAD_MAX_WASTE = 4


def use_padding(counts: list[int]) -> bool:
    """Whether the composite implementation pads (one batched SDPA) rather than loops over requests."""
    requests, n = len(counts), sum(counts)
    return (
        requests >= _PAD_MIN_REQUESTS
        and n <= _PAD_MAX_MEAN_ROWS * requests
        and requests * max(counts) <= _PAD_MAX_WASTE * n
    )


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> None:
    """Static shape checks shared by the real and the fake implementation (what, and how to fix it)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "request_attention: expected q [N, H, Lq, dh], k [R, H, L, dh], v [R, H, L, dv]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if offsets.dim() != 1:
        raise ValueError(f"request_attention: request_offsets must be 1-D [R+1], got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"request_attention: request_offsets must be int64 or int32, got {offsets.dtype}")
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"request_attention: q, k and v must have the same heads (dim 1), got "
            f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
        )
    if q.shape[3] != k.shape[3] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"request_attention: q and k need the same head dim and k and v the same length, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def mask_per_request(attn_mask: torch.Tensor | None, requests: int) -> torch.Tensor | None:
    """``attn_mask`` as a 4-D [1 or R, 1 or H, 1 or Lq, L] view (no copy), or None."""
    if attn_mask is None:
        return None
    if attn_mask.dim() > 4 or attn_mask.dim() == 0:
        raise ValueError(
            f"request_attention: attn_mask must broadcast to [R, H, Lq, L], got {tuple(attn_mask.shape)}"
        )
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[0] not in (1, requests):
        raise ValueError(
            f"request_attention: attn_mask has {mask.shape[0]} rows for {requests} requests; "
            "give one mask per request (or one for all)"
        )
    return mask


def request_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request_offsets: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition: SDPA on K/V (and mask) gathered to one row per candidate (what the op avoids)."""
    _check_shapes(q, k, v, request_offsets)
    counts = request_offsets.diff()
    index = torch.repeat_interleave(torch.arange(k.shape[0], device=q.device), counts, output_size=q.shape[0])
    mask = mask_per_request(attn_mask, k.shape[0])
    if mask is not None and mask.shape[0] > 1:
        mask = mask.index_select(0, index)
    return F.scaled_dot_product_attention(
        q, k.index_select(0, index), v.index_select(0, index), attn_mask=mask, scale=scale
    )


def _block_mask(mask: torch.Tensor | None, rows: slice, blocks: int, lq: int) -> torch.Tensor | None:
    """The mask for queries laid out as [rows of mask, H, blocks·Lq, ·]: broadcast, or repeated per block."""
    if mask is None:
        return None
    mask = mask[rows] if mask.shape[0] > 1 else mask
    if mask.shape[2] == 1:
        return mask  # the same for every query row: broadcasts over blocks·Lq
    r, h, _, length = mask.shape
    return mask.unsqueeze(2).expand(r, h, blocks, lq, length).reshape(r, h, blocks * lq, length)


def request_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request_offsets: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The composite implementation (any device): a loop over requests, or one padded batched SDPA."""
    _check_shapes(q, k, v, request_offsets)
    n, heads, lq, dh = q.shape
    requests, dv = k.shape[0], v.shape[-1]
    out = q.new_empty((n, heads, lq, dv))
    if n == 0:
        return out
    counts = request_offsets.diff().tolist()
    if len(counts) != requests or sum(counts) != n or min(counts) < 0:
        raise ValueError(
            f"request_attention: request_offsets must rise from 0 to N={n} over R={requests} requests, "
            f"got {request_offsets.tolist()}"
        )
    mask = mask_per_request(attn_mask, requests)
    if use_padding(counts):
        return _padded(q, k, v, request_offsets, counts, max(counts), mask, scale)
    start = 0
    for r, c in enumerate(counts):
        if c == 0:
            continue
        # the candidate block as one sequence of c·Lq queries against the request's K/V: a view when Lq == 1
        block = q[start : start + c].transpose(0, 1).reshape(1, heads, c * lq, dh)
        got = F.scaled_dot_product_attention(
            block,
            k[r : r + 1],
            v[r : r + 1],
            attn_mask=_block_mask(mask, slice(r, r + 1), c, lq),
            scale=scale,
        )
        out[start : start + c] = got.view(heads, c, lq, dv).transpose(0, 1)
        start += c
    return out


def _padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    counts: list[int],
    widest: int,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Every request's candidates padded to ``widest`` rows, one SDPA over [R, H, widest·Lq, dh]."""
    n, heads, lq, dh = q.shape
    requests, dv = k.shape[0], v.shape[-1]
    request = torch.repeat_interleave(
        torch.arange(requests, device=q.device), torch.as_tensor(counts, device=q.device), output_size=n
    )
    position = torch.arange(n, device=q.device) - offsets.to(q.device).index_select(0, request)
    padded = q.new_zeros((requests, heads, widest, lq, dh))
    padded[request, :, position] = q  # padding rows are zeros: finite scores, dropped below
    got = F.scaled_dot_product_attention(
        padded.view(requests, heads, widest * lq, dh),
        k,
        v,
        attn_mask=_block_mask(mask, slice(None), widest, lq),
        scale=scale,
    )
    # advanced indices around a slice put the indexed dim first: [N, H, Lq, dv]
    return got.view(requests, heads, widest, lq, dv)[request, :, position].contiguous()


@torch.library.custom_op("codesign::request_attention", mutates_args=())
def request_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request_offsets: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    if q.is_cuda:
        from codesign.ops.request_attention_triton import MAX_REQUESTS, request_attention_triton

        if k.shape[0] <= MAX_REQUESTS:
            return request_attention_triton(q, k, v, request_offsets, attn_mask, scale)
    return request_attention_cpu(q, k, v, request_offsets, attn_mask, scale)


@request_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request_offsets: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    _check_shapes(q, k, v, request_offsets)
    torch._check(request_offsets.shape[0] == k.shape[0] + 1)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention_flops(q_shape: Any, k_shape: Any, v_shape: Any) -> int:
    """The two products over the scores, as torch counts SDPA (``2·scores·dh + 2·scores·dv``)."""
    scores = math.prod(q_shape[:-1]) * k_shape[-2]
    return 2 * scores * q_shape[-1] + 2 * scores * v_shape[-1]


@register_flop_formula(torch.ops.codesign.request_attention)
def _flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    return attention_flops(q_shape, k_shape, v_shape)


@register_cost(torch.ops.codesign.request_attention.default)
def _cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """SDPA's FLOPs (two products, five per score for the softmax) with K/V read once per request."""
    qs, ks, vs = (shapes.shape(tensor_arg(node, i)) for i in range(3))
    scores = math.prod(qs[:-1]) * ks[-2]
    flops = attention_flops(qs, ks, vs) + 5 * scores
    return OpCost(flops, io_bytes(node, shapes), shapes.param_bytes(node), engine="matmul")
