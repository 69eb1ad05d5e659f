"""Serving metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms keyed by label values; every update takes one lock, so request
threads and batch workers can write concurrently while ``/metrics`` renders a consistent view.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

__all__ = ["LATENCY_BUCKETS_S", "Metrics"]

# Request latency buckets: 0.5 ms .. 10 s, dense where ranking budgets (10-200 ms) sit.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    10.0,
)
Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    """A small registry: declare metrics once (name, kind, help), then update them by labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (kind, help)
        self._values: dict[str, dict[Labels, float]] = {}
        self._hist: dict[str, dict[Labels, list[float]]] = {}  # bucket counts..., sum, count
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauge_fns: dict[str, Callable[[], dict[Labels, float]]] = {}

    def declare(self, name: str, kind: str, help_text: str, buckets: Sequence[float] = ()) -> None:
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric kind {kind!r}")
        self._meta[name] = (kind, help_text)
        if kind == "histogram":
            self._hist[name] = {}
            self._buckets[name] = tuple(sorted(buckets or LATENCY_BUCKETS_S))
        else:
            self._values[name] = {}

    def gauge_function(self, name: str, help_text: str, fn: Callable[[], dict[Labels, float]]) -> None:
        """A gauge computed at scrape time (queue depths, variants up)."""
        self._meta[name] = ("gauge", help_text)
        self._gauge_fns[name] = fn

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        bounds = self._buckets[name]
        with self._lock:
            series = self._hist[name].get(key)
            if series is None:
                series = self._hist[name][key] = [0.0] * (len(bounds) + 3)  # buckets + Inf, sum, count
            series[bisect.bisect_left(bounds, value)] += 1  # bucket i counts values <= bounds[i]
            series[-2] += value
            series[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter/gauge series (0 when never set); a histogram's count."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._hist:
                series = self._hist[name].get(key)
                return series[-1] if series else 0.0
            return self._values[name].get(key, 0.0)

    def render(self) -> str:
        """The Prometheus text format of every series."""
        lines: list[str] = []
        gauges = {name: fn() for name, fn in self._gauge_fns.items()}
        with self._lock:
            for name, (kind, help_text) in self._meta.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                if name in gauges:
                    for key, v in sorted(gauges[name].items()):
                        lines.append(f"{name}{_labels(key)} {_num(v)}")
                elif kind == "histogram":
                    bounds = self._buckets[name]
                    for key, series in sorted(self._hist[name].items()):
                        running = 0.0
                        for bound, count in zip((*bounds, math.inf), series[:-2], strict=False):
                            running += count
                            lines.append(
                                f"{name}_bucket{_labels(key, f'le={chr(34)}{_num(bound)}{chr(34)}')} {_num(running)}"
                            )
                        lines.append(f"{name}_sum{_labels(key)} {_num(series[-2])}")
                        lines.append(f"{name}_count{_labels(key)} {_num(series[-1])}")
                else:
                    for key, v in sorted(self._values[name].items()):
                        lines.append(f"{name}{_labels(key)} {_num(v)}")
        return "\n".join(lines) + "\n"
