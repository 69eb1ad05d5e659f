"""The captured input schema: what every scoring call must look like, checked before the model runs.

A program is captured from one example batch; torch.export then fixes every input's dtype, rank and
trailing shape, and only the candidate count (and each jagged input's length) stays dynamic. A batch
that differs anywhere else fails deep inside torch (a guard ``AssertionError``, an ``IndexError`` from
an embedding table, a dtype mismatch in a matmul) or, worse, scores silently wrong (user features
that differ within a request, when the variant computes user work once per request).

``InputSchema`` is derived once from the RequestSpec, the reference batch and the embedding id
bounds, and ``check`` refuses a batch with an ``RequestError`` subclass that names the input, what is
wrong and the fix. It is the one implementation: ``Variant.score`` runs it on Python API calls and
the wire format (``serving.wire``) runs it on every JSON request after parsing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from codesign.errors import (
    InputNameError,
    InputShapeError,
    InputTypeError,
    InputValueError,
    RequestError,
    SpecError,
)
from codesign.ir.kjt import expand_kjts, is_kjt
from codesign.ir.request import (
    RequestBatch,
    RequestSpec,
    StructuredBatch,
    _dtypes,
    flatten_inputs,
    offsets_from_counts,
)

__all__ = ["InputField", "InputSchema", "as_request_batch"]

Where = Callable[[str, str], str]  # (input path, id column or "*") -> how a message names it


@dataclasses.dataclass(frozen=True)
class InputField:
    """One leaf of the model's keyword inputs, as captured."""

    path: str
    # "candidate" | "request" ([R, ...]) | "map" (request index/offsets) | "jagged" (EmbeddingBag values) |
    # "offsets" / "lengths" (per-candidate, of a jagged input) | "static" | "constant"
    kind: str
    dtype: torch.dtype | None  # None for a Python constant
    shape: tuple[int, ...]  # after dim 0 for candidate inputs; the whole shape for static inputs
    constant: Any = None  # the captured value of a non-tensor leaf

    def describe(self) -> str:
        if self.kind == "constant":
            return f"the constant {self.constant!r}"
        dtype = str(self.dtype).removeprefix("torch.")
        if self.kind == "candidate":
            return f"{dtype} [n_candidates{''.join(f', {d}' for d in self.shape)}]"
        if self.kind == "request":
            return f"{dtype} [n_requests{''.join(f', {d}' for d in self.shape)}]"
        if self.kind == "map":
            return f"{dtype} (the batch's request index or offsets)"
        if self.kind == "jagged":
            return f"{dtype} [n_values] (EmbeddingBag ids)"
        if self.kind == "offsets":
            return f"{dtype} [n_candidates] (per-candidate offsets)"
        if self.kind == "lengths":
            return f"{dtype} [n_candidates] (per-candidate bag lengths)"
        return f"{dtype} {list(self.shape)} (static)"


@dataclasses.dataclass(frozen=True)
class InputSchema:
    """Names, dtypes, shapes, offsets and id ranges a batch must have to be scored."""

    spec: RequestSpec
    fields: tuple[InputField, ...]
    treespec: pytree.TreeSpec
    id_bounds: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_reference(
        cls,
        spec: RequestSpec,
        reference: RequestBatch,
        id_bounds: Mapping[str, Mapping[str, int]] | None = None,
    ) -> InputSchema:
        """The schema of the batch a program was captured (or a bundle verified) with."""
        companions = {c: kind for c, kind in spec.bags.values()}
        fields = []
        for path, value in flatten_inputs(reference.inputs):
            if not isinstance(value, torch.Tensor):
                fields.append(InputField(path, "constant", None, (), value))
            elif path in spec.static_inputs or value.dim() == 0:
                fields.append(InputField(path, "static", value.dtype, tuple(value.shape)))
            elif path in spec.per_request_inputs:
                fields.append(InputField(path, "request", value.dtype, tuple(value.shape[1:])))
            elif path in spec.request_map_inputs:
                fields.append(InputField(path, "map", value.dtype, ()))
            elif path in spec.bags:
                fields.append(InputField(path, "jagged", value.dtype, ()))
            elif path in companions:
                fields.append(InputField(path, companions[path], value.dtype, ()))
            else:
                fields.append(InputField(path, "candidate", value.dtype, tuple(value.shape[1:])))
        _, treespec = pytree.tree_flatten(dict(reference.inputs))
        return cls(spec, tuple(fields), treespec, {k: dict(v) for k, v in (id_bounds or {}).items()})

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.fields]

    def describe(self) -> dict[str, str]:
        """Each input and what it must be, e.g. ``{"dense": "float32 [n_candidates, 13]"}``."""
        return {f.path: f.describe() for f in self.fields}

    # ---- checks -------------------------------------------------------------------------------
    def check(self, batch: RequestBatch, *, repeats: bool = True, where: Where | None = None) -> None:
        """Refuse a batch this program cannot score correctly, with a typed error naming the input.

        ``repeats`` also checks that request-level inputs repeat on every row of a request (a
        request-sharing variant reads only the first row; the wire format builds repeated rows
        itself, so it skips this). ``where`` names an input in messages (the wire names JSON fields).
        """
        if not isinstance(batch, RequestBatch):
            raise RequestError(
                f"expected a codesign.RequestBatch, got {type(batch).__name__}",
                fix="score(RequestBatch(inputs, offsets)) or score(inputs_dict, counts=[...])",
            )
        name = where or (
            lambda path, column: f"input '{path}'" + ("" if column == "*" else f" column {column}")
        )
        leaves = dict(flatten_inputs(batch.inputs))
        self._check_names(leaves)
        n = batch.num_candidates
        for f in self.fields:
            self._check_field(f, leaves[f.path], n, leaves, name, batch)
        self._check_bags(leaves, n, name)
        # keyword inputs: the order of the top-level keys does not matter, the nesting below them does
        inputs = dict(batch.inputs)
        ordered = (
            {k: inputs[k] for k in self._top_keys if k in inputs}
            if set(inputs) == set(self._top_keys)
            else inputs
        )
        _, treespec = pytree.tree_flatten(ordered)
        if treespec != self.treespec:
            raise InputNameError(
                "the inputs have the right names but another nesting (e.g. a tuple where the model "
                "was captured with a list, or a nested dict in another key order)",
                fix="build the inputs like the capture example, e.g. from codesign's make_batch",
            )
        self._check_ids(leaves, name)
        if repeats:
            try:
                batch._check_repeats(self.spec, leaves)
            except SpecError as exc:
                raise InputValueError(exc.message, fix=exc.fix) from None

    def _check_names(self, leaves: Mapping[str, Any]) -> None:
        want = self.paths
        missing = [p for p in want if p not in leaves]
        extra = [p for p in leaves if p not in set(want)]
        by_path = {f.path: f for f in self.fields}
        for path in missing:  # a list or dict where the model takes one tensor flattens to path.0, ...
            inner = [p for p in extra if p.startswith(path + ".")]
            if inner and by_path[path].kind != "constant":
                raise InputTypeError(
                    f"input '{path}' is a container of {len(inner)} values, not a tensor; it must be "
                    f"{by_path[path].describe()}",
                    fix="pass a torch.Tensor (torch.as_tensor(value, dtype=...))",
                )
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {missing}")
            if extra:
                parts.append(f"has unknown inputs {extra}")
            raise InputNameError(
                f"the batch {' and '.join(parts)}; the model takes {want}",
                fix="name inputs by their path in the model's keyword arguments (dict keys and list "
                "indices joined by '.'); see the schema: " + _short(self.describe()),
            )

    def _check_field(
        self, f: InputField, value: Any, n: int, leaves: Mapping[str, Any], name: Where, batch: RequestBatch
    ) -> None:
        label = name(f.path, "*")
        if f.kind == "constant":
            if isinstance(value, torch.Tensor) or value != f.constant:
                raise InputValueError(
                    f"{label} is {_short(value)}; the program was captured with the constant {f.constant!r}",
                    fix=f"pass {f.constant!r} (torch.export fixes non-tensor inputs at capture)",
                )
            return
        if not isinstance(value, torch.Tensor):
            raise InputTypeError(
                f"{label} is a {type(value).__name__}, not a tensor; it must be {f.describe()}",
                fix="pass a torch.Tensor (torch.as_tensor(value, dtype=...))",
            )
        if value.dtype != f.dtype:
            raise InputTypeError(
                f"{label} is {str(value.dtype).removeprefix('torch.')}; the program was captured with "
                f"{str(f.dtype).removeprefix('torch.')}",
                fix=f"convert it: x.to({f.dtype})",
            )
        if f.kind == "static":
            if tuple(value.shape) != f.shape:
                raise InputShapeError(
                    f"{label} has shape {list(value.shape)}; this static input was captured as {list(f.shape)}",
                    fix="pass it with the shape it had at capture",
                )
            return
        if f.kind == "request":
            r = batch.num_requests
            if tuple(value.shape) != (r, *f.shape):
                raise InputShapeError(
                    f"{label} has shape {list(value.shape)}; this per-request input must be {f.describe()} with "
                    f"the batch's {r} requests",
                    fix="give it one row per request, in the order of the batch's offsets",
                )
            return
        if f.kind == "map":
            kind = self.spec.request_map_inputs[f.path]
            expected = batch.request_map(kind)
            if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
                raise InputValueError(
                    f"{label} must hold the batch's request {kind} ({_short(expected.tolist())}), got "
                    f"{_short(value.tolist())}",
                    fix="set it from the batch (RequestBatch.with_request_map(spec)), or build the batch's "
                    "offsets from the same candidate counts",
                )
            return
        if f.kind in ("jagged", "offsets", "lengths"):
            if value.dim() != 1:
                raise InputShapeError(
                    f"{label} has shape {list(value.shape)}; it must be 1-D ({f.describe()})"
                )
            if f.kind in ("offsets", "lengths") and value.numel() != n:
                values_path = self._values_of[f.path]
                what = "start offset" if f.kind == "offsets" else "bag length"
                raise InputShapeError(
                    f"{label} has {value.numel()} entries; it needs one {what} per candidate ({n})",
                    fix=f"entry i describes candidate i's bag in '{values_path}'"
                    + (" (EmbeddingBag include_last_offset=False)" if f.kind == "offsets" else ""),
                )
            return
        want = (n, *f.shape)
        if tuple(value.shape) != want:
            got = list(value.shape)
            if value.dim() == 0 or value.shape[0] != n:
                r = batch.num_requests
                per_request = value.dim() > 0 and value.shape[0] == r
                raise InputShapeError(
                    f"{label} has shape {got}: {value.shape[0] if value.dim() else 'no'} rows, but the batch's "
                    f"offsets give {n} candidates",
                    fix=f"it has one row per request ({r}): declare it per_request_inputs=({f.path!r},) and name "
                    "the input that maps candidates to requests (request_index_input or request_offsets_input)"
                    if per_request
                    else "give every candidate-level input one row per candidate (user features repeated "
                    "on each row of their request), mark it jagged or static, or fix the offsets",
                )
            raise InputShapeError(
                f"{label} has shape {got}; the program was captured with {f.describe()}",
                fix=f"pass rows of shape {list(f.shape)}",
            )

    @functools.cached_property
    def _values_of(self) -> dict[str, str]:
        """Offsets / lengths input -> the jagged values input it describes."""
        return {c: v for v, (c, _) in self.spec.bags.items()}

    @functools.cached_property
    def _top_keys(self) -> tuple[str, ...]:
        return tuple(pytree.tree_unflatten([0] * self.treespec.num_leaves, self.treespec))

    def _check_bags(self, leaves: Mapping[str, Any], n: int, name: Where) -> None:
        """Offsets and lengths of every jagged input, checked together with one host sync (this runs on
        every scoring call, and DLRM has 26 of them); the first bad one is named."""
        fields = [f for f in self.fields if f.kind in ("offsets", "lengths")]
        if not fields or n == 0:
            return
        totals = torch.tensor([leaves[self._values_of[f.path]].numel() for f in fields], dtype=torch.int64)
        per_row = torch.stack([leaves[f.path].to(torch.int64) for f in fields])  # [fields, n], shapes checked
        is_offsets = torch.tensor([f.kind == "offsets" for f in fields])
        offsets_bad = (
            (per_row[:, 0] != 0) | (per_row[:, -1] > totals) | (per_row[:, 1:] < per_row[:, :-1]).any(1)
        )
        lengths_bad = (per_row < 0).any(1) | (per_row.sum(1) != totals)
        bad = torch.where(is_offsets, offsets_bad, lengths_bad).nonzero()
        if not bad.numel():
            return
        f, row, total = fields[int(bad[0])], per_row[int(bad[0])], int(totals[int(bad[0])])
        label, values_path = name(f.path, "*"), self._values_of[f.path]
        if f.kind == "offsets":
            raise InputValueError(
                f"{label} must start at 0 and not decrease, ending within the {total} values of "
                f"'{values_path}'; got {_short(row.tolist())}",
                fix="build them as a cumulative sum of the bag lengths, starting at 0",
            )
        raise InputValueError(
            f"{label} must be >= 0 and add up to the {total} values of '{values_path}'; got "
            f"{_short(row.tolist())} (sum {int(row.sum())})",
            fix="give each candidate's bag size, in candidate order",
        )

    @functools.cached_property
    def _bounds_to_check(self) -> dict[str, dict[str, int]]:
        """``id_bounds`` without the column bounds a whole-input bound already implies (a bundle whose
        variants read columns of one input carries both; useq's serving bundle: 33 -> 1 per input)."""
        out = {}
        for path, per in self.id_bounds.items():
            whole = per.get("*")
            out[path] = {c: rows for c, rows in per.items() if c == "*" or whole is None or rows < whole}
        return out

    def _check_ids(self, leaves: Mapping[str, Any], name: Where) -> None:
        """Ids against their tables' rows: every bounded input and column in one pass (one host sync);
        the first that holds an id outside its table is named."""
        parts: list[tuple[str, str, int, torch.Tensor]] = []
        for path, per in self._bounds_to_check.items():
            t = leaves.get(path)
            if isinstance(t, torch.Tensor) and t.numel():
                parts += [
                    (path, c, rows, (t if c == "*" else t[:, int(c)]).reshape(-1)) for c, rows in per.items()
                ]
        if not parts:
            return
        floats = any(ids.is_floating_point() for *_, ids in parts)  # id columns of a flat float tensor
        dtype = torch.float64 if floats else torch.int64
        ids_all = torch.cat([ids.to(dtype) for *_, ids in parts])
        sizes = torch.tensor([ids.numel() for *_, ids in parts])
        rows_all = torch.tensor([rows for _, _, rows, _ in parts], dtype=dtype).repeat_interleave(sizes)
        outside = ((ids_all < 0) | (ids_all >= rows_all)).nonzero()
        if not outside.numel():
            return
        at = int(outside[0])
        path, column, rows, _ = parts[int(torch.searchsorted(sizes.cumsum(0), at, right=True))]
        raise InputValueError(
            f"{name(path, column)} holds id {float(ids_all[at]):g}, outside its embedding table's {rows} rows",
            fix=f"ids of this input must lie in 0..{rows - 1}; map unseen ids to a valid (e.g. hashed) id",
        )


def as_request_batch(
    inputs: RequestBatch | StructuredBatch | Mapping[str, Any],
    *,
    counts: Sequence[int] | torch.Tensor | None = None,
    spec: RequestSpec,
    template: RequestBatch,
    compact: Iterable[str] = (),
) -> RequestBatch:
    """A RequestBatch from what ``Variant.score`` accepts: a batch, a structured batch, or a dict of inputs.

    A plain dict holds the model's keyword inputs (flat rows); ``counts`` gives the candidates per
    request (one request of every row when omitted). A structured batch's user bags named in
    ``compact`` are laid out once per request (``StructuredBatch.to_flat``).
    """
    if isinstance(inputs, RequestBatch):
        if counts is not None:
            raise RequestError("counts= applies to a dict of inputs; a RequestBatch carries its own offsets")
        if not any(is_kjt(v) for v in inputs.inputs.values()):
            return inputs
        return RequestBatch(_expand(inputs.inputs, template), inputs.offsets)
    if isinstance(inputs, StructuredBatch):
        if counts is not None:
            raise RequestError(
                "counts= applies to a dict of inputs; a StructuredBatch carries its own offsets"
            )
        return inputs.to_flat(spec, template, compact)
    if not isinstance(inputs, Mapping):
        raise RequestError(
            f"score() takes a RequestBatch, a StructuredBatch or a dict of the model's inputs, got "
            f"{type(inputs).__name__}",
            fix="score({'dense': x, ...}, counts=[...]) or score(RequestBatch(inputs, offsets))",
        )
    if counts is None:
        first = _first_candidate_rows(inputs, spec)
        if first is None:
            raise RequestError(
                "cannot tell the number of candidates of this dict of inputs (no candidate-level tensor)",
                fix="pass counts=[candidates per request]",
            )
        counts = [first]
    try:
        offsets = offsets_from_counts(counts)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RequestError(
            f"counts={_short(counts)} is not a list of candidate counts ({exc})",
            fix="counts=[candidates of request 0, candidates of request 1, ...]",
        ) from None
    given = _expand(inputs, template)
    for path in spec.request_map_inputs:  # filled from the offsets, as everywhere codesign builds a batch
        if "." not in path and path not in given:
            given[path] = torch.zeros(0, dtype=torch.int64)
    try:
        batch = RequestBatch(inputs=given, offsets=offsets)
    except SpecError as exc:
        raise RequestError(f"counts={_short(counts)}: {exc.message}", fix=exc.fix) from None
    return batch.with_request_map(spec, _dtypes(template))


def _expand(inputs: Mapping[str, Any], template: RequestBatch) -> dict[str, Any]:
    """KeyedJaggedTensor inputs as the per-key values/lengths the program was captured with."""
    if not any(is_kjt(v) for v in inputs.values()):
        return dict(inputs)
    keys = {n: tuple(v) for n, v in template.inputs.items() if isinstance(v, dict)}
    try:
        return expand_kjts(inputs, keys)
    except SpecError as exc:
        raise InputNameError(exc.message, fix=exc.fix) from None


def _first_candidate_rows(inputs: Mapping[str, Any], spec: RequestSpec) -> int | None:
    offsets_of = {c for c, _ in spec.bags.values()}
    for path, value in flatten_inputs(inputs):
        if (
            isinstance(value, torch.Tensor)
            and value.dim() > 0
            and path not in spec.bags
            and path not in spec.static_inputs
            and path not in spec.per_request_inputs
            and path != spec.request_offsets_input
        ):
            return int(value.numel()) if path in offsets_of else int(value.shape[0])
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:197] + "..."
