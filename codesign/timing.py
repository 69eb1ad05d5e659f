"""Wall-clock latency as codesign reports it: the median of repeated calls after a warm-up.

These machines are noisy; medians (not means or minima) are what benchmarks and the CLI quote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["median_latency"]


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
