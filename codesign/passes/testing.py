"""Test helpers every pass and backend is held to: IR well-formedness, output closeness, SQNR.

Shipped in the package (like ``optuna.testing``) so that out-of-tree passes and backends can run
the same checks as the built-in ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import Tolerance, compare_outputs, output_tensors, sqnr_db
from codesign.passes.manager import Pass, PassManager, combined_tolerance

__all__ = ["assert_outputs_close", "assert_sqnr", "check_pass_on_program", "verify_program"]


def verify_program(program: Program) -> None:
    """Raise if the program's IR is malformed (see ``Program.verify``)."""
    program.verify()


def assert_sqnr(reference: Any, other: Any, min_db: float) -> None:
    for i, (r, o) in enumerate(zip(output_tensors(reference), output_tensors(other), strict=True)):
        got = sqnr_db(r, o)
        if got < min_db:
            raise AssertionError(f"output {i}: SQNR {got:.1f} dB < required {min_db} dB")


def assert_outputs_close(got: Any, want: Any, tol: Tolerance) -> None:
    ok, max_abs, max_rel = compare_outputs(got, want, tol)
    if not ok:
        raise AssertionError(f"outputs differ: max abs {max_abs:.3g}, max rel {max_rel:.3g} (tol {tol})")


def check_pass_on_program(
    program: Program,
    passes: Sequence[Pass],
    target: Target,
    candidate_counts: Iterable[Sequence[int]] = ((1,), (3, 8, 1)),
) -> Program:
    """Run ``passes`` through the PassManager and re-check outputs on extra batch shapes."""
    out, _ = PassManager(passes, target).run(program)
    verify_program(out)
    for i, counts in enumerate(candidate_counts):
        batch = program.sample_batch(list(counts), seed=9000 + i)
        assert_outputs_close(out.run(batch), program.run(batch), combined_tolerance(passes))
    return out
