"""Custom torch ops the passes rewrite to. Each has a CPU reference implementation and a fake
(shape) implementation for export; GPU implementations (Triton) are picked at run time when present."""

from __future__ import annotations

from codesign.ops.broadcast_linear import ACTIVATIONS, broadcast_linear, broadcast_linear_reference

__all__ = ["ACTIVATIONS", "broadcast_linear", "broadcast_linear_reference"]
