"""Custom torch ops the passes rewrite to. Each has a CPU reference implementation and a fake
(shape) implementation for export; GPU implementations (Triton) are picked at run time when present."""

from __future__ import annotations

from codesign.ops.broadcast_linear import ACTIVATIONS, broadcast_linear, broadcast_linear_reference
from codesign.ops.fused_linear import fused_linear, fused_linear_reference
from codesign.ops.grouped_embedding_bag import (
    EMBEDDING_BAG_MODES,
    grouped_embedding_bag,
    grouped_embedding_bag_reference,
)

__all__ = [
    "ACTIVATIONS",
    "EMBEDDING_BAG_MODES",
    "broadcast_linear",
    "broadcast_linear_reference",
    "fused_linear",
    "fused_linear_reference",
    "grouped_embedding_bag",
    "grouped_embedding_bag_reference",
]
