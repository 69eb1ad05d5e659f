"""New weights for a compiled variant: a delta file applied to a variant makes a new variant.

A server takes fresh weights without recompiling the model: the trainer publishes whole tensors
(dense layers, whole tables) and changed embedding rows, named as the variant's compiled program names
its weights (``weight_names``; passes keep a weight's name unless they rewrite it). The delta file is
checked against the sha256 its publisher gives before it is read, then every entry against the
variant (name, shape, dtype, finite values, row ids in range and unique) before anything is built.
``apply_delta`` leaves the variant as it was and returns a new one that shares every tensor the delta
does not touch; its backend builds the runner from the new program (eager: at once; AOTInductor: the
same package, handed the new weights; Inductor: a recompile); a compiled runner must reproduce the
plain program's outputs on the reference batch. Those outputs become the new variant's reference outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codesign.errors import WeightsError
from codesign.ir.program import call_inputs
from codesign.numerics import compare_outputs, output_tensors

if TYPE_CHECKING:
    from codesign.build.variant import Variant

__all__ = ["DELTA_FORMAT", "WeightsDelta", "apply_delta", "weight_names"]

DELTA_FORMAT = "codesign-weights-delta/1"


@dataclasses.dataclass(frozen=True)
class WeightsDelta:
    """Whole tensors and changed rows, by the compiled program's weight names.

    ``tensors``: name -> the new tensor (same shape and dtype). ``rows``: name -> (row ids, int64
    ``[k]``, unique; new rows ``[k, *row shape]``). ``sha256``: of the file it was read from ("" when
    made in memory).

    >>> sha = WeightsDelta(rows={"tables.3.weight": (ids, new_rows)}).save("delta.pt")
    """

    tensors: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.tensors and not self.rows:
            raise WeightsError("the weight delta is empty", fix="give whole tensors, changed rows, or both")
        both = sorted(set(self.tensors) & set(self.rows))
        if both:
            raise WeightsError(
                f"the delta names {both} both as whole tensors and as rows",
                fix="send each weight once: whole, or its changed rows",
            )
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise WeightsError(f"tensors entry {name!r} is not a name -> tensor pair")
        for name, pair in self.rows.items():
            ok = isinstance(name, str) and isinstance(pair, tuple | list) and len(pair) == 2
            if not ok or not all(isinstance(t, torch.Tensor) for t in pair):
                raise WeightsError(f"rows entry {name!r} is not a name -> (row ids, rows) pair")

    def save(self, path: str | Path) -> str:
        """Write the delta file; returns its sha256 (what the server is given with the file)."""
        record = {
            "format": DELTA_FORMAT,
            "tensors": {n: t.detach().contiguous() for n, t in self.tensors.items()},
            "rows": {
                n: (i.detach().contiguous(), r.detach().contiguous()) for n, (i, r) in self.rows.items()
            },
        }
        buffer = io.BytesIO()
        torch.save(record, buffer)
        data = buffer.getvalue()
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def read(cls, path: str | Path, sha256: str) -> WeightsDelta:
        """Read a delta file that must hash to ``sha256`` (checked before anything is unpacked)."""
        p = Path(path)
        want = sha256.strip().lower()
        if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
            raise WeightsError(
                f"sha256 {sha256!r} is not 64 hex digits",
                fix="give the sha256 that WeightsDelta.save returned",
            )
        if not p.is_file():  # a device or fifo would be read forever
            raise WeightsError(
                f"the delta file {p} is not a regular file", fix="give the path of the delta file"
            )
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise WeightsError(f"cannot read the delta file {p}: {exc.strerror or exc}") from exc
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise WeightsError(
                f"the delta file {p} does not hash to the sha256 given ({want})",
                fix="the file is truncated, altered or not the one published: publish it again",
            )
        try:  # weights_only: a delta file never runs code when it is read; on the CPU, moved to each weight's device
            record = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise WeightsError(f"{p} is not a weight delta file: {type(exc).__name__}: {exc}") from exc
        if not isinstance(record, dict) or record.get("format") != DELTA_FORMAT:
            raise WeightsError(
                f"{p} is not a weight delta file (format {DELTA_FORMAT!r} expected)",
                fix="write it with codesign.WeightsDelta(...).save(path)",
            )
        tensors, rows = record.get("tensors"), record.get("rows")
        if not isinstance(tensors, dict) or not isinstance(rows, dict):
            raise WeightsError(f"{p}: 'tensors' and 'rows' must be dicts")
        bad = [n for n, v in rows.items() if not isinstance(v, tuple | list) or len(v) != 2]
        if bad:
            raise WeightsError(f"{p}: rows entries {bad[:5]} are not (row ids, rows) pairs")
        return cls(tensors=tensors, rows={n: (v[0], v[1]) for n, v in rows.items()}, sha256=got)


def weight_names(variant: Variant) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The weights a delta may name: the compiled program's parameters, buffers and constants."""
    ep = variant.exported
    return {
        n: (tuple(t.shape), t.dtype)
        for n, t in {**ep.state_dict, **ep.constants}.items()
        if isinstance(t, torch.Tensor)
    }


def apply_delta(variant: Variant, delta: WeightsDelta) -> Variant:
    """A new variant with ``delta``'s weights (``variant`` is left as it was); WeightsError if any
    entry does not fit, naming it, with nothing built."""
    ep = variant.exported
    where = f"variant '{variant.name}'"
    if not variant.backend.takes_new_weights:
        raise WeightsError(
            f"{where}: backend '{variant.backend.name}' keeps the weights it was built with",
            fix="send a new bundle compiled from the new weights",
        )
    _check_stand_alone(variant, [*delta.tensors, *delta.rows], where)
    state, constants = dict(ep.state_dict), dict(ep.constants)
    for name, new in delta.tensors.items():
        old = _weight(state, constants, name, where, variant)
        _check_values(name, new, tuple(old.shape), old.dtype, where)
        _put(state, constants, name, new.detach().to(old.device, copy=True).contiguous())
    for name, (ids, new_rows) in delta.rows.items():
        old = _weight(state, constants, name, where, variant)
        if old.dim() < 1:
            raise WeightsError(f"{where}: weight '{name}' is a scalar; it has no rows", fix="send it whole")
        ids = _check_ids(name, ids, old.shape[0], where)
        _check_values(name, new_rows, (ids.numel(), *old.shape[1:]), old.dtype, where)
        table = old.detach().clone()
        table.index_copy_(0, ids.to(table.device), new_rows.to(table.device))
        _put(state, constants, name, table)
    updated = torch.export.ExportedProgram(
        root=ep.graph_module,
        graph=ep.graph,
        graph_signature=ep.graph_signature,
        state_dict=state,
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=constants,
        verifiers=ep.verifiers,
    )
    return _rebuilt(variant, updated)


def split_delta(
    variant: Variant, delta: WeightsDelta, tables: set[str]
) -> tuple[WeightsDelta | None, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A delta for a variant whose ``tables`` are sharded across ranks: the rest of the delta (for
    ``apply_delta``; None when nothing is left) and each table's (row ids, new rows), every entry
    checked against the table's shape and dtype. A whole table becomes all its rows."""
    where = f"variant '{variant.name}'"
    names = [n for n in [*delta.tensors, *delta.rows] if n in tables]
    _check_stand_alone(variant, names, where)
    state, constants = dict(variant.exported.state_dict), dict(variant.exported.constants)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        old = _weight(state, constants, name, where, variant)  # a placeholder of the table's shape and dtype
        if name in delta.tensors:
            new = delta.tensors[name]
            _check_values(name, new, tuple(old.shape), old.dtype, where)
            rows[name] = (torch.arange(old.shape[0]), new.detach())
        else:
            ids, new = delta.rows[name]
            ids = _check_ids(name, ids, old.shape[0], where)
            _check_values(name, new, (ids.numel(), *old.shape[1:]), old.dtype, where)
            rows[name] = (ids, new.detach())
    rest_tensors = {n: t for n, t in delta.tensors.items() if n not in tables}
    rest_rows = {n: r for n, r in delta.rows.items() if n not in tables}
    rest = WeightsDelta(rest_tensors, rest_rows, delta.sha256) if rest_tensors or rest_rows else None
    return rest, rows


def _check_stand_alone(variant: Variant, names: list[str], where: str) -> None:
    """Refuse weights that passes also read into weights of their own (folded, split, fused, quantized):
    a delta would change one use and leave the derived copy as it was."""
    if variant.derived_weights is None:
        raise WeightsError(
            f"{where} comes from a bundle that does not record which weights its passes derived",
            fix="recompile the bundle with this codesign, or send a new bundle compiled from the new weights",
        )
    feeds: dict[str, list[str]] = {}
    for derived, sources in variant.derived_weights.items():
        for source in sources:
            feeds.setdefault(source, []).append(derived)
    tied = {n: sorted(feeds[n]) for n in names if n in feeds}
    if tied:
        first, uses = next(iter(tied.items()))
        raise WeightsError(
            f"{where}: passes computed {uses} from weight '{first}'"
            + (f" (and {len(tied) - 1} more such weights)" if len(tied) > 1 else "")
            + "; a delta would leave those as they were",
            fix="send a new bundle compiled from the new weights",
        )


def _weight(
    state: dict[str, Any], constants: dict[str, Any], name: str, where: str, variant: Variant
) -> torch.Tensor:
    value = state.get(name, constants.get(name))
    if isinstance(value, torch.Tensor):
        return value
    names = sorted(weight_names(variant))
    close = difflib.get_close_matches(name, names, n=3)
    raise WeightsError(
        f"{where} has no weight '{name}'"
        + (f" (closest: {close})" if close else "")
        + f"; its {len(names)} weights are named as its compiled program names them, e.g. {names[:6]}",
        fix="name weights as codesign.weight_names(variant) lists them; a weight that passes rewrote "
        "(split, fused, folded or quantized) is updated by sending a new bundle compiled from the new weights",
    )


def _put(state: dict[str, Any], constants: dict[str, Any], name: str, value: torch.Tensor) -> None:
    if name in state:
        old = state[name]
        state[name] = (
            torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter) else value
        )
    else:
        constants[name] = value


def _check_values(
    name: str, value: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, where: str
) -> None:
    if tuple(value.shape) != shape or value.dtype != dtype:
        raise WeightsError(
            f"{where}: new value of '{name}' is {tuple(value.shape)} {value.dtype}, the weight is {shape} {dtype}",
            fix="send a tensor of the weight's shape and dtype (codesign.weight_names lists them)",
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise WeightsError(
            f"{where}: new value of '{name}' holds NaN or inf", fix="check the trainer's export"
        )


def _check_ids(name: str, ids: torch.Tensor, rows: int, where: str) -> torch.Tensor:
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise WeightsError(
            f"{where}: row ids of '{name}' must be a 1-D int64 tensor, got {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise WeightsError(
            f"{where}: row ids of '{name}' span {int(ids.min())}..{int(ids.max())}, the weight has rows 0..{rows - 1}"
        )
    if ids.unique().numel() != ids.numel():
        raise WeightsError(f"{where}: row ids of '{name}' repeat", fix="send each changed row once")
    return ids


def _rebuilt(variant: Variant, exported: torch.export.ExportedProgram) -> Variant:
    """The variant's backend builds a runner for ``exported``; it must score the reference batch as
    the plain program does, within the variant's tolerance (else the backend did not take the weights)."""
    artifacts, copy = _own_artifacts(variant.artifacts)
    example = call_inputs(variant.reference_inputs, variant.takes_request_offsets)
    what = f"variant '{variant.name}' (backend '{variant.backend.name}')"
    advice = "nothing was changed; send a new bundle compiled from the new weights"
    try:
        try:
            runner = variant.backend.load(exported, artifacts, example)
            if not variant.backend.runs_program_weights(exported, runner):
                raise WeightsError(
                    f"{what} was built with its weights inside its artifacts: it cannot take new ones",
                    fix=advice,
                )
            new = dataclasses.replace(
                variant, runner=runner, exported=exported, artifacts=artifacts, program=None
            )
            got = new.score(new.reference_inputs, check=False)
            ok, max_abs = True, 0.0
            if variant.backend.name != "eager":  # the eager runner is the program itself: nothing to compare
                with torch.no_grad():
                    want = exported.module()(**example)
                ok, max_abs, _ = compare_outputs(got, want, variant.tolerance)
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(
                f"{what} cannot run with the new weights: {type(exc).__name__}: {str(exc)[:500]}", fix=advice
            ) from exc
        if not ok:
            raise WeightsError(
                f"{what} does not score with the new weights as its program does (max abs difference "
                f"{max_abs:.3g}): the backend keeps weights of its own",
                fix=advice,
            )
    except WeightsError:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
        raise
    new.reference_outputs = [t.detach().clone() for t in output_tensors(got)]
    if copy is not None:
        weakref.finalize(new, shutil.rmtree, copy, True)
    return new


def _own_artifacts(artifacts: Mapping[str, Path]) -> tuple[dict[str, Path], Path | None]:
    """A private copy of the backend's files for the new variant: the old variant's copy goes with it."""
    if not artifacts:
        return {}, None
    copy = Path(tempfile.mkdtemp(prefix="codesign-weights-"))
    own = {}
    for name, path in artifacts.items():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        own[name] = target
    return own, copy
