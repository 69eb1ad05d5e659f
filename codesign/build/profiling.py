"""What the router knows about a variant: its latency curve L(candidates, requests), quality loss, memory.

Curves are measured on the host (``measured_curve``: real calls on resampled requests, every point
timed side by side with outlier checks, re-measured where latency falls as candidates grow) when the
variant's target is the host, and predicted by the cost model otherwise; each profile says which.
Quality is the NE change in percent against a reference variant (``codesign.analysis.quality``), taken from
a search trial, or given by the user; the profile records its source as well.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from codesign.build.variant import Variant
from codesign.errors import ConfigError, RoutingError
from codesign.hardware.timing import Timing, robust_interleaved
from codesign.ir.request import even_counts, resample_batch

__all__ = [
    "DEFAULT_CURVE_CANDIDATES",
    "DEFAULT_CURVE_REQUESTS",
    "LatencyCurve",
    "VariantProfile",
    "curve_from_estimates",
    "measure_quality",
    "measured_curve",
    "profile_variant",
    "variant_memory_bytes",
]

Point = tuple[int, int]  # (requests, candidates) of a latency curve
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
    # measured curves: the largest disagreement of a point's timing blocks (hardware.timing.Timing), the
    # (requests, candidates) points timed again because they were out of order, and those lowered after
    spread: float = 0.0
    remeasured: tuple[Point, ...] = ()
    adjusted: tuple[Point, ...] = ()

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
            "spread": self.spread,
            "remeasured": [list(p) for p in self.remeasured],
            "adjusted": [list(p) for p in self.adjusted],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyCurve:
        try:
            return cls(
                tuple(int(c) for c in data["candidates"]),
                tuple(int(r) for r in data["requests"]),
                tuple(tuple(float(s) for s in row) for row in data["seconds"]),
                str(data["source"]),
                float(data.get("spread", 0.0)),
                tuple((int(r), int(c)) for r, c in data.get("remeasured", ())),
                tuple((int(r), int(c)) for r, c in data.get("adjusted", ())),
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
    if measured:
        curve = measured_curve(variant, cands, reqs, repeats=repeats, seed=seed)
    else:
        rows = tuple(tuple(_predicted(variant, c, min(r, c)) for c in cands) for r in reqs)
        curve = LatencyCurve(cands, reqs, rows, f"predicted by the cost model for {variant.target.name}")
    return VariantProfile(
        name or variant.name,
        curve,
        quality_loss_pct,
        quality_source,
        variant_memory_bytes(variant),
        tuple(labels),
    )


MONOTONE_SLACK = 0.10  # a point may be this much slower than the next larger one before it is re-measured
MONOTONE_RETRIES = 2


def measured_curve(
    variant: Variant,
    candidates: Sequence[int],
    requests: Sequence[int],
    *,
    repeats: int = 5,
    seed: int = 0,
    timer: Callable[[Mapping[Point, Callable[[], Any]], int], Mapping[Point, Timing]] | None = None,
) -> LatencyCurve:
    """The latency curve timed on this machine: every grid point interleaved, with outlier checks.

    Points are timed side by side (``robust_interleaved``: blocks re-measured while they disagree).
    Latency cannot fall as candidates grow, so a point slower than the next larger one (beyond
    ``MONOTONE_SLACK``) is timed again with its neighbour, up to ``MONOTONE_RETRIES`` times; what is
    still out of order is lowered to the larger point's figure (timing noise only adds time), and
    the curve lists those points in ``adjusted``. ``timer`` replaces the clock in tests.
    """
    points: dict[Point, Callable[[], Any]] = {}
    for r in requests:
        for c in candidates:
            counts = even_counts(c, min(r, c))
            batch = resample_batch(variant.reference_inputs, variant.spec, counts, seed=seed + c + r)
            points[(r, c)] = partial(variant.score, batch, check=False)

    def time_them(fns: Mapping[Point, Callable[[], Any]], rounds: int) -> Mapping[Point, Timing]:
        if timer is not None:
            return timer(fns, rounds)
        return robust_interleaved(fns, rounds=rounds, warmup=1)

    timings = dict(time_them(points, repeats))
    remeasured: set[Point] = set()
    for _ in range(MONOTONE_RETRIES):
        bad = _out_of_order(timings, candidates, requests)
        if not bad:
            break
        remeasured |= bad
        timings.update(time_them({p: points[p] for p in sorted(bad)}, 2 * repeats))
    seconds = {p: t.seconds for p, t in timings.items()}
    adjusted: list[Point] = []
    for r in requests:  # suffix minimum along candidates: what is left out of order is noise
        for i in range(len(candidates) - 2, -1, -1):
            here, nxt = (r, candidates[i]), (r, candidates[i + 1])
            if seconds[here] > seconds[nxt] * (1 + MONOTONE_SLACK):
                seconds[here] = seconds[nxt]
                adjusted.append(here)
    return LatencyCurve(
        tuple(candidates),
        tuple(requests),
        tuple(tuple(seconds[(r, c)] for c in candidates) for r in requests),
        f"measured on {variant.target.name}",
        spread=max(t.spread for t in timings.values()),
        remeasured=tuple(sorted(remeasured)),
        adjusted=tuple(sorted(adjusted)),
    )


def _out_of_order(
    timings: Mapping[Point, Timing], candidates: Sequence[int], requests: Sequence[int]
) -> set[Point]:
    """Points slower than the next larger candidate count (beyond the slack), with that neighbour."""
    bad: set[Point] = set()
    for r in requests:
        for a, b in itertools.pairwise(candidates):
            if timings[(r, a)].seconds > timings[(r, b)].seconds * (1 + MONOTONE_SLACK):
                bad |= {(r, a), (r, b)}
    return bad


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
