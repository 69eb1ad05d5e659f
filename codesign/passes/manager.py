"""Passes and the PassManager: ordered graph rewrites with numerics verified after every pass.

A pass is a small object: a frozen ``Config`` of knobs, ``apply(program, target) -> PassResult``,
a tolerance, and a stable ``uuid()`` for cache keys. The manager runs passes on a copy of the
program, lints and recompiles the graph after each, checks its outputs against the pass's input
on fresh random requests, and returns the final program with a ``CompileReport``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from codesign.config import Config
from codesign.errors import ConfigError, NumericsError, PassError
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import EXACT, Tolerance, compare_outputs

__all__ = [
    "CompileReport",
    "Knob",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "Tunable",
    "combined_tolerance",
    "gain_knob",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Knob:
    """A pass parameter search may tune: a config field with its type and range."""

    name: str
    kind: str  # "int" | "float" | "bool" | "categorical"
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    log: bool = False
    doc: str = ""
    step: float | None = None  # search grid for float knobs (values closer than this act alike)
    # active only when another knob of the same pass/backend takes one of these values
    when: tuple[str, tuple[Any, ...]] | None = None

    def check(self, value: Any) -> None:
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "categorical": value in self.choices,
        }[self.kind]
        if ok and self.kind in ("int", "float"):
            ok = (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        if not ok:
            rng = self.choices if self.kind == "categorical" else f"[{self.low}, {self.high}]"
            raise ConfigError(f"knob {self.name}={value!r} is not a valid {self.kind} in {rng}")


# The knob of every pass that keeps its rewrite only where the cost model predicts a gain.
def gain_knob() -> Knob:
    return Knob(
        "require_predicted_gain",
        "bool",
        True,
        doc="keep the rewrite only when the cost model predicts lower latency on the target",
    )


@dataclasses.dataclass
class PassResult:
    program: Program
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class Tunable:
    """Shared by passes and backends: a typed config of knobs checked on construction, and a stable uuid."""

    name: ClassVar[str]
    config_class: ClassVar[type[Config]]
    version: ClassVar[int] = 1

    def __init__(self, config: Config | None = None) -> None:
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise ConfigError(f"{self.name} takes a {self.config_class.__name__}, got {type(cfg).__name__}")
        for knob in self.knobs():
            knob.check(getattr(cfg, knob.name))
        self.config = cfg

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        """The knobs search may tune (by default: none)."""
        return ()

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        """Why this pass or backend cannot be used for ``target`` (None when it can).

        Search leaves unavailable ones (and their knobs) out of the space for that target.
        """
        return None

    def uuid(self) -> str:
        """Stable id of this code version and config, for cache keys."""
        raw = f"{type(self).__module__}.{type(self).__qualname__}:v{self.version}:{self.config.to_json()}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class Pass(Tunable, abc.ABC):
    """Base of every graph pass. Subclasses set ``name``, ``config_class`` and implement ``apply``."""

    tolerance: ClassVar[Tolerance] = EXACT
    # lossy passes (quantization) are opt-in: left out of ``default_passes()`` and off in the
    # default trial of a search, which may still turn them on
    enabled_by_default: ClassVar[bool] = True

    @abc.abstractmethod
    def apply(self, program: Program, target: Target) -> PassResult:
        """Rewrite ``program`` (already a private copy) for ``target``."""


@dataclasses.dataclass
class PassRecord:
    """What one pass did: modified or not, op counts, numerics, time, its own stats."""

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


@dataclasses.dataclass
class CompileReport:
    program_name: str
    target: str
    passes: list[PassRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "program": self.program_name,
            "target": self.target,
            "passes": [dataclasses.asdict(p) for p in self.passes],
        }


def combined_tolerance(passes: Sequence[Pass]) -> Tolerance:
    """The loosest tolerance of ``passes`` (elementwise bounds, and the lowest SQNR floor if any)."""
    floors = [p.tolerance.min_sqnr_db for p in passes if p.tolerance.min_sqnr_db is not None]
    return Tolerance(
        max((p.tolerance.rtol for p in passes), default=EXACT.rtol),
        max((p.tolerance.atol for p in passes), default=EXACT.atol),
        min(floors) if floors else None,
    )


class PassManager:
    """Runs passes in order and verifies numerics after each one.

    >>> program, report = PassManager([DeadCodeElimination(), ConstantFolding()], target).run(program)
    """

    def __init__(
        self, passes: Sequence[Pass], target: Target, *, verify: bool = True, checks: int = 2, seed: int = 0
    ) -> None:
        self.passes = list(passes)
        self.target = target
        self.verify = verify
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
        reference = program
        current = program.copy()
        records: list[PassRecord] = []
        done: list[str] = []
        for index, p in enumerate(self.passes):
            ops_before = current.op_count()
            # each pass is held to its own tolerance against its input (a lossy pass earlier in
            # the pipeline must not make the exact ones after it fail)
            checks: list[tuple[Any, Any]] = []
            if self.verify:
                with torch.no_grad():
                    checks = [(b, current.run(b)) for b in self._check_batches(reference, index)]
            t0 = time.perf_counter()
            try:
                result = p.apply(current, self.target)
                result.program.recompile()
                result.program.verify()
            except PassError:
                raise
            except Exception as exc:
                raise PassError(
                    f"pass '{p.name}' failed after {done or 'no passes'}: {type(exc).__name__}: {exc}",
                    fix=f"run without '{p.name}' or report the model that triggers it",
                ) from exc
            seconds = time.perf_counter() - t0
            max_abs = max_rel = 0.0
            if self.verify:
                tol = p.tolerance
                for batch, want in checks:
                    with torch.no_grad():
                        got = result.program.run(batch)
                    ok, a, r = compare_outputs(got, want, tol)
                    max_abs, max_rel = max(max_abs, a), max(max_rel, r)
                    if not ok:
                        raise NumericsError(
                            f"pass '{p.name}' (after {done or 'no passes'}) changed outputs beyond its tolerance "
                            f"({tol}): max abs error {a:.3g}, max rel error {r:.3g} "
                            f"on {batch.num_requests} requests / {batch.num_candidates} candidates",
                            fix=f"disable '{p.name}' for this model or loosen its config",
                        )
            current = result.program
            records.append(
                PassRecord(
                    p.name,
                    p.uuid(),
                    p.config.to_dict()["fields"],
                    result.modified,
                    ops_before,
                    current.op_count(),
                    max_abs,
                    max_rel,
                    seconds,
                    result.stats,
                )
            )
            log.info(
                "pass %s: modified=%s ops %d -> %d", p.name, result.modified, ops_before, current.op_count()
            )
            done.append(p.name)
        current.metadata["passes"] = [{"name": r.name, "uuid": r.uuid, "config": r.config} for r in records]
        return current, CompileReport(program.name, self.target.name, records)
