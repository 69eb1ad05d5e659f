"""Measured request scaling for a report: a bundle's compiled variant, and the original model, timed here.

Only for variants whose target is this machine (``Target.runs_here``). One request of each
candidate count is resampled from the bundle's reference requests; the original (eager model from
its reference) and the compiled variant are timed side by side, round by round, so machine drift
hits both alike. Figures are medians.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from codesign.build.bundle import load
from codesign.errors import ReportError
from codesign.hardware.timing import interleaved_medians
from codesign.ir.request import resample_batch
from codesign.ir.workload import Workload
from codesign.report.sources import ReportData, VariantRecord

__all__ = ["MEASURE_CANDIDATES", "measure_scaling"]

MEASURE_CANDIDATES = (1, 16, 64, 256, 1024)


def _measure_one(
    record: VariantRecord, original: Workload | None, candidates: Sequence[int], rounds: int
) -> dict[str, Any]:
    variant = load(record.source)
    target = variant.target
    out: dict[str, Any] = {
        "candidates": list(candidates),
        "source": f"measured on this machine ({target.hardware.source}), median of {rounds} rounds",
        "compiled_s": [],
        "original_s": [] if original is not None else None,
    }
    if original is not None:
        try:
            with torch.no_grad():
                original.model(**variant.reference_inputs.inputs)
        except Exception as exc:  # the user's model and this bundle disagree: say so, not a torch trace
            raise ReportError(
                f"the model given ('{original.name}') does not take the requests of {record.source}: "
                f"{type(exc).__name__}: {str(exc)[:200]}",
                fix="give the model and size the bundle was compiled from (e.g. --model dlrm --size small)",
            ) from exc
    for i, n in enumerate(candidates):
        batch = resample_batch(variant.reference_inputs, variant.spec, [n], seed=1000 + i)
        fns = {"compiled": lambda b=batch: variant.score(b)}
        if original is not None:
            fns["original"] = lambda b=batch: original.model(**b.inputs)
        times = interleaved_medians(fns, rounds=rounds, warmup=3)
        out["compiled_s"].append(times["compiled"])
        if original is not None:
            out["original_s"].append(times["original"])
    return out


def measure_scaling(
    data: ReportData,
    *,
    original: Workload | None = None,
    candidates: Sequence[int] = MEASURE_CANDIDATES,
    rounds: int = 5,
) -> list[str]:
    """Time every variant of ``data`` that runs here; attach the curves (``VariantRecord.measured``).

    ``original`` is the model the bundles were compiled from (its reference), timed eagerly beside
    each variant. Returns a note per variant that was not measured, saying why (also kept in
    ``data.not_measured``).
    """
    if rounds < 1 or not candidates or any(n < 1 for n in candidates):
        raise ReportError(
            f"measuring needs rounds >= 1 and candidate counts >= 1, got {rounds}, {list(candidates)}"
        )
    skipped = []
    for record in data.variants:
        target = record.target
        if target is None or not target.runs_here:
            skipped.append(
                f"{record.name}: target {target.name if target else '?'} does not run on this machine"
            )
            continue
        if original is not None and original.name != record.manifest.get("name"):
            raise ReportError(
                f"--model is '{original.name}' but variant '{record.name}' was compiled from "
                f"'{record.manifest.get('name')}'",
                fix="give the model the bundles were compiled from, or leave --model out",
            )
        record.measured = _measure_one(record, original, candidates, rounds)
    data.not_measured.extend(skipped)
    return skipped
