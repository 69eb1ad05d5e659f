"""A gain gate that times the rewrite on this machine instead of trusting the cost model.

A rewrite that fires must make the model faster. Where the target runs here, the gate runs the
original and each candidate rewrite side by side (interleaved rounds in blocks, re-measured while the
blocks disagree, ``hardware.timing.robust_interleaved``) on the layouts a
ranking server sees: one request of 1024 candidates and a batch of 16 requests. A rewrite is kept
only when it is faster on every layout. Rewrites of one program that all pass are compared among
themselves (more rounds: they are cheap next to the original) by their mean ratio over the layouts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial

from codesign.hardware.timing import interleaved_medians, robust_interleaved
from codesign.ir.program import Program

__all__ = ["GATE_LAYOUTS", "KEEP_BELOW", "MAX_TIMED_S", "MeasuredGate", "time_programs"]

# (name, candidates per request): what the gate times
GATE_LAYOUTS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("1x1024", (1024,)),
    ("16x64", (64,) * 16),
)
# A rewrite is kept when it is at least this much faster on every layout: a tie is noise, not a gain.
KEEP_BELOW = 0.97
# The gate times only programs the cost model predicts to run within this many seconds per call at the
# gate batch (useq small: 1.1 s predicted, ~0.35 s measured; medium: 23 s predicted).
MAX_TIMED_S = 3.0
# total seconds the gate may spend per layout on its rounds (at least MIN_ROUNDS rounds are run)
BUDGET_S = 1.5
MIN_ROUNDS, MAX_ROUNDS = 3, 9


@dataclasses.dataclass(frozen=True)
class MeasuredGate:
    """Median seconds per layout of each program timed, keyed ``[layout][name]``."""

    seconds: Mapping[str, Mapping[str, float]]
    # [layout][name]: how much the timing blocks disagreed (hardware.timing.Timing.spread)
    spread: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def max_spread(self) -> float:
        """The largest disagreement of any timing's blocks (0 when none was recorded): what a report shows."""
        return max((v for per in self.spread.values() for v in per.values()), default=0.0)

    def worst_ratio(self, name: str, baseline: str) -> float:
        """The largest ``t(name) / t(baseline)`` over the layouts: below 1 means faster on every one."""
        return max(times[name] / times[baseline] for times in self.seconds.values())

    def mean_ratio(self, name: str, baseline: str) -> float:
        """The geometric mean of ``t(name) / t(baseline)`` over the layouts: how two rewrites compare."""
        ratios = [times[name] / times[baseline] for times in self.seconds.values()]
        return math.prod(ratios) ** (1 / len(ratios))


# Timings already taken in this process, by what was decided on (the caller's key: its input program and
# settings): compiling the same program twice decides the same way, where a second noisy measurement
# could flip a close call.
_TIMED: dict[tuple[str, ...], MeasuredGate] = {}


def time_programs(
    programs: Mapping[str, Program],
    key: tuple[str, ...],
    layouts: Sequence[tuple[str, tuple[int, ...]]] = GATE_LAYOUTS,
    seed: int = 31,
) -> MeasuredGate:
    """Time every program on the same batches (drawn from the first), interleaved round by round.

    ``key`` names the decision (e.g. the input program's graph hash and the pass config): a second call
    with the same key returns the first call's timings.
    """
    # the request spec too: the same input graph under another spec is another decision (rewrites are not
    # hashed: a rewrite built twice may name its nodes otherwise, and must still hit the same timings)
    first = next(iter(programs.values()))
    key = (*key, repr(first.spec), *programs, repr(layouts), str(seed))
    if key not in _TIMED:
        _TIMED[key] = _time(programs, layouts, seed)
    return _TIMED[key]


def _time(
    programs: Mapping[str, Program], layouts: Sequence[tuple[str, tuple[int, ...]]], seed: int
) -> MeasuredGate:
    first = next(iter(programs.values()))
    seconds: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, float]] = {}
    for layout, counts in layouts:
        batch = first.sample_batch(list(counts), seed)
        fns = {name: partial(p.run, batch) for name, p in programs.items()}
        once = interleaved_medians(fns, rounds=1, warmup=1)
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_S / max(1e-9, sum(once.values())))))
        timed = robust_interleaved(fns, rounds=rounds)  # blocks re-measured while they disagree
        seconds[layout] = {k: t.seconds for k, t in timed.items()}
        spread[layout] = {k: t.spread for k, t in timed.items()}
    return MeasuredGate(seconds, spread)
