"""Custom torch ops the passes rewrite to. Each has a CPU reference implementation and a fake
(shape) implementation for export; GPU implementations (Triton, cuBLASLt FP8) are picked at run time
when present. Each op module also registers the op's FLOPs/bytes formula with
``codesign.analysis.costs.register_cost`` next to its definition, so importing an op is what
makes the analysis able to price it."""

from __future__ import annotations

from codesign.ops.broadcast_linear import ACTIVATIONS, broadcast_linear, broadcast_linear_reference
from codesign.ops.fp8_linear import FP8_KERNELS, Fp8Linear, fp8_linear, fp8_linear_reference, quantize_weight
from codesign.ops.fused_linear import fused_linear, fused_linear_reference
from codesign.ops.grouped_embedding_bag import (
    EMBEDDING_BAG_MODES,
    grouped_embedding_bag,
    grouped_embedding_bag_reference,
)
from codesign.ops.quantize import FP8_DTYPE, FP8_MAX, GRANULARITIES, dequantize, quantize
from codesign.ops.quantized_embedding import (
    QUANTIZED_TABLE_FORMATS,
    quantize_table,
    quantized_embedding,
    quantized_embedding_bag,
    table_bytes,
)
from codesign.ops.request_attention import request_attention, request_attention_reference

__all__ = [
    "ACTIVATIONS",
    "EMBEDDING_BAG_MODES",
    "FP8_DTYPE",
    "FP8_KERNELS",
    "FP8_MAX",
    "GRANULARITIES",
    "QUANTIZED_TABLE_FORMATS",
    "Fp8Linear",
    "broadcast_linear",
    "broadcast_linear_reference",
    "dequantize",
    "fp8_linear",
    "fp8_linear_reference",
    "fused_linear",
    "fused_linear_reference",
    "grouped_embedding_bag",
    "grouped_embedding_bag_reference",
    "quantize",
    "quantize_table",
    "quantize_weight",
    "quantized_embedding",
    "quantized_embedding_bag",
    "request_attention",
    "request_attention_reference",
    "table_bytes",
]
