"""What the router knows about a variant: its latency curve L(candidates, requests), quality loss, memory.

Curves are measured on the host (median wall time of real calls on resampled requests) when the
variant's target is the host, and predicted by the cost model otherwise; each profile says which.
Quality is the NE change in percent against a reference variant (``codesign.analysis.quality``), taken from
a search trial, or given by the user; the profile records its source as well.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from codesign.build.variant import Variant
from codesign.errors import ConfigError, RoutingError
from codesign.hardware.timing import median_latency
from codesign.ir.request import even_counts, resample_batch

__all__ = [
    "DEFAULT_CURVE_CANDIDATES",
    "DEFAULT_CURVE_REQUESTS",
    "LatencyCurve",
    "VariantProfile",
    "curve_from_estimates",
    "measure_quality",
    "profile_variant",
    "variant_memory_bytes",
]

DEFAULT_CURVE_CANDIDATES = (16, 64, 256, 1024)
DEFAULT_CURVE_REQUESTS = (1, 4, 16)


@dataclasses.dataclass(frozen=True)
class LatencyCurve:
    """Seconds per call on a grid of (total candidates, requests per call); interpolated between points.

    Between grid points the curve is bilinear; beyond the largest candidate count it extends the
    last segment's slope (latency keeps growing with candidates), below the smallest it stays at
    the smallest point's value (a call never costs less than its fixed overhead).
    """

    candidates: tuple[int, ...]
    requests: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]  # seconds[i_requests][i_candidates]
    source: str  # "measured on <host>" | "predicted for <target>"

    def __post_init__(self) -> None:
        if not self.candidates or not self.requests:
            raise ConfigError("a latency curve needs at least one candidate count and one request count")
        if list(self.candidates) != sorted(set(self.candidates)) or list(self.requests) != sorted(
            set(self.requests)
        ):
            raise ConfigError(
                f"latency curve grid must be strictly increasing: {self.candidates} x {self.requests}"
            )
        if len(self.seconds) != len(self.requests) or any(
            len(r) != len(self.candidates) for r in self.seconds
        ):
            raise ConfigError(
                f"latency curve has {len(self.seconds)} rows for a {len(self.requests)} x {len(self.candidates)} grid"
            )
        if any(not (math.isfinite(s) and s >= 0) for row in self.seconds for s in row):
            raise ConfigError("latency curve values must be finite and >= 0 seconds")

    def __call__(self, candidates: int, requests: int = 1) -> float:
        """Predicted seconds of one call scoring ``candidates`` rows from ``requests`` requests."""
        reqs = self.requests
        if requests <= reqs[0] or len(reqs) == 1:
            return self._along(0, candidates)
        if requests >= reqs[-1]:
            return self._along(len(reqs) - 1, candidates)
        j = bisect.bisect_right(reqs, requests) - 1
        lo, hi = self._along(j, candidates), self._along(j + 1, candidates)
        w = (requests - reqs[j]) / (reqs[j + 1] - reqs[j])
        return lo + (hi - lo) * w

    def _along(self, row: int, candidates: int) -> float:
        cs, ys = self.candidates, self.seconds[row]
        if candidates <= cs[0]:
            return ys[0]
        if len(cs) == 1:  # one point: latency proportional to candidates beyond it
            return ys[0] * candidates / cs[0]
        i = min(bisect.bisect_right(cs, candidates) - 1, len(cs) - 2)
        slope = (ys[i + 1] - ys[i]) / (cs[i + 1] - cs[i])
        return max(ys[i] + slope * (candidates - cs[i]), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "requests": list(self.requests),
            "seconds": [list(r) for r in self.seconds],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyCurve:
        try:
            return cls(
                tuple(int(c) for c in data["candidates"]),
                tuple(int(r) for r in data["requests"]),
                tuple(tuple(float(s) for s in row) for row in data["seconds"]),
                str(data["source"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a latency curve record: {exc!r}") from exc


@dataclasses.dataclass(frozen=True)
class VariantProfile:
    """A variant as the router sees it: latency curve, quality loss (NE %, lower is better), memory."""

    name: str
    latency: LatencyCurve
    quality_loss_pct: float
    quality_source: str
    memory_bytes: int
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not math.isfinite(self.quality_loss_pct) or self.quality_loss_pct < 0:
            raise ConfigError(f"variant '{self.name}': quality loss must be a finite percentage >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "latency": self.latency.to_dict(),
            "quality_loss_pct": self.quality_loss_pct,
            "quality_source": self.quality_source,
            "memory_bytes": self.memory_bytes,
            "labels": list(self.labels),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantProfile:
        try:
            return cls(
                str(data["name"]),
                LatencyCurve.from_dict(data["latency"]),
                float(data["quality_loss_pct"]),
                str(data["quality_source"]),
                int(data["memory_bytes"]),
                tuple(str(x) for x in data.get("labels", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a variant profile record: {exc!r}") from exc


def profile_variant(
    variant: Variant,
    *,
    name: str | None = None,
    quality_loss_pct: float = 0.0,
    quality_source: str = "given",
    candidates: Sequence[int] = DEFAULT_CURVE_CANDIDATES,
    requests: Sequence[int] = DEFAULT_CURVE_REQUESTS,
    repeats: int = 5,
    measure: str = "auto",
    labels: Sequence[str] = (),
    seed: int = 0,
) -> VariantProfile:
    """Latency curve (measured on the host, else predicted), memory and the given quality of a variant.

    ``measure``: ``"auto"`` measures when the variant's target is the host CPU, ``"measured"``
    insists, ``"predicted"`` uses the cost model (which needs the variant compiled in this process).
    Grid points with fewer candidates than requests are skipped.
    """
    if measure not in ("auto", "measured", "predicted"):
        raise ConfigError(f"measure must be auto, measured or predicted, got {measure!r}")
    measured = measure == "measured" or (measure == "auto" and variant.target.hardware.kind == "cpu")
    if measured and variant.target.hardware.kind != "cpu":
        raise RoutingError(
            f"variant '{variant.name}' targets {variant.target.name}; its latency can only be measured on it",
            fix="use measure='predicted' (cost model) or profile on that machine",
        )
    if not measured and variant.program is None:
        curve = curve_from_estimates(variant)
        return VariantProfile(
            name or variant.name,
            curve,
            quality_loss_pct,
            quality_source,
            variant_memory_bytes(variant),
            tuple(labels),
        )
    reqs = tuple(sorted({r for r in requests if r >= 1}))
    cands = tuple(sorted({c for c in candidates if c >= 1}))
    if not reqs or not cands:
        raise ConfigError(
            f"profile grid needs positive candidates and requests, got {candidates} x {requests}"
        )
    rows: list[tuple[float, ...]] = []
    for r in reqs:
        row = []
        for c in cands:
            n_req = min(r, c)
            if measured:
                batch = resample_batch(
                    variant.reference_inputs, variant.spec, even_counts(c, n_req), seed=seed + c + r
                )
                row.append(median_latency(partial(variant.score, batch), repeats, warmup=1))
            else:
                row.append(_predicted(variant, c, n_req))
        rows.append(tuple(row))
    source = (
        f"measured on {variant.target.name}"
        if measured
        else f"predicted by the cost model for {variant.target.name}"
    )
    return VariantProfile(
        name or variant.name,
        LatencyCurve(cands, reqs, tuple(rows), source),
        quality_loss_pct,
        quality_source,
        variant_memory_bytes(variant),
        tuple(labels),
    )


def _predicted(variant: Variant, candidates: int, requests: int) -> float:
    assert variant.program is not None  # loaded variants take curve_from_estimates
    # loads the analysis layer; only variants compiled in this process get here
    from codesign.hardware.costmodel import estimate

    return estimate(variant.program, variant.target, candidates, requests).latency_s


def curve_from_estimates(variant: Variant) -> LatencyCurve:
    """The latency curve a bundle's recorded cost estimates give (for variants loaded without their program)."""
    points = sorted(
        (int(e["candidates"]), float(e["latency_s"])) for e in (variant.cost or {}).get("estimates", [])
    )
    if not points:
        raise RoutingError(
            f"variant '{variant.name}' records no cost estimates and its target {variant.target.name} is not this host",
            fix="profile it where it was compiled, or measure it on its target",
        )
    return LatencyCurve(
        tuple(c for c, _ in points),
        (1,),
        (tuple(s for _, s in points),),
        f"predicted by the cost model for {variant.target.name} (estimates recorded in the bundle)",
    )


def variant_memory_bytes(variant: Variant) -> int:
    """Peak memory the cost model predicts for the variant, else the size of its weights."""
    estimates = (variant.cost or {}).get("estimates") or []
    if estimates:
        return int(max(int(e.get("memory_bytes", 0)) for e in estimates))
    return int(sum(t.numel() * t.element_size() for t in variant.exported.state_dict.values()))


def measure_quality(
    variants: Mapping[str, Variant],
    reference: Variant,
    *,
    requests: int = 64,
    candidates: int = 64,
    batches: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """NE change in percent of each variant against ``reference`` on resampled requests (0 = identical).

    The reference scores each batch once for all variants. Labels are drawn from the reference's
    own click probabilities (``codesign.analysis.quality``): this is fidelity to the reference model, not
    real-world quality.
    """
    # imported here: importing any codesign.analysis module loads the whole analysis layer, which the
    # router (and so the serving runtime), importing this module for VariantProfile, does not need
    from codesign.analysis.quality import join_heads, quality_loss

    outs: dict[str, list[Any]] = {name: [] for name in variants}
    ref_out = []
    with torch.no_grad():
        for i in range(batches):
            batch = resample_batch(
                reference.reference_inputs, reference.spec, [candidates] * requests, seed=seed + i
            )
            ref_out.append(reference.score(batch))
            for name, v in variants.items():
                outs[name].append(v.score(batch))
    ref_heads = join_heads(ref_out)
    losses = {}
    for name, out in outs.items():
        heads = join_heads(out)
        if len(ref_heads) != len(heads) or any(
            r.shape != v.shape for r, v in zip(ref_heads, heads, strict=False)
        ):
            raise RoutingError(
                f"variant '{name}' returns outputs shaped {[tuple(v.shape) for v in heads]}, "
                f"the reference {[tuple(r.shape) for r in ref_heads]}: they are not variants of one model"
            )
        losses[name] = quality_loss(ref_heads, heads, seed=seed).loss_pct
    return losses
