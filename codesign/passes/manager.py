"""Passes and the PassManager: ordered graph rewrites with numerics verified after every pass.

A pass is a small object: a frozen ``Config`` of knobs, ``apply(program, target) -> PassResult``,
a tolerance, and a stable ``uuid()`` for cache keys. The manager runs passes on a copy of the
program, lints and recompiles the graph after each, checks its outputs against the pass's input
on fresh random requests, and returns the final program with a ``CompileReport``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar, Union

import torch

from codesign.analysis import analyze
from codesign.config import Config, Knob
from codesign.errors import ConfigError, NumericsError, PassError
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import Target
from codesign.hardware.tunable import Tunable
from codesign.ir.program import Program
from codesign.numerics import EXACT, Tolerance, compare_outputs
from codesign.passes.measured_gate import GATE_LAYOUTS, KEEP_BELOW, MAX_TIMED_S, time_programs
from codesign.passes.registry import pass_by_name, pass_names

__all__ = [
    "GAIN_HELP",
    "GATE_CANDIDATES",
    "GATE_REQUESTS",
    "CompileReport",
    "Knob",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "SkipKind",
    "SkipReason",
    "combined_tolerance",
    "predicted_latency",
    "resolve_passes",
]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Config)

# The batch every cost gate predicts at: one shape for every pass, so gates compare like with like.
GATE_CANDIDATES, GATE_REQUESTS = 1024, 16

# Help of the knob every cost-gated pass declares (``require_predicted_gain``); the manager acts on it.
GAIN_HELP = "keep the rewrite only when the cost model predicts lower latency on the target"


class SkipKind(str, enum.Enum):
    """Why a pass left the program as it was."""

    UNAVAILABLE = "unavailable"  # the pass cannot serve this target (e.g. FP8 without FP8 units)
    NOT_APPLICABLE = "not_applicable"  # the pattern it rewrites does not occur in this program
    BELOW_THRESHOLD = "below_threshold"  # it occurs, but below a knob's threshold
    NO_PREDICTED_GAIN = "no_predicted_gain"  # rewritten, then discarded: the cost model predicts no gain
    NO_MEASURED_GAIN = "no_measured_gain"  # rewritten, then discarded: timed on this machine, not faster
    DISABLED = "disabled"  # a knob turns it off on this target
    ALREADY_APPLIED = "already_applied"  # the program already has the form the pass produces


@dataclasses.dataclass(frozen=True)
class SkipReason:
    """A typed skip: what kind, what happened in words, and what a user could change."""

    kind: SkipKind
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "message": self.message, "fix": self.fix}

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}" + (f" ({self.fix})" if self.fix else "")


@dataclasses.dataclass
class PassResult:
    """What a pass's rewrite returns: the program, whether it changed, its own stats, or why it skipped."""

    program: Program
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip: SkipReason | None = None
    # (seconds before, seconds after) when the pass timed its rewrite on this machine: then the manager
    # keeps the pass's own measured decision instead of gating on the cost model
    measured: tuple[float, float] | None = None
    # the rewrite a pass's own gate discarded (then ``program`` is its input): what verify_gates measures
    rejected: Program | None = None

    @classmethod
    def skipped(
        cls, program: Program, kind: SkipKind, message: str, fix: str = "", **stats: Any
    ) -> PassResult:
        return cls(program, False, dict(stats), SkipReason(kind, message, fix))


def timeable(program: Program, target: Target, predicted: float | None = None) -> bool:
    """Whether a measured gate can time ``program``: it accepts the gate batches (its ``max_candidates``
    covers the largest) and the cost model predicts a run within ``MAX_TIMED_S`` (``predicted``, when
    the caller has it already)."""
    widest = max(sum(counts) for _, counts in GATE_LAYOUTS)
    if program.max_candidates < widest:
        return False
    return (predicted if predicted is not None else predicted_latency(program, target)) <= MAX_TIMED_S


def predicted_latency(program: Program, target: Target) -> float:
    """The cost model's latency of ``program`` on ``target`` at the gate batch."""
    return estimate_analysis(analyze(program, GATE_CANDIDATES, GATE_REQUESTS), target).latency_s


class Pass(Tunable[C], abc.ABC):
    """Base of every graph pass. Subclasses set ``name``, ``config_class`` and implement ``apply``.

    ``apply`` holds only the rewrite. The manager resolves names, skips unavailable passes, verifies
    numerics, times each pass and gates it: a pass whose config has ``require_predicted_gain`` set is
    kept only if it is faster at the gate batches, timed here when the target is this machine (and a
    run is cheap, ``MAX_TIMED_S``), else as the cost model predicts it.
    """

    tolerance: ClassVar[Tolerance] = EXACT
    # lossy passes (quantization) are opt-in: left out of ``default_passes()`` and off in the
    # default trial of a search, which may still turn them on
    enabled_by_default: ClassVar[bool] = True

    @abc.abstractmethod
    def apply(self, program: Program, target: Target) -> PassResult:
        """Rewrite ``program`` (a private copy whose existing parameters must not change in place)."""

    @property
    def gated(self) -> bool:
        """Whether the manager keeps this pass's rewrite only on a predicted gain."""
        return bool(getattr(self.config, "require_predicted_gain", False))

    def ungated(self) -> Pass[C]:
        """This pass with its gate off (kept whatever it predicts or measures); itself when it has none."""
        if not any(f.name == "require_predicted_gain" for f in dataclasses.fields(self.config)):
            return self
        return type(self)(self.config.replace(require_predicted_gain=False))


# A gate's decision is wrong when measurement contradicts it by more than this: it kept a rewrite that
# runs over 10 % slower, or discarded one that runs over 10 % faster.
WRONG_BY = 0.10


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One gated decision and what measuring both sides says of it (``after / before`` ratios)."""

    kept: bool
    decided_by: str  # "cost model" or "measurement"
    predicted_ratio: float
    measured_ratio: float
    measured_s: Mapping[str, Mapping[str, float]]  # layout -> {"before", "after"} median seconds

    @property
    def wrong(self) -> bool:
        if self.kept:
            return self.measured_ratio > 1 + WRONG_BY
        return self.measured_ratio < 1 - WRONG_BY

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "measured_s": {k: dict(v) for k, v in self.measured_s.items()},
            "wrong": self.wrong,
        }


def check_gate(before: Program, after: Program, target: Target, *, kept: bool, decided_by: str) -> GateCheck:
    """Time ``before`` and ``after`` on the gate layouts and set the measured ratio beside the predicted one.

    The measured ratio is the geometric mean over the layouts of ``t(after) / t(before)`` (the graphs
    run op by op, as the cost model prices them), so one layout's noise does not decide alone.
    """
    gate = time_programs(
        {"before": before, "after": after}, key=("verify_gates", before.graph_hash(), after.graph_hash())
    )
    return GateCheck(
        kept=kept,
        decided_by=decided_by,
        predicted_ratio=predicted_latency(after, target) / predicted_latency(before, target),
        measured_ratio=gate.mean_ratio("after", "before"),
        measured_s={k: {"before": v["before"], "after": v["after"]} for k, v in gate.seconds.items()},
    )


@dataclasses.dataclass
class PassRecord:
    """What one pass did: modified or why not, op counts, numerics, time, predictions, its own stats."""

    name: str
    uuid: str
    config: dict[str, Any]
    modified: bool
    ops_before: int
    ops_after: int
    max_abs_error: float
    max_rel_error: float
    seconds: float
    stats: dict[str, Any]
    skip: SkipReason | None = None
    # the cost model at the gate batch, before and after the rewrite (gated passes that rewrote; else None)
    predicted_latency_before_s: float | None = None
    predicted_latency_after_s: float | None = None
    measured_latency_before_s: float | None = None
    measured_latency_after_s: float | None = None
    # with verify_gates: the gate's decision checked against a measurement of both sides (GateCheck.to_dict)
    gate_check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip"] = self.skip.to_dict() if self.skip is not None else None
        return out


@dataclasses.dataclass
class CompileReport:
    program_name: str
    target: str
    passes: list[PassRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "program": self.program_name,
            "target": self.target,
            "passes": [p.to_dict() for p in self.passes],
        }


def combined_tolerance(passes: Sequence[Pass[Any]]) -> Tolerance:
    """The loosest tolerance of ``passes`` (elementwise bounds, and the lowest SQNR floor if any)."""
    floors = [p.tolerance.min_sqnr_db for p in passes if p.tolerance.min_sqnr_db is not None]
    return Tolerance(
        max((p.tolerance.rtol for p in passes), default=EXACT.rtol),
        max((p.tolerance.atol for p in passes), default=EXACT.atol),
        min(floors) if floors else None,
    )


PassLike = Union["Pass[Any]", "type[Pass[Any]]", str]


def resolve_passes(passes: Sequence[PassLike]) -> list[Pass[Any]]:
    """Pass objects for a mix of objects, classes and registered names (``pass_names()``)."""
    out: list[Pass[Any]] = []
    for i, p in enumerate(passes):
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(pass_by_name(p)())
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        else:
            raise PassError(
                f"passes[{i}] is a {type(p).__name__} ({p!r}), not a pass",
                fix=f"give Pass objects, Pass classes or names from {pass_names()}",
            )
    return out


class PassManager:
    """Runs passes in order and owns what every pass needs around its rewrite.

    For each pass: skip it (typed reason) when it is unavailable for the target; run its rewrite on a copy
    that shares the parameters; for a gated pass, keep the rewrite only if it is faster: measured side by
    side when the target is this machine (``gate_by_measurement``), else predicted by the cost model;
    verify the IR and the numerics against the pass's input on fresh random requests; time it.
    ``verify_gates`` also measures both sides of every gated decision and records the check.

    >>> program, report = PassManager(["dce", "constant_folding"], target).run(program)
    """

    def __init__(
        self,
        passes: Sequence[PassLike],
        target: Target,
        *,
        verify: bool = True,
        checks: int = 2,
        seed: int = 0,
        verify_gates: bool = False,
        gate_by_measurement: bool = True,
    ) -> None:
        if verify_gates and not target.is_this_machine:
            raise PassError(
                f"verify_gates measures both sides of each gated decision here, and target "
                f"'{target.name}' is not this machine",
                fix="verify gates with target 'host' (or on a machine that has the target)",
            )
        self.passes = resolve_passes(passes)
        self.target = target
        self.verify = verify
        self.verify_gates = verify_gates
        self.gate_by_measurement = gate_by_measurement
        self.checks = checks
        self.seed = seed

    def _check_batches(self, program: Program, index: int) -> list[Any]:
        # fresh requests per pass: jagged counts including a single-candidate request
        shapes = [[5, 1, 3], [2, 7]]
        return [
            program.sample_batch(shapes[i % len(shapes)], seed=self.seed + 1000 * index + i)
            for i in range(self.checks)
        ]

    def run(self, program: Program) -> tuple[Program, CompileReport]:
        # every pass works on its own shallow copy (sharing the parameters: passes add buffers, never change
        # existing ones in place), so ``program`` itself is never changed
        reference = current = program
        records: list[PassRecord] = []
        done: list[str] = []
        predicted: float | None = None  # of ``current``, once computed
        for index, p in enumerate(self.passes):
            t0 = time.perf_counter()
            ops_before = current.op_count()
            why = p.unavailable(self.target)
            if why is not None:
                skip = SkipReason(SkipKind.UNAVAILABLE, why, fix=f"leave '{p.name}' out for this target")
                records.append(self._record(p, current, ops_before, PassResult(current, False, {}, skip), t0))
                done.append(p.name)
                continue
            result = self._apply(p, current.shallow_copy(), done)
            proposed = result
            before = after = None
            if result.modified and p.gated and result.measured is None:
                if predicted is None:
                    predicted = predicted_latency(current, self.target)
                if self._measures(p, current, predicted):
                    result = self._measured_gate(p, current, result)
                else:
                    before = predicted
                    after = predicted_latency(result.program, self.target)
                    result = self._predicted_gate(current, result, before, after)
            check = self._check_gate(p, current, proposed, result) if self.verify_gates and p.gated else None
            if not result.modified and result.skip is None:
                result.skip = SkipReason(SkipKind.NOT_APPLICABLE, "the pass found nothing to rewrite")
            max_abs = max_rel = 0.0
            if self.verify and result.modified:
                # each pass is held to its own tolerance against its input (a lossy pass earlier in
                # the pipeline must not make the exact ones after it fail)
                batches = self._check_batches(reference, index)
                max_abs, max_rel = self._check_numerics(p, current, result.program, batches, done)
            record = self._record(p, current, ops_before, result, t0)
            record.max_abs_error, record.max_rel_error = max_abs, max_rel
            record.predicted_latency_before_s, record.predicted_latency_after_s = before, after
            if result.measured is not None:
                record.measured_latency_before_s, record.measured_latency_after_s = result.measured
            if check is not None:
                record.gate_check = check.to_dict()
            records.append(record)
            if result.modified:
                current, predicted = result.program, after
            log.info(
                "pass %s: modified=%s ops %d -> %d", p.name, result.modified, ops_before, current.op_count()
            )
            done.append(p.name)
        passes = [
            {"name": r.name, "uuid": r.uuid, "config": r.config, "modified": r.modified} for r in records
        ]
        current = dataclasses.replace(current, metadata={**current.metadata, "passes": passes})
        return current, CompileReport(program.name, self.target.name, records)

    def _measures(self, p: Pass[Any], current: Program, predicted: float) -> bool:
        """Gate on timings here: the target is this machine, neither the manager nor the pass opted out
        (``gate_by_measurement``), the gate batches fit the program, and a run is cheap to repeat."""
        return (
            self.gate_by_measurement
            and bool(getattr(p.config, "gate_by_measurement", True))
            and self.target.is_this_machine
            and timeable(current, self.target, predicted)
        )

    def _measured_gate(self, p: Pass[Any], current: Program, result: PassResult) -> PassResult:
        """Keep the rewrite only if it runs at least 3 % faster here on every gate layout."""
        gate = time_programs(
            {"before": current, "after": result.program},
            key=("gate", p.uuid(), current.graph_hash(), self.target.name),
        )
        first = GATE_LAYOUTS[0][0]
        measured = (gate.seconds[first]["before"], gate.seconds[first]["after"])
        stats = {**result.stats, "measured_spread": round(gate.max_spread, 4)}  # how much the timings agreed
        if gate.worst_ratio("after", "before") < KEEP_BELOW:
            return dataclasses.replace(result, measured=measured, stats=stats)
        timings = ", ".join(
            f"{k} {t['after'] * 1e3:.3g} ms vs {t['before'] * 1e3:.3g} ms" for k, t in gate.seconds.items()
        )
        return PassResult(
            current,
            False,
            stats,
            SkipReason(
                SkipKind.NO_MEASURED_GAIN,
                f"timed on this machine, the rewrite is not {1 - KEEP_BELOW:.0%} faster: {timings}",
                fix="set require_predicted_gain=False to keep it anyway",
            ),
            measured=measured,
        )

    def _predicted_gate(
        self, current: Program, result: PassResult, before: float, after: float
    ) -> PassResult:
        if after < before:
            return result
        return PassResult(
            current,
            False,
            result.stats,
            SkipReason(
                SkipKind.NO_PREDICTED_GAIN,
                f"the cost model predicts {after * 1e3:.4g} ms after vs {before * 1e3:.4g} ms "
                f"before on {self.target.name}; the rewrite was discarded",
                fix="set require_predicted_gain=False to keep it anyway",
            ),
        )

    def _check_gate(
        self, p: Pass[Any], current: Program, proposed: PassResult, result: PassResult
    ) -> GateCheck | None:
        """Measure both sides of ``p``'s gated decision (None where there was no rewrite to decide on).

        ``proposed`` is what the pass returned, ``result`` what the gate made of it. A pass that timed
        its own rewrite and declined it hands back its input and the rewrite it rejected
        (``PassResult.rejected``), which is what is measured.
        """
        decided_by = (
            "measurement" if result.measured is not None or proposed.measured is not None else "cost model"
        )
        if proposed.modified:
            return check_gate(
                current, proposed.program, self.target, kept=result.modified, decided_by=decided_by
            )
        if proposed.rejected is None:
            return None
        return check_gate(current, proposed.rejected, self.target, kept=False, decided_by="measurement")

    def _apply(self, p: Pass[Any], program: Program, done: list[str]) -> PassResult:
        try:
            result = p.apply(program, self.target)
            if result.modified:
                result.program.recompile()
                result.program.verify()
        except (PassError, ConfigError):
            raise
        except Exception as exc:
            raise PassError(
                f"pass '{p.name}' failed after {done or 'no passes'}: {type(exc).__name__}: {exc}",
                fix=f"run without '{p.name}' or report the model that triggers it",
            ) from exc
        return result

    def _check_numerics(
        self, p: Pass[Any], before: Program, after: Program, batches: list[Any], done: list[str]
    ) -> tuple[float, float]:
        max_abs = max_rel = 0.0
        tol = p.tolerance
        for batch in batches:
            with torch.no_grad():
                want, got = before.run(batch), after.run(batch)
            ok, a, r = compare_outputs(got, want, tol)
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
            if not ok:
                raise NumericsError(
                    f"pass '{p.name}' (after {done or 'no passes'}) changed outputs beyond its tolerance "
                    f"({tol}): max abs error {a:.3g}, max rel error {r:.3g} "
                    f"on {batch.num_requests} requests / {batch.num_candidates} candidates",
                    fix=f"disable '{p.name}' for this model or loosen its config",
                )
        return max_abs, max_rel

    def _record(
        self, p: Pass[Any], current: Program, ops_before: int, result: PassResult, t0: float
    ) -> PassRecord:
        program = result.program if result.modified else current
        return PassRecord(
            p.name,
            p.uuid(),
            p.config.to_dict()["fields"],
            result.modified,
            ops_before,
            program.op_count(),
            0.0,
            0.0,
            time.perf_counter() - t0,
            result.stats,
            result.skip,
        )
