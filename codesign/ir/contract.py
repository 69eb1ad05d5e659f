"""The output contract of a ranking model, checked at capture.

A server batches requests together and hands each request the rows of the outputs that belong to
its candidates. That only works when every output tensor has one row per candidate (dim 0 is the
candidate count), a trailing shape that does not depend on the batch, finite values, and rows that
do not depend on which other requests share the batch. A model that breaks this (it filters rows,
reduces over the batch, normalizes across all candidates) would capture and compile and then fail,
or score wrongly, in serving; ``check_outputs`` refuses it at capture with a ``CaptureError`` that
names the output and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from codesign.errors import CaptureError
from codesign.ir.request import RequestBatch, RequestSpec, concat_batches
from codesign.numerics import output_tensors

__all__ = ["INDEPENDENCE_ATOL", "INDEPENDENCE_RTOL", "check_outputs", "describe_outputs"]

# Rows of one request scored alone or beside other requests: only GEMM blocking may differ.
INDEPENDENCE_RTOL = 1e-4
INDEPENDENCE_ATOL = 1e-5


def describe_outputs(outputs: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Each output's dtype and shape with dim 0 named (what a bundle's manifest records)."""
    return [
        {"dtype": str(t.dtype).removeprefix("torch."), "shape": ["n_candidates", *t.shape[1:]]}
        for t in outputs
    ]


def check_outputs(
    run: Callable[[RequestBatch], Any],
    spec: RequestSpec,
    batches: list[RequestBatch],
    pair: tuple[RequestBatch, RequestBatch],
) -> list[dict[str, Any]]:
    """Check the contract on ``batches`` and on ``pair`` scored apart and joined; the outputs' schema.

    ``run`` scores a batch (the captured graph). Every batch's outputs must have one row per
    candidate, the same dtypes and trailing shapes, and finite values; the two batches of ``pair``
    joined in either order must score each request's rows as they scored alone.
    """
    schema: list[tuple[torch.dtype, tuple[int, ...]]] | None = None
    for batch in batches:
        outs = output_tensors(run(batch))
        _check_rows(outs, batch)
        shapes = [(t.dtype, tuple(t.shape[1:])) for t in outs]
        if schema is None:
            schema = shapes
        elif shapes != schema:
            raise CaptureError(
                f"capture failed: {_mismatch(shapes, batch, schema, batches[0])}; a ranking model's outputs "
                "must have the same dtype and row shape for every number of candidates",
                fix="return [n_candidates, k] tensors whose k does not depend on the batch",
            )
        _check_finite(outs, batch)
    a, b = pair
    alone = [output_tensors(run(a)), output_tensors(run(b))]
    for order, label in (((0, 1), "after"), ((1, 0), "before")):
        first, second = (a, b)[order[0]], (a, b)[order[1]]
        joined = output_tensors(run(concat_batches([first, second], spec)))
        want = [torch.cat([x, y]) for x, y in zip(alone[order[0]], alone[order[1]], strict=True)]
        for i, (got, ref) in enumerate(zip(joined, want, strict=True)):
            if got.shape != ref.shape or not torch.allclose(
                got.double(), ref.double(), rtol=INDEPENDENCE_RTOL, atol=INDEPENDENCE_ATOL, equal_nan=True
            ):
                diff = (
                    (got.double() - ref.double()).abs().max().item()
                    if got.shape == ref.shape
                    else float("inf")
                )
                raise CaptureError(
                    f"capture failed: output {i} of a request changes when another request is scored "
                    f"{label} it in the same batch (max abs difference {diff:.3g}); a server batches "
                    "requests together, so each request's scores must depend on its own rows only",
                    fix="do not reduce or normalize over dim 0 across the whole batch (softmax/mean/sum over "
                    "all rows, BatchNorm in training mode, top-k of the batch); compute per candidate row, "
                    "or per request from request-level inputs",
                )
    assert schema is not None
    return describe_outputs(alone[0])


def _mismatch(
    shapes: list[tuple[torch.dtype, tuple[int, ...]]],
    batch: RequestBatch,
    schema: list[tuple[torch.dtype, tuple[int, ...]]],
    first: RequestBatch,
) -> str:
    at, then = f"at {batch.num_candidates} candidates", f"at {first.num_candidates}"
    if len(shapes) != len(schema):
        return f"the model returns {len(shapes)} tensors {at} but {len(schema)} {then}"
    i = next(k for k, (x, y) in enumerate(zip(shapes, schema, strict=True)) if x != y)
    return f"output {i} is {_kind(*shapes[i])} {at} but {_kind(*schema[i])} {then}"


def _kind(dtype: torch.dtype, row: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')} [n_candidates{''.join(f', {d}' for d in row)}]"


def _check_rows(outs: list[torch.Tensor], batch: RequestBatch) -> None:
    n = batch.num_candidates
    if not outs:
        raise CaptureError(
            "capture failed: the model returns no tensor; a ranking model returns scores",
            fix="return a [n_candidates] or [n_candidates, k] tensor (or a tuple/dict of them)",
        )
    for i, t in enumerate(outs):
        if t.dim() == 0 or t.shape[0] != n:
            rows = "a scalar" if t.dim() == 0 else f"shape {list(t.shape)}"
            raise CaptureError(
                f"capture failed: output {i} has {rows} for a batch of {n} candidates; a ranking model "
                "returns one row per candidate (dim 0), which the server splits by request",
                fix="score every candidate row and return [n_candidates, ...]: do not filter rows "
                "(x[mask]), aggregate over the batch or pad inside forward(); filter or rank after scoring",
            )
        if t.is_complex():
            raise CaptureError(
                f"capture failed: output {i} is {t.dtype}; scores must be real numbers",
                fix="return real-valued scores (e.g. .real or .abs())",
            )


def _check_finite(outs: list[torch.Tensor], batch: RequestBatch) -> None:
    for i, t in enumerate(outs):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            row = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[0])
            raise CaptureError(
                f"capture failed: output {i} is NaN or infinite at candidate row {row} of a batch of "
                f"{batch.num_candidates} candidates",
                fix="check the model on this batch: a log/division/sqrt of a value that reaches 0 or "
                "below, an uninitialised parameter, or ids outside a table's rows",
            )
