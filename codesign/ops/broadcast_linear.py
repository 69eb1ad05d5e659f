"""``codesign::broadcast_linear``: candidate GEMM + a gathered per-request row + bias + activation.

    out[n] = act(x[n] @ weight.T + row[row_index[n]] + bias)

After request sharing splits a Linear over ``concat(user, candidate)`` into ``W_u·u`` (computed once
per request, R rows) and ``W_c·c`` (per candidate), this op adds the request's row inside the
candidate GEMM's epilogue, so the [N, out] user tensor is never materialized. The CPU reference
composes aten ops; on CUDA a Triton kernel does the gather in the epilogue (``broadcast_linear_triton``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import register_flop_formula

from codesign.analysis.costs import gemm_flops, linear_epilogue_cost, register_cost

__all__ = ["ACTIVATIONS", "activate", "broadcast_linear", "broadcast_linear_reference"]

ACTIVATIONS = ("none", "relu", "sigmoid", "gelu", "tanh")


def activate(out: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(out)
    if activation == "sigmoid":
        return torch.sigmoid(out)
    if activation == "gelu":
        return torch.nn.functional.gelu(out)
    if activation == "tanh":
        return torch.tanh(out)
    if activation == "none":
        return out
    raise ValueError(f"broadcast_linear: unknown activation {activation!r}; choose from {ACTIVATIONS}")


def broadcast_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row: torch.Tensor,
    row_index: torch.Tensor,
    activation: str = "none",
) -> torch.Tensor:
    """Reference semantics in plain torch, functional (graphs trace it: the aten form Inductor gets)."""
    out = torch.nn.functional.linear(x, weight, bias)
    return activate(out + row.index_select(0, row_index), activation)


@torch.library.custom_op("codesign::broadcast_linear", mutates_args=())
def broadcast_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row: torch.Tensor,
    row_index: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    if x.is_cuda:
        from codesign.ops.broadcast_linear_triton import broadcast_linear_triton

        return broadcast_linear_triton(x, weight, bias, row, row_index, activation)
    return _broadcast_linear_cpu(x, weight, bias, row, row_index, activation)


_IN_PLACE = {"relu": torch.relu_, "sigmoid": torch.sigmoid_, "tanh": torch.tanh_}


def _broadcast_linear_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row: torch.Tensor,
    row_index: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The CPU kernel: the reference's sums in the same order (bit-equal to it), with the row added and
    the activation applied in place on the GEMM's output (no buffer for the sum or the activation; the
    reference stays functional, as traced graphs need)."""
    if activation not in (*_IN_PLACE, "none"):
        return broadcast_linear_reference(x, weight, bias, row, row_index, activation)
    out = torch.nn.functional.linear(x, weight, bias)
    out += row.index_select(0, row_index)
    return out if activation == "none" else _IN_PLACE[activation](out)


@broadcast_linear.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row: torch.Tensor,
    row_index: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    torch._check(row_index.shape[0] == x.shape[0])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.codesign.broadcast_linear)
def _flops(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    """GEMM plus the gathered row and bias in the epilogue (as ``_cost`` counts it)."""
    m = math.prod(x_shape[:-1])
    n_out, k = w_shape
    return gemm_flops(m, k, n_out) + 2 * m * n_out


# GEMM plus two epilogue terms per output (the request's row, the bias)
register_cost(torch.ops.codesign.broadcast_linear.default, linear_epilogue_cost)
