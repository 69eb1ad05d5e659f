"""Numerics: how close two outputs are, and how close they must be.

Structural passes are judged elementwise (``|out - ref| <= atol + rtol·|ref|``); quantizing passes change
every output a little by design and are judged by SQNR in dB instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["EXACT", "Tolerance", "compare_outputs", "output_tensors", "sqnr_db"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Numerics allowed after a pass: elementwise ``|out - ref| <= atol + rtol * |ref|``.

    Quantizing passes set ``min_sqnr_db`` instead: each output's SQNR against the reference must reach it
    (elementwise bounds are then not used).
    """

    rtol: float
    atol: float
    min_sqnr_db: float | None = None


# Structural passes reorder nothing numerically; folding may change fp32 rounding in the last bit.
EXACT = Tolerance(rtol=1e-5, atol=1e-6)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Output tensors of a model call, in pytree order (tensor, tuple or dict outputs)."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20·log10(‖ref‖ / ‖ref − other‖)."""
    ref = reference.detach().double()
    noise = (ref - other.detach().double()).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm() / noise))


def compare_outputs(got: Any, want: Any, tol: Tolerance) -> tuple[bool, float, float]:
    """(within tolerance, max abs error, max relative error) over every output tensor."""
    g_list, w_list = output_tensors(got), output_tensors(want)
    if len(g_list) != len(w_list):
        return False, float("inf"), float("inf")
    ok, max_abs, max_rel = True, 0.0, 0.0
    for g, w in zip(g_list, w_list, strict=True):
        if g.shape != w.shape:
            return False, float("inf"), float("inf")
        g, w = g.detach(), w.detach()
        diff = (g.double() - w.double()).abs()
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / w.double().abs().clamp_min(1e-12)).max()))
            if tol.min_sqnr_db is not None:
                ok = ok and sqnr_db(w, g) >= tol.min_sqnr_db
            else:
                ok = ok and bool((diff <= tol.atol + tol.rtol * w.double().abs()).all())
    return ok, max_abs, max_rel
