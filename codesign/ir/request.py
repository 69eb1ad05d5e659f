"""Requests: which inputs are request-level, and batches of R requests with jagged candidate counts.

A ranking model sees *flat* rows: one row per candidate, with the user's features repeated on
every row of the same request. ``RequestSpec`` says which inputs (or which column ranges of an
input) are request-level, i.e. identical on every row of a request. ``RequestBatch`` holds the
flat model inputs plus ``offsets`` (R+1 entries): candidate rows of request r are
``offsets[r]:offsets[r+1]``. ``StructuredBatch`` is the request-centric form: request-level data
once per request, candidate-level data once per candidate, and ``request_index``.

Inputs are named by their path in the model's keyword arguments: ``dense``, ``feats.user_id``
(a dict entry), ``indices.3`` (a list element).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from codesign.config import Config, register_config
from codesign.errors import SpecError

__all__ = [
    "ColumnRange",
    "RequestBatch",
    "RequestSpec",
    "StructuredBatch",
    "bag_companion",
    "bag_offsets",
    "bag_segments",
    "compact_request_bags",
    "concat_batches",
    "even_counts",
    "flatten_inputs",
    "offsets_from_counts",
    "repeat_request_bags",
    "resample_batch",
    "split_candidates",
]

ColumnRange = tuple[int, int]


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_inputs(inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Leaves of the model's keyword inputs as (path, value), in torch.export's flattening order."""
    leaves, _ = pytree.tree_flatten_with_path(dict(inputs))
    return [(".".join(_key_name(k) for k in path), value) for path, value in leaves]


def _replace_leaves(inputs: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    leaves, spec = pytree.tree_flatten_with_path(dict(inputs))
    values = [new.get(".".join(_key_name(k) for k in path), v) for path, v in leaves]
    return pytree.tree_unflatten(values, spec)


def even_counts(candidates: int, requests: int) -> list[int]:
    """Per-request candidate counts that share ``candidates`` as evenly as possible over ``requests``."""
    base, extra = divmod(candidates, requests)
    return [base + (1 if i < extra else 0) for i in range(requests)]


def offsets_from_counts(counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Request offsets (R+1, int64) from per-request candidate counts."""
    counts_t = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts_t, 0)])


@register_config
@dataclasses.dataclass(frozen=True)
class RequestSpec(Config):
    """Which model inputs are request-level, and how each input's leading dimension behaves.

    - ``request_inputs``: inputs whose every row is the same within a request (user features).
    - ``request_columns``: for one concatenated feature tensor, the ``(start, stop)`` column ranges
      (dim 1) that are request-level.
    - ``jagged``: a flat values tensor (EmbeddingBag ``indices``) mapped to its per-candidate
      ``offsets`` input; its length is its own dynamic dimension, not the candidate count.
    - ``jagged_lengths``: the same for a values tensor described by per-candidate ``lengths``
      (bag sizes, TorchRec's convention) instead of offsets.
    - ``static_inputs``: inputs without a candidate dimension (passed as they are).
    - ``per_request_inputs``: the request-centric form a model may be written in: inputs with one
      row per *request* (``user_feats[R, 16]``), dimension 0 the request count; the model maps
      candidates to requests itself, from the input named by ``request_index_input`` (``[N]``: each
      candidate's request) or ``request_offsets_input`` (``[R+1]``: the batch's request offsets),
      which codesign fills from the batch's offsets wherever it builds a batch.

    Every other tensor input is candidate-level with the candidate count as dimension 0.

    >>> RequestSpec(request_inputs=("user_history",), request_columns={"x": ((0, 8),)})
    >>> RequestSpec(per_request_inputs=("user_feats",), request_index_input="request_index")
    """

    request_inputs: tuple[str, ...] = ()
    request_columns: Mapping[str, tuple[ColumnRange, ...]] = dataclasses.field(default_factory=dict)
    jagged: Mapping[str, str] = dataclasses.field(default_factory=dict)
    static_inputs: tuple[str, ...] = ()
    jagged_lengths: Mapping[str, str] = dataclasses.field(default_factory=dict)
    per_request_inputs: tuple[str, ...] = ()
    request_index_input: str | None = None
    request_offsets_input: str | None = None

    def __post_init__(self) -> None:
        # Normalize JSON lists and user-given lists to tuples so specs compare and hash by value.
        object.__setattr__(self, "request_inputs", _names("request_inputs", self.request_inputs))
        object.__setattr__(self, "static_inputs", _names("static_inputs", self.static_inputs))
        object.__setattr__(self, "per_request_inputs", _names("per_request_inputs", self.per_request_inputs))
        for field in ("request_index_input", "request_offsets_input"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str):
                raise SpecError(
                    f"RequestSpec {field} must be the name of one model input, got {value!r}",
                    fix=f"write e.g. {field}='request_index'",
                )
        if (
            self.per_request_inputs
            and self.request_index_input is None
            and self.request_offsets_input is None
        ):
            raise SpecError(
                f"per_request_inputs {list(self.per_request_inputs)} have one row per request, but the spec "
                "names no input that tells the model which request each candidate belongs to",
                fix="name the model's input that takes it: request_index_input='request_index' ([N]) or "
                "request_offsets_input='request_offsets' ([R+1])",
            )
        for field in ("request_columns", "jagged", "jagged_lengths"):
            if not isinstance(getattr(self, field), Mapping):
                raise SpecError(
                    f"RequestSpec {field} must be a dict, got {type(getattr(self, field)).__name__}",
                    fix="write e.g. request_columns={'x': ((0, 16),)} and jagged={'indices.0': 'offsets.0'}",
                )
        cols: dict[str, tuple[ColumnRange, ...]] = {}
        for name, ranges in dict(self.request_columns).items():
            if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Iterable):
                raise SpecError(
                    f"request_columns[{name!r}] = {ranges!r} is not a list of (start, stop) pairs",
                    fix="write e.g. request_columns={'x': ((0, 16),)}",
                )
            try:
                cols[name] = tuple(sorted((int(a), int(b)) for a, b in ranges))
            except (TypeError, ValueError) as exc:
                raise SpecError(
                    f"request_columns[{name!r}] = {ranges!r} is not a list of (start, stop) pairs",
                    fix="write e.g. request_columns={'x': ((0, 16),)}",
                ) from exc
        object.__setattr__(self, "request_columns", cols)
        for field in ("jagged", "jagged_lengths"):
            for values, companion in dict(getattr(self, field)).items():
                if not isinstance(values, str) or not isinstance(companion, str):
                    example = "offsets.0" if field == "jagged" else "lengths.0"
                    raise SpecError(
                        f"RequestSpec {field} maps input names to input names, got {values!r}: {companion!r}",
                        fix=f"write e.g. {field}={{'indices.0': '{example}'}} (values input -> its per-candidate input)",
                    )
            object.__setattr__(self, field, dict(getattr(self, field)))
        both_kinds = set(self.jagged) & set(self.jagged_lengths)
        if both_kinds:
            raise SpecError(
                f"inputs {sorted(both_kinds)} are listed in both jagged (offsets) and jagged_lengths",
                fix="describe each values input by its offsets or by its lengths, not both",
            )
        per_request = set(self.per_request_inputs)
        clash = per_request & (
            set(self.request_inputs) | set(cols) | set(self.static_inputs) | set(self.bags)
        )
        if clash:
            raise SpecError(
                f"inputs {sorted(clash)} are per-request ([R, ...]) and also listed as flat request-level, "
                "static or jagged",
                fix="a per-request input has one row per request; list it in per_request_inputs only",
            )
        both = set(self.request_inputs) & set(cols)
        if both:
            raise SpecError(
                f"inputs {sorted(both)} are listed both as whole request inputs and with request columns",
                fix="list an input in request_inputs (all columns) or in request_columns (some), not both",
            )

    def is_request_level(self, path: str) -> bool:
        """True when the whole input is request-level."""
        return path in self.request_inputs

    def candidate_dim_inputs(self, paths: Iterable[str]) -> list[str]:
        """Inputs whose dimension 0 is the candidate count (the request index input among them)."""
        other = set(self.bags) | set(self.static_inputs) | set(self.per_request_inputs)
        if self.request_offsets_input is not None:
            other.add(self.request_offsets_input)
        return [p for p in paths if p not in other]

    @functools.cached_property
    def request_map_inputs(self) -> dict[str, str]:
        """The model inputs codesign fills from the batch's offsets: {path: "index" | "offsets"}."""
        out = {}
        if self.request_index_input is not None:
            out[self.request_index_input] = "index"
        if self.request_offsets_input is not None:
            out[self.request_offsets_input] = "offsets"
        return out

    @functools.cached_property
    def not_sliced(self) -> frozenset[str]:
        """Inputs that batch surgery (resample, split, join) does not cut by rows: static inputs, jagged
        offsets (rebuilt with their values) and the request map inputs (rebuilt from the offsets)."""
        return (
            frozenset(self.static_inputs) | {c for c, _ in self.bags.values()} | set(self.request_map_inputs)
        )

    @functools.cached_property
    def bags(self) -> dict[str, tuple[str, str]]:
        """Every jagged values input -> (its per-candidate input, ``"offsets"`` or ``"lengths"``)."""
        out = {v: (o, "offsets") for v, o in self.jagged.items()}
        out.update({v: (n, "lengths") for v, n in self.jagged_lengths.items()})
        return out

    @functools.cached_property
    def request_bags(self) -> frozenset[str]:
        """Jagged values inputs that are request-level: one id bag per request (a user's history)."""
        return frozenset(p for p in self.bags if p in self.request_inputs)

    @property
    def form(self) -> str:
        """``per_request`` when some inputs have one row per request, else ``flat`` (user rows repeated)."""
        return "per_request" if self.per_request_inputs else "flat"

    def named_inputs(self) -> set[str]:
        return (
            set(self.request_inputs)
            | set(self.request_columns)
            | set(self.jagged)
            | set(self.jagged.values())
            | set(self.jagged_lengths)
            | set(self.jagged_lengths.values())
            | set(self.static_inputs)
            | set(self.per_request_inputs)
            | set(self.request_map_inputs)
        )

    def validate(self, leaves: Mapping[str, Any]) -> None:
        """Check the spec against the model's input leaves (names, ranks, column ranges)."""
        known = sorted(leaves)
        for name in sorted(self.named_inputs()):
            if name not in leaves:
                raise SpecError(
                    f"RequestSpec names input {name!r}, but the model's inputs are {known}",
                    fix="use the input paths shown (dict keys and list indices joined by '.')",
                )
            if not isinstance(leaves[name], torch.Tensor):
                raise SpecError(f"input {name!r} is {type(leaves[name]).__name__}, not a tensor")
        for name, ranges in self.request_columns.items():
            t = leaves[name]
            if t.dim() < 2:
                raise SpecError(
                    f"request_columns[{name!r}]: input has shape {tuple(t.shape)}, no column dimension",
                    fix="column ranges apply to dim 1 of a 2-D (or higher) input; use request_inputs instead",
                )
            width = t.shape[1]
            prev_stop = -1
            for start, stop in ranges:
                if not 0 <= start < stop <= width:
                    raise SpecError(
                        f"request_columns[{name!r}] range ({start}, {stop}) is outside the input's "
                        f"{width} columns",
                        fix=f"use 0 <= start < stop <= {width}",
                    )
                if start < prev_stop:
                    raise SpecError(f"request_columns[{name!r}] ranges overlap at column {start}")
                prev_stop = stop
        for values, (companion, _) in self.bags.items():
            for p in (values, companion):
                if leaves[p].dim() != 1 or leaves[p].dtype not in (torch.int32, torch.int64):
                    raise SpecError(
                        f"jagged input {p!r} must be a 1-D integer tensor, got {leaves[p].dtype} "
                        f"{tuple(leaves[p].shape)}"
                    )
        for name in self.static_inputs:
            if name in self.request_inputs or name in self.request_columns:
                raise SpecError(f"input {name!r} is static (no candidate dim) and cannot be request-level")


# up to this many requests the repeats check runs torch.equal per request, beyond it one vectorised pass
_EQUAL_PER_REQUEST = 8


@dataclasses.dataclass
class RequestBatch:
    """R requests with jagged candidate counts, as the model's flat keyword inputs plus offsets."""

    inputs: dict[str, Any]
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Mapping) or not all(isinstance(k, str) for k in self.inputs):
            raise SpecError(
                f"RequestBatch inputs must be a dict of the model's keyword inputs, got {type(self.inputs).__name__}",
                fix="RequestBatch(inputs={'dense': x, 'ids': ids}, offsets=offsets_from_counts([...]))",
            )
        self.inputs = dict(self.inputs)
        self.offsets = _offsets(self.offsets)

    @property
    def num_requests(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_candidates(self) -> int:
        return int(self.offsets[-1])

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def request_index(self) -> torch.Tensor:
        """request_index[N]: the request each candidate row belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.num_requests, device=self.offsets.device), self.counts
        )

    def leaves(self) -> dict[str, Any]:
        return dict(flatten_inputs(self.inputs))

    def request_map(self, kind: str) -> torch.Tensor:
        """What a per-request model's map input holds: ``index`` (request of each candidate) or ``offsets``."""
        return self.request_index if kind == "index" else self.offsets

    def with_request_map(
        self, spec: RequestSpec, dtypes: Mapping[str, torch.dtype] | None = None
    ) -> RequestBatch:
        """This batch with the spec's request index / offsets inputs set from its offsets.

        ``dtypes`` keeps each map input's dtype (the capture example's); int64 otherwise.
        """
        maps = spec.request_map_inputs
        if not maps:
            return self
        leaves = self.leaves()
        new: dict[str, Any] = {}
        for path, kind in maps.items():
            dtype = (dtypes or {}).get(path)
            if dtype is None and isinstance(leaves.get(path), torch.Tensor):
                dtype = leaves[path].dtype
            new[path] = self.request_map(kind).to(dtype or torch.int64)
        return RequestBatch(_replace_leaves(self.inputs, new), self.offsets)

    def to(self, device: torch.device | str) -> RequestBatch:
        """The same batch with every tensor (offsets included) on ``device``."""

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return RequestBatch(pytree.tree_map(move, self.inputs), self.offsets.to(device))

    def validate(self, spec: RequestSpec) -> None:
        """Check the spec against the inputs, then the batch as every scoring call is checked
        (``ir.schema.InputSchema``, derived from this batch: rows per candidate and per request, jagged
        offsets and lengths, the request map, request-level data repeated within each request)."""
        from codesign.errors import RequestError
        from codesign.ir.schema import InputSchema  # the schema is built on batches: imported when used

        spec.validate(self.leaves())
        try:
            InputSchema.from_reference(spec, self).check(self)
        except RequestError as exc:
            raise SpecError(exc.message, fix=exc.fix) from None

    def _check_repeats(self, spec: RequestSpec, leaves: Mapping[str, Any]) -> None:
        if not spec.request_inputs and not spec.request_columns:
            return
        first_row = self.offsets[:-1].repeat_interleave(self.counts)
        pieces: list[tuple[str, torch.Tensor]] = [
            (f"'{p}'", leaves[p]) for p in spec.request_inputs if p not in spec.bags
        ]
        for name, ranges in spec.request_columns.items():
            pieces += [(f"'{name}'[:, {a}:{b}]", leaves[name][:, a:b]) for a, b in ranges]
        # each row against the row before it, except where a request starts: the same answer as against
        # the request's first row (the first row that differs from its predecessor is the first that
        # differs from the request's first row), without gathering a copy of every input
        continues: torch.Tensor | None = None  # rows that are not a request's first, built when needed
        bounds = self.offsets.tolist()
        spans = [(a, b) for a, b in itertools.pairwise(bounds) if b - a > 1]
        for label, t in pieces:
            if t.shape[0] < 2:
                continue
            # few requests: one torch.equal per request (no bool temporaries; 2.4x faster on 4096 x 64 ids)
            if len(spans) <= _EQUAL_PER_REQUEST and all(
                torch.equal(t[a + 1 : b], t[a : b - 1]) for a, b in spans
            ):
                continue
            if continues is None:
                continues = first_row[1:] != torch.arange(1, first_row.numel(), device=first_row.device)
            changed = (t[1:] != t[:-1]).reshape(t.shape[0] - 1, -1).any(1) & continues
            if changed.any():
                row = int(changed.nonzero()[0]) + 1
                req = int(torch.searchsorted(self.offsets, torch.tensor(row), right=True)) - 1
                raise SpecError(
                    f"input {label} is declared request-level but candidate row {row} differs from "
                    f"the first row of its request {req}",
                    fix="repeat user features on every candidate row, or declare the input candidate-level",
                )
        for values in spec.request_inputs:
            if values in spec.bags:
                bad_row = _first_differing_bag(leaves[values], bag_offsets(spec, leaves, values), first_row)
                if bad_row is not None:
                    req = int(torch.searchsorted(self.offsets, torch.tensor(bad_row), right=True)) - 1
                    raise SpecError(
                        f"jagged input {values!r} is declared request-level but its bags differ within "
                        f"request {req} (candidate row {bad_row})",
                        fix="repeat the user's bag on every candidate row, or declare the input candidate-level",
                    )

    def to_structured(self, spec: RequestSpec) -> StructuredBatch:
        """Request-level data once per request; candidate-level data once per candidate."""
        leaves = self.leaves()
        first = self.offsets[:-1]
        request: dict[str, torch.Tensor] = {}
        candidate: dict[str, Any] = {}
        for path, t in leaves.items():
            if any(spec.bags[v][0] == path for v in spec.request_inputs if v in spec.bags):
                continue  # offsets / lengths of a request-level bag are rebuilt from the request's bags
            if path in spec.request_inputs and path in spec.bags:
                segs = bag_segments(spec, leaves, path)
                chosen = [segs[int(i)] for i in first]
                request[path] = torch.cat(chosen) if chosen else t[:0]
                request[f"{path}#lengths"] = torch.tensor([s.numel() for s in chosen], dtype=torch.int64)
            elif path in spec.request_inputs:
                request[path] = t[first]
            elif path in spec.per_request_inputs:
                request[path] = t  # already one row per request
            elif path in spec.request_map_inputs:
                continue  # rebuilt from the offsets
            elif path in spec.request_columns:
                keep = _complement(spec.request_columns[path], t.shape[1])
                for a, b in spec.request_columns[path]:
                    request[f"{path}[{a}:{b}]"] = t[first, a:b]
                candidate[path] = t[:, keep]
            else:
                candidate[path] = t
        return StructuredBatch(request=request, candidate=candidate, offsets=self.offsets.clone())


def _offsets(value: Any) -> torch.Tensor:
    """Request offsets as a 1-D int64 tensor (lists accepted), starting at 0, every request >= 1 candidate."""
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise SpecError(
                f"RequestBatch offsets {value!r:.80} are not a list of integers ({exc})",
                fix="build them with codesign.offsets_from_counts([candidates per request])",
            ) from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise SpecError(
            f"RequestBatch offsets must be integers, got {t.dtype}",
            fix="build them with codesign.offsets_from_counts([candidates per request])",
        )
    if t.dim() != 1 or t.numel() < 2:
        raise SpecError(
            f"RequestBatch offsets must be 1-D with R+1 >= 2 entries (R requests), got shape {list(t.shape)}",
            fix="e.g. offsets_from_counts([4, 6]) == [0, 4, 10] for two requests of 4 and 6 candidates",
        )
    t = t.to(torch.int64)
    counts = t[1:] - t[:-1]
    if int(t[0]) != 0 or bool((counts < 1).any()):
        raise SpecError(
            f"RequestBatch offsets must start at 0 and give every request >= 1 candidate, got {t.tolist()[:12]}",
            fix="offsets[r]:offsets[r+1] are request r's candidate rows; build them with offsets_from_counts",
        )
    return t


def _names(field: str, value: Any) -> tuple[str, ...]:
    """A tuple of input names; a lone string is refused (it would iterate as characters)."""
    if isinstance(value, str):
        raise SpecError(
            f"RequestSpec {field}={value!r} is a string; it takes a tuple of input names",
            fix=f"write {field}=({value!r},)",
        )
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise SpecError(f"RequestSpec {field} must be a tuple of input names, got {type(value).__name__}")
    names = tuple(value)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise SpecError(
            f"RequestSpec {field} holds {bad!r}, which are not input names",
            fix="name inputs by their path in the model's keyword arguments, e.g. 'user' or 'indices.0'",
        )
    return names


def _first_differing_bag(values: torch.Tensor, starts: torch.Tensor, first_row: torch.Tensor) -> int | None:
    """The first candidate row whose bag differs from the bag of its request's first row (vectorised:
    a loop over candidates cost tens of ms per call at 1024 candidates)."""
    n = starts.numel()
    if n == 0:
        return None
    starts = starts.to(torch.int64)
    ends = torch.cat([starts[1:], torch.tensor([values.numel()], dtype=torch.int64, device=starts.device)])
    lengths = ends - starts
    bad = lengths != lengths[first_row]
    if not bool(bad.any()) and values.numel():
        row_of = torch.repeat_interleave(torch.arange(n, device=starts.device), lengths)
        at = torch.arange(values.numel(), device=starts.device) - starts[row_of]
        differs = values[starts[first_row[row_of]] + at] != values
        bad = torch.zeros(n, dtype=torch.bool, device=starts.device).index_put_(
            (row_of,), differs, accumulate=True
        )
    hits = bad.nonzero()
    return int(hits[0]) if hits.numel() else None


def bag_offsets(spec: RequestSpec, leaves: Mapping[str, Any], values: str) -> torch.Tensor:
    """Per-candidate start offsets of a jagged values input, whichever way the spec describes it."""
    companion, kind = spec.bags[values]
    c = leaves[companion]
    return c if kind == "offsets" else torch.cumsum(c, 0) - c


def bag_segments(spec: RequestSpec, leaves: Mapping[str, Any], values: str) -> list[torch.Tensor]:
    """The bag of each candidate row of a jagged values input."""
    return _segments(leaves[values], bag_offsets(spec, leaves, values))


def bag_companion(bags: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """The per-candidate input of ``bags`` laid end to end: start offsets, or lengths."""
    sizes = [b.numel() for b in bags]
    return offsets_from_counts(sizes)[:-1] if kind == "offsets" else torch.tensor(sizes, dtype=torch.int64)


def _segments(values: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    ends = torch.cat([offsets[1:], torch.tensor([values.numel()], dtype=offsets.dtype)])
    return [values[int(a) : int(b)] for a, b in zip(offsets, ends, strict=True)]


def _complement(ranges: Sequence[ColumnRange], width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    for a, b in ranges:
        mask[a:b] = False
    return mask.nonzero().flatten()


@dataclasses.dataclass
class StructuredBatch:
    """Request-centric form of a batch: ``request`` tensors have R rows, ``candidate`` tensors N rows."""

    request: dict[str, torch.Tensor]
    candidate: dict[str, Any]
    offsets: torch.Tensor

    @property
    def request_index(self) -> torch.Tensor:
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def to_flat(self, spec: RequestSpec, template: RequestBatch, compact: Iterable[str] = ()) -> RequestBatch:
        """Rebuild the flat model inputs (user features repeated per candidate).

        ``template`` supplies the nesting of the model's inputs (any batch of the same model);
        request-level bags named in ``compact`` go on each request's first row only
        (``compact_request_bags``), for a variant that reads them there.
        """
        idx = self.request_index
        counts = self.offsets[1:] - self.offsets[:-1]
        compact = frozenset(compact)
        new: dict[str, Any] = {}
        for path, _t in template.leaves().items():
            if path in spec.request_inputs and path in spec.bags:
                lengths = self.request[f"{path}#lengths"]
                segs = _segments(self.request[path], offsets_from_counts(lengths)[:-1])
                bags = [segs[int(r)] for r in idx]
                if path in compact:  # empty bags after each request's first row
                    first = torch.zeros(idx.numel(), dtype=torch.bool)
                    first[self.offsets[:-1][counts > 0]] = True
                    bags = [b if f else b[:0] for b, f in zip(bags, first.tolist(), strict=True)]
                new[path] = torch.cat(bags) if bags else self.request[path][:0]
                companion, kind = spec.bags[path]
                new[companion] = bag_companion(bags, kind)
            elif path in spec.request_inputs:
                new[path] = self.request[path].repeat_interleave(counts, dim=0)
            elif path in spec.per_request_inputs:
                new[path] = self.request[path]
            elif path in spec.request_columns:
                cand = self.candidate[path]
                width = cand.shape[1] + sum(b - a for a, b in spec.request_columns[path])
                out = cand.new_empty((cand.shape[0], width, *cand.shape[2:]))
                out[:, _complement(spec.request_columns[path], width)] = cand
                for a, b in spec.request_columns[path]:
                    out[:, a:b] = self.request[f"{path}[{a}:{b}]"].repeat_interleave(counts, dim=0)
                new[path] = out
            elif path in self.candidate:
                new[path] = self.candidate[path]
        flat = RequestBatch(inputs=_replace_leaves(template.inputs, new), offsets=self.offsets.clone())
        return flat.with_request_map(spec, _dtypes(template))


def resample_batch(
    batch: RequestBatch,
    spec: RequestSpec,
    candidates: Sequence[int],
    *,
    seed: int,
    noise: float = 0.05,
) -> RequestBatch:
    """A fresh batch built from ``batch``'s requests: random source requests, random candidate rows.

    Float features get Gaussian noise (per request for request-level data, per row otherwise) so that
    each call sees new values while ids stay valid. Used to verify numerics on unseen requests when
    the model comes without a request generator.
    """
    if any(c < 1 for c in candidates):
        raise SpecError(f"every request needs >= 1 candidate, got {list(candidates)}")
    g = torch.Generator().manual_seed(seed)
    counts = torch.as_tensor(list(candidates), dtype=torch.int64)
    r_new = counts.numel()
    src_req = torch.randint(0, batch.num_requests, (r_new,), generator=g)
    src_counts = batch.counts[src_req]
    req_of_row = torch.repeat_interleave(torch.arange(r_new), counts)
    pick = (torch.rand(int(counts.sum()), generator=g) * src_counts[req_of_row]).long()
    rows = batch.offsets[src_req][req_of_row] + pick  # source row of each new candidate row

    leaves = batch.leaves()
    new: dict[str, Any] = {}
    req_noise_rows = req_of_row  # noise shared by the rows of one new request
    for path, t in leaves.items():
        if not isinstance(t, torch.Tensor) or path in spec.not_sliced:
            continue
        if path in spec.per_request_inputs:  # one row per request: the source request's row
            out = t[src_req]
            if out.is_floating_point() and noise > 0:
                eps = torch.randn(out.shape, generator=g, dtype=out.dtype) * noise
                id_like = (t == t.round()).reshape(t.shape[0], -1).all(0).reshape(t.shape[1:])
                out = out + torch.where(id_like, 0.0, eps * out.abs().mean().clamp_min(1e-3))
            new[path] = out
            continue
        if path in spec.bags:
            companion, kind = spec.bags[path]
            segs = bag_segments(spec, leaves, path)
            # request-level bags stay identical within a request: take the source request's first row
            bag_rows = batch.offsets[src_req][req_of_row] if path in spec.request_inputs else rows
            bags = [segs[int(r)] for r in bag_rows]
            new[path] = torch.cat(bags) if bags else t[:0]
            new[companion] = bag_companion(bags, kind).to(leaves[companion].dtype)
            continue
        out = t[batch.offsets[src_req][req_of_row]] if path in spec.request_inputs else t[rows]
        if out.is_floating_point() and noise > 0:
            eps = torch.randn(out.shape, generator=g, dtype=out.dtype) * noise
            if path in spec.request_inputs:
                eps = (
                    torch.randn((r_new, *out.shape[1:]), generator=g, dtype=out.dtype)[req_noise_rows] * noise
                )
            elif path in spec.request_columns:
                shared = (
                    torch.randn((r_new, *out.shape[1:]), generator=g, dtype=out.dtype)[req_noise_rows] * noise
                )
                for a, b in spec.request_columns[path]:
                    eps[:, a:b] = shared[:, a:b]
            # columns holding integral values are ids stored as floats: leave them valid
            id_like = (t == t.round()).reshape(t.shape[0], -1).all(0).reshape(t.shape[1:])
            out = out + torch.where(id_like, 0.0, eps * out.abs().mean().clamp_min(1e-3))
        new[path] = out
    resampled = RequestBatch(inputs=_replace_leaves(batch.inputs, new), offsets=offsets_from_counts(counts))
    return resampled.with_request_map(spec, _dtypes(batch))


def _dtypes(batch: RequestBatch) -> dict[str, torch.dtype]:
    return {p: t.dtype for p, t in batch.leaves().items() if isinstance(t, torch.Tensor)}


def split_candidates(
    batch: RequestBatch, spec: RequestSpec, micro_batch: int, compact: Iterable[str] = ()
) -> list[RequestBatch]:
    """Cut a batch into consecutive pieces of at most ``micro_batch`` candidate rows.

    A serving knob: scoring a large request in pieces bounds activation memory at the price of
    more calls (and, for request-sharing variants, of recomputing the user work per piece). A
    request cut in two appears in both pieces with its share of rows; jagged inputs are cut at
    their per-candidate offsets and static inputs go whole to every piece. ``compact`` names
    request-level bags that may be laid out once per request (``compact_request_bags``): a piece
    that starts inside a request gets that request's bag on its first row.
    """
    if micro_batch < 1:
        raise SpecError(f"micro_batch must be >= 1 candidate rows, got {micro_batch}")
    n = batch.num_candidates
    if n <= micro_batch:
        return [batch]
    leaves = batch.leaves()
    compact = frozenset(compact) & spec.request_bags
    request_of = batch.request_index if spec.per_request_inputs or compact else None
    starts = set(batch.offsets[:-1].tolist()) if compact else set()
    pieces = []
    for start in range(0, n, micro_batch):
        stop = min(n, start + micro_batch)
        if request_of is not None:
            first_req, last_req = int(request_of[start]), int(request_of[stop - 1])
        new: dict[str, Any] = {}
        for path, t in leaves.items():
            if not isinstance(t, torch.Tensor) or path in spec.not_sliced:
                continue
            if path in spec.per_request_inputs:  # the rows of the requests this piece touches
                new[path] = t[first_req : last_req + 1]
                continue
            if path in spec.bags:
                companion, kind = spec.bags[path]
                off = bag_offsets(spec, leaves, path)
                lo = int(off[start])
                hi = int(off[stop]) if stop < n else t.numel()
                if path in compact and start not in starts:
                    assert request_of is not None
                    first = int(batch.offsets[int(request_of[start])])
                    new[path], new[companion] = _with_first_bag(t, off, first, start, stop, hi, kind)
                    new[companion] = new[companion].to(leaves[companion].dtype)
                    continue
                new[path] = t[lo:hi]
                new[companion] = off[start:stop] - lo if kind == "offsets" else leaves[companion][start:stop]
            else:
                new[path] = t[start:stop]
        counts = (batch.offsets.clamp(start, stop)[1:] - batch.offsets.clamp(start, stop)[:-1]).clamp_min(0)
        piece = RequestBatch(
            inputs=_replace_leaves(batch.inputs, new), offsets=offsets_from_counts(counts[counts > 0])
        )
        pieces.append(piece.with_request_map(spec))
    return pieces


def _with_first_bag(
    values: torch.Tensor, off: torch.Tensor, first: int, start: int, stop: int, hi: int, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` of a jagged input with row ``start``'s bag replaced by row ``first``'s."""

    def end_of(row: int) -> int:
        return int(off[row + 1]) if row + 1 < off.numel() else values.numel()

    bag = values[int(off[first]) : end_of(first)]
    rest = values[end_of(start) : hi]
    lengths = torch.cat([off[start + 1 : stop], torch.tensor([hi], dtype=off.dtype)]) - off[start:stop]
    lengths[0] = bag.numel()
    companion = offsets_from_counts(lengths)[:-1] if kind == "offsets" else lengths
    return torch.cat([bag, rest]), companion


def _lay_out_request_bags(
    batch: RequestBatch, spec: RequestSpec, paths: Iterable[str], every_row: bool
) -> RequestBatch:
    """Each request's first-row bag of ``paths`` on every row of the request, or on its first row only."""
    paths = [p for p in paths if p in spec.request_bags]
    if not paths:
        return batch
    leaves = batch.leaves()
    nonempty = batch.counts > 0
    firsts, counts = batch.offsets[:-1][nonempty], batch.counts[nonempty]
    new: dict[str, Any] = {}
    for path in paths:
        values, (companion, kind) = leaves[path], spec.bags[path]
        off = bag_offsets(spec, leaves, path)
        ends = torch.cat([off[1:], torch.tensor([values.numel()], dtype=off.dtype)])
        start, length = off[firsts], (ends - off)[firsts]  # each request's first bag
        if every_row:
            start, length = start.repeat_interleave(counts), length.repeat_interleave(counts)
            row_lengths = length
        else:
            row_lengths = torch.zeros(batch.num_candidates, dtype=length.dtype)
            row_lengths[firsts] = length
        # positions of the kept ids: each bag's start, then consecutive
        shift = start - (torch.cumsum(length, 0) - length)
        picks = torch.arange(int(length.sum()), dtype=off.dtype) + shift.repeat_interleave(length)
        new[path] = values[picks]
        new[companion] = (offsets_from_counts(row_lengths)[:-1] if kind == "offsets" else row_lengths).to(
            leaves[companion].dtype
        )
    return dataclasses.replace(batch, inputs=_replace_leaves(batch.inputs, new))


def compact_request_bags(batch: RequestBatch, spec: RequestSpec, paths: Iterable[str]) -> RequestBatch:
    """The batch with each request-level bag of ``paths`` kept on its request's first row only (the
    other rows get empty bags): what a variant that reads those bags only at request-first rows
    needs (``Variant.first_row_bags``), without a copy of the user's bag per candidate. Any other
    variant reads the empty bags and scores wrong: lay bags out this way only for such a variant."""
    return _lay_out_request_bags(batch, spec, paths, every_row=False)


def repeat_request_bags(batch: RequestBatch, spec: RequestSpec, paths: Iterable[str]) -> RequestBatch:
    """The flat layout back: each request's first-row bag of ``paths`` repeated on every row of the
    request, as a model that reads every row takes it."""
    return _lay_out_request_bags(batch, spec, paths, every_row=True)


def concat_batches(batches: Sequence[RequestBatch], spec: RequestSpec) -> RequestBatch:
    """Join request batches of one model into one multi-request batch (the inverse of a split by request).

    Candidate-dim inputs are concatenated along dim 0; jagged values are concatenated and their
    per-candidate offsets shifted; static inputs come from the first batch. Request offsets are
    joined so that each source request stays one request: what dynamic batching needs for
    request-centric variants to compute user work once per request.
    """
    if not batches:
        raise SpecError("concat_batches needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    leaves = [b.leaves() for b in batches]
    new: dict[str, Any] = {}
    for path, first in leaves[0].items():
        if not isinstance(first, torch.Tensor) or path in spec.not_sliced:
            continue
        if path in spec.bags:
            companion, kind = spec.bags[path]
            shifted, start = [], 0
            for lv in leaves:
                shifted.append(lv[companion] + start if kind == "offsets" else lv[companion])
                start += int(lv[path].numel())
            new[companion] = torch.cat(shifted)
        new[path] = torch.cat([lv[path] for lv in leaves])
    counts = torch.cat([b.counts for b in batches])
    joined = RequestBatch(inputs=_replace_leaves(batches[0].inputs, new), offsets=offsets_from_counts(counts))
    return joined.with_request_map(spec)
