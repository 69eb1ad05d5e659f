"""What a trial is judged on: latency, quality loss and memory, plus the constraints on them.

- latency: measured on this machine when the target is the host (``hardware.timing.robust_latency``:
  blocks of about ``repeats / 3`` timed calls per configured candidate count after a warm-up, more
  blocks while they disagree, the spread recorded), otherwise predicted by the roofline cost
  model for the target; ``Evaluation.latency_source`` says which. The objective is the mean over
  the candidate counts; the SLO constraint applies to the worst of them.
- quality loss: NE change in percent against the captured reference (``codesign.analysis.quality``), on
  seeded calibration requests, scored through the same micro-batching the variant will use.
- memory: parameters plus the activations of the largest call, from the cost model.

Compiled programs are cached by (input graph hash, pass uuid), one pass at a time, so trials that
share a pipeline prefix (or whose passes change nothing) do not redo it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from codesign.analysis import count_kernels
from codesign.analysis.quality import QualityLoss, join_heads, quality_loss
from codesign.errors import SearchError
from codesign.hardware.costmodel import estimate
from codesign.hardware.target import Target
from codesign.hardware.timing import BLOCKS, robust_latency
from codesign.ir.program import Program, run_in_pieces
from codesign.ir.request import RequestBatch
from codesign.passes.manager import Pass, PassManager
from codesign.search.space import TrialConfig

__all__ = [
    "MEASURE_MODES",
    "OBJECTIVE_NAMES",
    "Evaluation",
    "Evaluator",
    "Hopeless",
    "ObjectiveSettings",
]

OBJECTIVE_NAMES = ("latency_ms", "quality_loss_pct", "memory_mb")
CONSTRAINT_NAMES = ("latency_over_slo_ms", "quality_over_budget_pct", "memory_over_capacity_mb")
MEASURE_MODES = ("auto", "predicted", "measured")
_MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """How trials are measured and which constraints they must meet."""

    candidates: tuple[int, ...] = (64, 1024)  # candidates per request at which latency is taken
    requests: int = 1  # requests per call
    measure: str = "auto"  # auto: measured when the target is this machine's CPU, else predicted
    repeats: int = 5  # timed calls per candidate count (measured), over 3 blocks, more if they disagree
    latency_slo_ms: float | None = None  # constraint on the worst candidate count
    quality_budget_pct: float = 0.1  # constraint: NE change at most this many percent
    memory_capacity_bytes: float | None = None  # constraint; None: the target's memory
    prune_ratio: float = 2.0  # a trial whose first latency exceeds ratio x SLO is pruned
    calibration: tuple[int, ...] = (256, 256, 256, 256)  # candidates per calibration request
    seed: int = 0
    verify_passes: bool = False  # check numerics after every pass too (quality is always measured)

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(int(c) for c in self.candidates))
        object.__setattr__(self, "calibration", tuple(int(c) for c in self.calibration))
        problems = []
        if not self.candidates or min(self.candidates) < 1:
            problems.append(f"candidates must be positive counts, got {self.candidates}")
        if not self.calibration or min(self.calibration) < 1:
            problems.append(f"calibration must be positive counts, got {self.calibration}")
        if self.requests < 1 or self.repeats < 1:
            problems.append(f"requests and repeats must be >= 1, got {self.requests}, {self.repeats}")
        if self.measure not in MEASURE_MODES:
            problems.append(f"measure must be one of {MEASURE_MODES}, got {self.measure!r}")
        if self.latency_slo_ms is not None and self.latency_slo_ms <= 0:
            problems.append(f"latency_slo_ms must be > 0, got {self.latency_slo_ms}")
        if self.quality_budget_pct < 0:
            problems.append(f"quality_budget_pct must be >= 0, got {self.quality_budget_pct}")
        if self.memory_capacity_bytes is not None and self.memory_capacity_bytes <= 0:
            problems.append(f"memory_capacity_bytes must be > 0, got {self.memory_capacity_bytes}")
        if self.prune_ratio <= 1:
            problems.append(f"prune_ratio must be > 1, got {self.prune_ratio}")
        if problems:
            raise SearchError("invalid objective settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One trial's figures; ``values()`` are the study's objectives, ``constraints()`` its limits."""

    latency_s: float  # mean over candidate counts
    latency_by_candidates: dict[int, float]
    latency_source: str
    quality: QualityLoss
    memory_bytes: float
    memory_capacity_bytes: float
    kernels: int
    # measured trials: per candidate count, how much the timing blocks disagreed (hardware.timing.Timing)
    latency_spread: dict[int, float] = dataclasses.field(default_factory=dict)

    def values(self) -> tuple[float, float, float]:
        return (self.latency_s * 1e3, self.quality.loss_pct, self.memory_bytes / _MB)

    def constraints(self, settings: ObjectiveSettings) -> tuple[float, float, float]:
        """<= 0 where met (Optuna's convention); a missing SLO is always met."""
        worst_ms = max(self.latency_by_candidates.values()) * 1e3
        slo = worst_ms - settings.latency_slo_ms if settings.latency_slo_ms is not None else -1.0
        return (
            slo,
            self.quality.loss_pct - settings.quality_budget_pct,
            (self.memory_bytes - self.memory_capacity_bytes) / _MB,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latency_by_candidates"] = {str(k): v for k, v in self.latency_by_candidates.items()}
        out["latency_spread"] = {str(k): v for k, v in self.latency_spread.items()}
        return out


class Hopeless(Exception):
    """Raised mid-evaluation when a trial cannot meet the SLO; the tuner prunes it."""


Runner = Callable[..., Any]


class Evaluator:
    """Compiles and judges trial configurations of one program for one target.

    >>> ev = Evaluator(program, get_target("h100"), ObjectiveSettings())
    >>> ev.evaluate(space.configure(space.defaults())).values()
    """

    def __init__(
        self, program: Program, target: Target, settings: ObjectiveSettings, *, cache_size: int = 64
    ) -> None:
        self.program = program
        self.target = target
        self.settings = settings
        self.measured = _measured(settings.measure, target)
        self.capacity = (
            settings.memory_capacity_bytes
            if settings.memory_capacity_bytes is not None
            else target.hardware.memory_bytes * target.devices
        )
        self._cache_size = cache_size
        self._programs: collections.OrderedDict[tuple[str, str], tuple[Program, str]] = (
            collections.OrderedDict()
        )
        self._runners: collections.OrderedDict[tuple[str, str], Runner] = collections.OrderedDict()
        self._estimates: dict[tuple[str, int, int], Any] = {}
        self._quality: dict[tuple[str, str | None, int | None], QualityLoss] = {}
        self._source_hash = program.graph_hash()
        self._calibration = [
            program.sample_batch([c], seed=settings.seed + 50_000 + i)
            for i, c in enumerate(settings.calibration)
        ]
        self._reference = join_heads([program.run(b) for b in self._calibration])
        # lowered artifacts (AOTInductor packages) live here and go with the evaluator
        self._tmp = tempfile.TemporaryDirectory(prefix="codesign-search-")
        self._workdir = Path(self._tmp.name)

    @property
    def latency_source(self) -> str:
        if self.measured:
            return f"measured on this machine ({self.target.name})"
        return f"predicted by the cost model for {self.target.name}"

    # ---- compiling -------------------------------------------------------------------------
    def compile(self, passes: Sequence[Pass]) -> tuple[Program, str]:
        """The program after ``passes`` and its graph hash (cached pass by pass)."""
        current, key = self.program, self._source_hash
        for p in passes:
            cache_key = (key, p.uuid())
            hit = self._programs.get(cache_key)
            if hit is None:
                out, _ = PassManager([p], self.target, verify=self.settings.verify_passes).run(current)
                hit = (out, out.graph_hash())
                self._remember(self._programs, cache_key, hit)
            else:
                self._programs.move_to_end(cache_key)
            current, key = hit
        return current, key

    def _remember(self, cache: collections.OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _runner(self, config: TrialConfig, program: Program, key: str) -> Runner:
        backend = config.backend
        if backend is None:
            raise SearchError(
                "a measured trial needs a backend to run it", fix="search with backends=('eager',)"
            )
        rkey = (key, backend.uuid())
        runner = self._runners.get(rkey)
        if runner is None:
            backend.check_target(self.target)
            runner = backend.lower(program, self.target, self._workdir / f"{key[:12]}-{rkey[1]}").runner
            self._remember(self._runners, rkey, runner)
        return runner

    # ---- judging ---------------------------------------------------------------------------
    def evaluate(self, config: TrialConfig) -> Evaluation:
        """Compile ``config`` and measure or predict its objectives (raises ``Hopeless`` to prune)."""
        program, key = self.compile(config.passes)
        s = self.settings
        micro = config.micro_batch
        runner = self._runner(config, program, key) if self.measured else program.graph_module

        def run(batch: RequestBatch) -> Any:
            with torch.no_grad():
                return run_in_pieces(runner, batch, program.spec, program.takes_request_offsets, micro)

        latency: dict[int, float] = {}
        spread: dict[int, float] = {}
        for i, n in enumerate(s.candidates):
            if self.measured:
                batch = program.sample_batch([n] * s.requests, seed=s.seed + i)
                per_block = max(1, math.ceil(s.repeats / BLOCKS))
                timing = robust_latency(functools.partial(run, batch), per_block, blocks=BLOCKS)
                latency[n], spread[n] = timing.seconds, timing.spread
            else:
                latency[n] = self._predicted_latency(program, key, n, micro)
            if s.latency_slo_ms is not None and latency[n] * 1e3 > s.prune_ratio * s.latency_slo_ms:
                raise Hopeless(
                    f"latency at {n} candidates is {latency[n] * 1e3:.3g} ms, over {s.prune_ratio} x "
                    f"the {s.latency_slo_ms} ms SLO"
                )
        # the same program (hash), backend and micro-batch score the calibration batches the same way
        qkey = (key, config.backend.uuid() if self.measured and config.backend else None, micro)
        quality = self._quality.get(qkey)
        if quality is None:
            heads = join_heads([run(b) for b in self._calibration])
            quality = self._quality[qkey] = quality_loss(self._reference, heads, seed=s.seed)
        rows = max(s.candidates) * s.requests
        peak_rows = min(micro, rows) if micro else rows
        memory = self._estimate(
            program, key, peak_rows, _requests_in(peak_rows, max(s.candidates), s.requests)
        )
        return Evaluation(
            latency_s=statistics.fmean(latency.values()),
            latency_by_candidates=latency,
            latency_source=self.latency_source,
            quality=quality,
            memory_bytes=float(memory.memory_bytes),
            memory_capacity_bytes=float(self.capacity),
            kernels=count_kernels(program),
            latency_spread=spread,
        )

    def _estimate(self, program: Program, key: str, rows: int, requests: int) -> Any:
        ekey = (key, rows, requests)
        if ekey not in self._estimates:
            self._estimates[ekey] = estimate(program, self.target, rows, requests)
        return self._estimates[ekey]

    def _predicted_latency(self, program: Program, key: str, candidates: int, micro: int | None) -> float:
        """Per call of ``requests`` requests: full micro-batches plus the remainder, one after another."""
        rows = candidates * self.settings.requests
        size = min(micro, rows) if micro else rows
        full, rest = divmod(rows, size)
        total = (
            full
            * self._estimate(
                program, key, size, _requests_in(size, candidates, self.settings.requests)
            ).latency_s
        )
        if rest:
            total += self._estimate(
                program, key, rest, _requests_in(rest, candidates, self.settings.requests)
            ).latency_s
        return total


def _requests_in(rows: int, candidates: int, requests: int) -> int:
    """Requests a piece of ``rows`` consecutive candidate rows touches (at least one)."""
    return max(1, min(requests, math.ceil(rows / candidates)))


def _measured(mode: str, target: Target) -> bool:
    here = target.hardware.kind == "cpu" and target.runs_here
    if mode == "measured" and not here:
        raise SearchError(
            f"latency can only be measured for the host CPU, not for target '{target.name}' from this machine",
            fix="use measure='predicted' (the cost model) or search for target 'host'",
        )
    return mode == "measured" or (mode == "auto" and here)
