"""Wall-clock latency as codesign reports it: the median of repeated calls after a warm-up.

These machines are noisy; medians (not means or minima) are what benchmarks and the CLI quote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["interleaved_medians", "median_latency"]


def median_latency(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (under ``torch.no_grad``) after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(
    fns: Mapping[str, Callable[[], Any]], rounds: int, calls: int = 1, warmup: int = 0
) -> dict[str, float]:
    """Median seconds per call of each fn, timed round by round (every round runs every fn once
    for ``calls`` calls), so machine drift hits all of them alike: what side-by-side ratios need."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in samples.items()}
