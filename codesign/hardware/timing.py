"""Wall-clock latency as codesign reports it: the median of repeated calls after a warm-up.

These machines are noisy; medians (not means or minima) are what benchmarks and the CLI quote.
Every timing that decides something (a search trial, a latency curve point, a gate) is measured in
blocks with an outlier check (``robust_latency``, ``robust_interleaved``): when the block medians
disagree by more than ``max_spread``, more blocks are measured and the fastest block medians are
kept. Noise on a shared machine only ever makes a call slower, so a burst of load (another process,
a page-cache miss) that slowed one block does not become the figure a decision rests on.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import torch

__all__ = [
    "MAX_SPREAD",
    "Timing",
    "interleaved_medians",
    "median_latency",
    "robust_interleaved",
    "robust_latency",
]

K = TypeVar("K", bound=Hashable)  # what names a timed function (a label, a grid point)

# Block medians that differ by more than this fraction are re-measured.
MAX_SPREAD = 0.25
BLOCKS = 3  # blocks per measurement; an outlier block is one of three
MAX_EXTRA_BLOCKS = 6  # at most this many more blocks when the spread is too large


@dataclasses.dataclass(frozen=True)
class Timing:
    """A robust latency figure: ``seconds`` (median of the kept blocks) and how much the blocks agreed.

    ``spread`` is (slowest - fastest) / fastest over the kept block medians; ``first_spread`` the same
    over the first ``BLOCKS`` blocks (before any re-measurement); ``remeasured`` how many blocks were
    added because ``first_spread`` exceeded the limit.
    """

    seconds: float
    spread: float
    first_spread: float
    blocks: int
    remeasured: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


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
    fns: Mapping[K, Callable[[], Any]], rounds: int, calls: int = 1, warmup: int = 0
) -> dict[K, float]:
    """Median seconds per call of each fn, timed round by round (every round runs every fn once
    for ``calls`` calls), so machine drift hits all of them alike: what side-by-side ratios need."""
    samples: dict[K, list[float]] = {k: [] for k in fns}
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


def _spread(medians: list[float]) -> float:
    lo = min(medians)
    return (max(medians) - lo) / lo if lo > 0 else 0.0


def _settle(block_medians: list[float], first: int) -> tuple[float, float, float]:
    """(seconds, spread, first spread): the median of the ``first`` fastest block medians."""
    kept = sorted(block_medians)[:first]
    return statistics.median(kept), _spread(kept), _spread(block_medians[:first])


def robust_latency(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    *,
    max_spread: float = MAX_SPREAD,
    blocks: int = BLOCKS,
    max_extra_blocks: int = MAX_EXTRA_BLOCKS,
) -> Timing:
    """Seconds per call of ``fn``: ``blocks`` blocks of ``repeats`` calls, re-measured while they disagree.

    While the fastest ``blocks`` block medians differ by more than ``max_spread``, another block is
    measured (up to ``max_extra_blocks``); the figure is the median of the fastest ``blocks`` block
    medians, so one block slowed by a burst of load is set aside instead of averaged in.
    """
    if repeats < 1 or blocks < 1:
        raise ValueError(f"repeats and blocks must be >= 1, got {repeats} and {blocks}")
    medians: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        while True:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
            if len(medians) < blocks:
                continue
            seconds, spread, first = _settle(medians, blocks)
            if spread <= max_spread or len(medians) >= blocks + max_extra_blocks:
                return Timing(seconds, spread, first, len(medians), len(medians) - blocks)


def robust_interleaved(
    fns: Mapping[K, Callable[[], Any]],
    rounds: int,
    calls: int = 1,
    warmup: int = 0,
    *,
    max_spread: float = MAX_SPREAD,
    blocks: int = BLOCKS,
    max_extra_blocks: int = MAX_EXTRA_BLOCKS,
) -> dict[K, Timing]:
    """``interleaved_medians`` in blocks of ``max(1, rounds // blocks)`` rounds, with the outlier check
    of ``robust_latency`` applied to every fn: blocks are added (for all fns, still interleaved) while
    any fn's fastest block medians disagree by more than ``max_spread``."""
    per_block = max(1, rounds // blocks)
    medians: dict[K, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        while True:
            block = interleaved_medians(fns, rounds=per_block, calls=calls)
            for name, value in block.items():
                medians[name].append(value)
            done = len(next(iter(medians.values())))
            if done < blocks:
                continue
            settled = {k: _settle(v, blocks) for k, v in medians.items()}
            if all(sp <= max_spread for _, sp, _ in settled.values()) or done >= blocks + max_extra_blocks:
                return {
                    k: Timing(sec, sp, first, done, done - blocks) for k, (sec, sp, first) in settled.items()
                }
