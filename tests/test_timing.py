from __future__ import annotations

import time

import pytest

from codesign.hardware.timing import median_latency


def test_median_latency_reports_the_median_after_warmup() -> None:
    calls: list[float] = []
    sleeps = iter([0.05, 0.0, 0.002, 0.0])  # warm-up is slow, then fast, slow, fast

    def fn() -> None:
        calls.append(1)
        time.sleep(next(sleeps))

    t = median_latency(fn, repeats=3, warmup=1)
    assert len(calls) == 4
    assert t < 0.01  # the slow warm-up call is not counted; the median ignores one outlier
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        median_latency(fn, repeats=0)
