"""``codesign::fused_linear``: ``act(x @ weight.T + bias)`` as one op, one kernel on CUDA.

Eager PyTorch runs a Linear and its activation as two kernels with an [M, N] round trip through
memory between them. Inductor and AOTInductor already fuse that epilogue, so the fusion pass
rewrites to this op only where they do not run (the ``eager`` backend on a GPU) or when asked.
The CPU implementation is the plain composition (no gain on CPU, same numerics); CUDA uses the
Triton GEMM of ``broadcast_linear_triton`` with its per-request row switched off.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import register_flop_formula

from codesign.analysis.costs import gemm_flops, linear_epilogue_cost, register_cost
from codesign.ops.broadcast_linear import activate

__all__ = ["fused_linear", "fused_linear_reference"]


def fused_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
) -> torch.Tensor:
    """Reference semantics in plain torch (also the CPU implementation)."""
    return activate(torch.nn.functional.linear(x, weight, bias), activation)


@torch.library.custom_op("codesign::fused_linear", mutates_args=())
def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    if x.is_cuda and x.dim() >= 2:
        from codesign.ops.broadcast_linear_triton import fused_linear_triton

        return fused_linear_triton(x, weight, bias, activation)
    return fused_linear_reference(x, weight, bias, activation)


@fused_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.codesign.fused_linear)
def _flops(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    """The GEMM alone, as FlopCounterMode counts the aten linear this op replaces."""
    n_out, k = w_shape
    return gemm_flops(math.prod(x_shape[:-1]), k, n_out)


# GEMM plus two epilogue terms per output (bias, activation): the Linear and activation it fuses
register_cost(torch.ops.codesign.fused_linear.default, linear_epilogue_cost)
