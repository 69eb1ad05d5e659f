"""``codesign::fp8_linear`` and ``Fp8Linear``: a Linear whose GEMM runs in FP8 (e4m3).

    out = act((q(x) @ w_q.T) * s_x * s_w + bias)

The weight is quantized once, offline (``w_q`` in float8_e4m3fn with fp32 scales per output row or
per tensor); the activation is quantized on every call with its own scales (dynamic: per row of
``x`` when the weight is per-row, else one scale), so no calibration of activation ranges can go
stale. Kernels (the ``kernel`` argument):

* ``auto``: on CUDA with FP8 tensor cores (sm_89+) and K, N multiples of 16, ``torch._scaled_mm``
  (cuBLASLt) with the activation quantized by a Triton kernel; elsewhere the exact emulation;
* ``scaled_mm``: ``torch._scaled_mm`` on CUDA or on CPU (oneDNN), error where it cannot run;
* ``te``: Transformer Engine's ``Linear`` under ``fp8_autocast`` (needs the ``te`` extra and CUDA);
* ``emulate``: dequantize and multiply in fp32. FP8 products are exact in fp32, so this gives
  the FP8 result up to the order of the fp32 sums: it is how quality is measured on any machine.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from codesign.analysis.costs import OpCost, gemm_flops, register_cost
from codesign.analysis.graph_queries import tensor_arg, tensor_values
from codesign.analysis.shapes import ConcreteShapes
from codesign.ops.broadcast_linear import activate
from codesign.ops.quantize import FP8_DTYPE, GRANULARITIES, quantize

__all__ = [
    "FP8_KERNELS",
    "Fp8Linear",
    "fp8_linear",
    "fp8_linear_cost",
    "fp8_linear_reference",
    "quantize_weight",
    "scaled_mm_shape_ok",
]

FP8_KERNELS = ("auto", "scaled_mm", "te", "emulate")
# FP8 tensor cores (cuBLASLt) take K and N in multiples of 16
FP8_ALIGNMENT = 16


def scaled_mm_shape_ok(in_features: int, out_features: int) -> bool:
    """Whether FP8 tensor cores can take a [*, K] x [K, N] product (K, N multiples of 16)."""
    return in_features % FP8_ALIGNMENT == 0 and out_features % FP8_ALIGNMENT == 0


def quantize_weight(weight: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q float8_e4m3fn [N, K], scale fp32 [N] per row or [1] per tensor) of a Linear weight."""
    q, scale = quantize(weight.detach(), "fp8", granularity)
    return q, scale.reshape(-1)


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, granularity: str) -> None:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(
            f"fp8_linear: weight must be a 2-D {FP8_DTYPE}, got {weight.dtype} {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, the weight takes {weight.shape[1]}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8_linear: granularity {granularity!r} is not one of {GRANULARITIES}")
    want = weight.shape[0] if granularity == "row" else 1
    if weight_scale.numel() != want:
        raise ValueError(f"fp8_linear: {granularity} scales need {want} values, got {weight_scale.numel()}")


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "none",
    granularity: str = "row",
) -> torch.Tensor:
    """Exact emulation in fp32 (the CPU implementation and the numerics every kernel is held to)."""
    _check(x, weight, weight_scale, granularity)
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize(x2, "fp8", granularity)
    out = (xq.float() @ weight.float().t()) * xs * weight_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    out = activate(out, activation).to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _quantize_activation(x2: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x2.is_cuda and granularity == "row":
        from codesign.ops.fp8_linear_triton import quantize_rows_triton

        return quantize_rows_triton(x2)
    return quantize(x2, "fp8", granularity)


def _scaled_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    granularity: str,
) -> torch.Tensor:
    n_out, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    xq, xs = _quantize_activation(x2, granularity)
    if granularity == "row":
        scale_a, scale_b = xs.reshape(-1, 1), weight_scale.float().reshape(1, -1)
    else:
        scale_a, scale_b = xs.reshape(()), weight_scale.float().reshape(())
    # cuBLASLt adds a bias only for 16-bit outputs; fp32 models add it after the GEMM
    fuse_bias = bias is not None and x.dtype in (torch.bfloat16, torch.float16)
    out = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=scale_a,
        scale_b=scale_b,
        bias=bias.to(x.dtype) if fuse_bias and bias is not None else None,
        out_dtype=x.dtype,
    )
    if bias is not None and not fuse_bias:
        out = out + bias.to(out.dtype)
    return activate(out, activation).reshape(*x.shape[:-1], n_out)


@functools.cache
def _has_fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _te_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Transformer Engine's FP8 Linear (its own per-tensor current scaling of input and weight)."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except ImportError as exc:
        raise RuntimeError(
            "fp8_linear kernel 'te' needs Transformer Engine: pip install 'codesign[te]' on a CUDA machine"
        ) from exc
    n_out, k = weight.shape
    key = (weight.data_ptr(), weight_scale.data_ptr(), None if bias is None else bias.data_ptr())
    module = _TE_MODULES.get(key)
    if module is None:
        module = te.Linear(k, n_out, bias=bias is not None, params_dtype=torch.bfloat16, device=x.device)
        with torch.no_grad():
            module.weight.copy_(weight.float() * weight_scale.float().reshape(-1, 1))
            if bias is not None:
                module.bias.copy_(bias)
        _TE_MODULES[key] = module
    with torch.no_grad(), te.fp8_autocast(enabled=True, fp8_recipe=recipe.Float8CurrentScaling()):
        out = module(x.reshape(-1, k).to(torch.bfloat16))
    return activate(out.to(x.dtype), activation).reshape(*x.shape[:-1], n_out)


_TE_MODULES: dict[tuple[int, int, int | None], Any] = {}


@torch.library.custom_op("codesign::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    granularity: str,
    kernel: str,
) -> torch.Tensor:
    if kernel not in FP8_KERNELS:
        raise ValueError(f"fp8_linear: kernel {kernel!r} is not one of {FP8_KERNELS}")
    _check(x, weight, weight_scale, granularity)
    n_out, k = weight.shape
    if kernel == "te" and x.is_cuda:
        return _te_linear(x, weight, weight_scale, bias, activation)
    if kernel == "scaled_mm" or (
        kernel == "auto"
        and x.is_cuda
        and _has_fp8_tensor_cores(x.device.index or 0)
        and scaled_mm_shape_ok(k, n_out)
    ):
        return _scaled_mm(x, weight, weight_scale, bias, activation, granularity)
    return fp8_linear_reference(x, weight, weight_scale, bias, activation, granularity)


@fp8_linear.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    granularity: str,
    kernel: str,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.codesign.fp8_linear)
def _flops(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    """The GEMM alone, as FlopCounterMode counts aten's linear."""
    n_out, k = w_shape
    return gemm_flops(math.prod(x_shape[:-1]), k, n_out)


def fp8_linear_cost(
    m: int, k: int, n_out: int, x_itemsize: int, out_itemsize: int, bias_bytes: int
) -> OpCost:
    """GEMM at the FP8 rate plus the scale and bias epilogue, after a quantize kernel (two launches).

    The quantize kernel reads x and writes one byte per value and a 4-byte scale per row; the GEMM reads
    that copy, the FP8 weight and its fp32 scales (per row: the worst case), the bias, and writes y.
    """
    weight = k * n_out + 4 * n_out + bias_bytes
    moved = m * k * x_itemsize + 2 * (m * k + 4 * m) + weight + m * n_out * out_itemsize
    flops = gemm_flops(m, k, n_out) + 2 * m * n_out
    return OpCost(flops, moved, weight, engine="fp8", kernels=2)


@register_cost(torch.ops.codesign.fp8_linear.default)
def _cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """``fp8_linear_cost`` at the node's own shapes and dtypes."""
    x, w = tensor_arg(node, 0), tensor_arg(node, 1)
    m, (n_out, k) = shapes.rows(x), shapes.shape(w)
    bias = node.args[3] if len(node.args) > 3 else None
    out = tensor_values(node)[0]
    return fp8_linear_cost(
        m,
        k,
        n_out,
        x.dtype.itemsize,
        out.dtype.itemsize,
        shapes.total_bytes([bias] if bias is not None else []),
    )


class Fp8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` (+ optional activation) with an FP8 weight.

    >>> fast = Fp8Linear.from_linear(model.fc, granularity="row")
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str = "none",
        granularity: str = "row",
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.activation, self.granularity, self.kernel = activation, granularity, kernel

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, activation: str = "none", granularity: str = "row", kernel: str = "auto"
    ) -> Fp8Linear:
        q, scale = quantize_weight(linear.weight, granularity)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias, activation, granularity, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.codesign.fp8_linear(
            x, self.weight, self.weight_scale, self.bias, self.activation, self.granularity, self.kernel
        )

    def extra_repr(self) -> str:
        n, k = self.get_buffer("weight").shape
        return f"in={k}, out={n}, activation={self.activation}, granularity={self.granularity}, kernel={self.kernel}"
