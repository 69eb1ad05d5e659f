"""The JSON form of one scoring request, checked and turned into the model's flat inputs.

A request on the wire is one user context and its candidates::

    {"user":       {"history": [12, 7, 981, ...], "user_dense": [0.1, ...]},
     "candidates": {"cand_item": [5, 17, 3], "cand_dense": [[0.2, ...], [0.4, ...], [0.1, ...]]},
     "context":    {"budget_ms": 50, "tier": "premium"}}

``user`` holds each request-level input once (a row without the candidate dimension; an id bag
as a list; the request-level columns of a split input as ``"x[0:8]"``), ``candidates`` one entry
per candidate for every candidate-level input (an id bag per candidate for jagged inputs; the
remaining columns of a split input under its own name). ``RequestSchema`` is derived from a
bundle's RequestSpec and reference inputs, so every model gets a specific wire format without
writing one; ``parse`` rejects anything that does not match it with a message that names the
field, the candidate and the fix, before any tensor reaches the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from codesign.errors import RequestError, RequestTooLargeError
from codesign.ir.request import RequestBatch, RequestSpec, _replace_leaves, bag_segments, offsets_from_counts
from codesign.ir.schema import InputSchema

__all__ = ["CONTEXT_KEYS", "MAX_CANDIDATES", "RequestSchema", "WireField", "scores_per_candidate"]

MAX_CANDIDATES = 100_000  # per request; larger requests are refused (they would stall a batch)
# Elements the server builds from user inputs for one request: a user row, or a user bag that some
# variant reads on every row, goes to the model once per candidate row, so 10k ids x 10k candidates
# would be 800 MB. Checked before any allocation. Bags every variant reads once per request
# (``RequestSchema.bags_sent_once``) count once.
MAX_USER_ELEMENTS = 1 << 25
CONTEXT_KEYS = ("budget_ms", "tier", "value", "history_length", "variant", "request_id")


@dataclasses.dataclass(frozen=True)
class WireField:
    """One JSON field of a request: where it sits, what it feeds, and what it must look like."""

    section: str  # "user" or "candidates"
    key: str  # JSON key inside the section
    path: str  # model input path it fills
    dtype: torch.dtype
    row_shape: tuple[int, ...]  # one user row / one candidate row (jagged: a bag of any length)
    jagged: bool = False
    columns: tuple[int, ...] = ()  # columns of ``path`` this field fills (split inputs only)
    per_request: bool = False  # the model takes this user input with one row per request (not repeated)

    @property
    def integral(self) -> bool:
        return not (self.dtype.is_floating_point or self.dtype.is_complex)

    def describe(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "key": self.key,
            "input": self.path,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": "bag of ids (any length)" if self.jagged else list(self.row_shape),
        }


@dataclasses.dataclass(frozen=True)
class RequestSchema:
    """The wire format of one model: its fields, the id bounds checked, and the static inputs."""

    spec: RequestSpec
    template: RequestBatch
    fields: tuple[WireField, ...]
    inputs: InputSchema  # the batch checks the Python API makes too: one implementation
    max_candidates: int = MAX_CANDIDATES
    max_user_elements: int = MAX_USER_ELEMENTS
    # user bags that every variant served reads at request-first rows only (Variant.first_row_bags):
    # they reach the model once per request, so the size check counts them once
    bags_sent_once: frozenset[str] = frozenset()
    # rows per slice of a request scored in pieces: a bag sent once still goes once to each slice
    slice_rows: int = MAX_CANDIDATES

    @property
    def id_bounds(self) -> Mapping[str, Mapping[str, int]]:
        return self.inputs.id_bounds

    @classmethod
    def from_reference(
        cls,
        spec: RequestSpec,
        template: RequestBatch,
        id_bounds: Mapping[str, Mapping[str, int]] | None = None,
        max_candidates: int = MAX_CANDIDATES,
    ) -> RequestSchema:
        """Derive the wire format from a RequestSpec and any batch of the model (a bundle's reference)."""
        leaves = template.leaves()
        offsets_of = {c for c, _ in spec.bags.values()}  # offsets or lengths: built from the bags
        fields: list[WireField] = []
        for path, t in leaves.items():
            if (
                not isinstance(t, torch.Tensor)
                or path in spec.static_inputs
                or path in offsets_of
                or path in spec.request_map_inputs  # filled from the request's candidate count
            ):
                continue
            jagged = path in spec.bags
            if path in spec.per_request_inputs:
                fields.append(WireField("user", path, path, t.dtype, tuple(t.shape[1:]), per_request=True))
                continue
            row = () if jagged else tuple(t.shape[1:])
            if path in spec.request_inputs:
                fields.append(WireField("user", path, path, t.dtype, row, jagged))
            elif path in spec.request_columns:
                width = t.shape[1]
                taken: set[int] = set()
                for a, b in spec.request_columns[path]:
                    cols = tuple(range(a, b))
                    taken.update(cols)
                    fields.append(
                        WireField("user", f"{path}[{a}:{b}]", path, t.dtype, (b - a, *row[1:]), False, cols)
                    )
                rest = tuple(c for c in range(width) if c not in taken)
                if rest:
                    fields.append(
                        WireField("candidates", path, path, t.dtype, (len(rest), *row[1:]), False, rest)
                    )
            else:
                fields.append(WireField("candidates", path, path, t.dtype, row, jagged))
        if not any(f.section == "candidates" for f in fields):
            raise RequestError(
                "the model has no candidate-level input, so a request cannot say how many candidates it has",
                fix="declare at least one input candidate-level in the RequestSpec",
            )
        inputs = InputSchema.from_reference(spec, template, id_bounds)
        return cls(spec, template, tuple(fields), inputs, max_candidates)

    def describe(self) -> dict[str, Any]:
        """The wire format as JSON (served at ``GET /v1/schema``)."""
        return {
            "user": [f.describe() for f in self.fields if f.section == "user"],
            "candidates": [f.describe() for f in self.fields if f.section == "candidates"],
            "context": list(CONTEXT_KEYS),
            "max_candidates": self.max_candidates,
            "max_user_elements": self.max_user_elements,
        }

    # ---- JSON -> batch -------------------------------------------------------------------
    def parse(self, body: Any, *, compact_bags: bool = False) -> tuple[RequestBatch, dict[str, Any]]:
        """Check one JSON request and build its flat batch (one request) and its context.

        User id bags go on every candidate row, as the model takes them; with ``compact_bags`` on the
        first row only (empty bags on the others: ``compact_request_bags``), for a server that lays
        them out per variant and never repeats a bag for a variant that reads it once per request.
        Raises ``RequestError`` naming the field (and candidate) at fault.
        """
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        unknown = set(body) - {"user", "candidates", "context"}
        if unknown:
            raise RequestError(
                f"unknown top-level keys {sorted(unknown)}",
                fix="a request has 'user', 'candidates' and 'context'",
            )
        user, cands, context = body.get("user", {}), body.get("candidates"), body.get("context", {})
        for name, value in (("user", user), ("candidates", cands), ("context", context)):
            if not isinstance(value, dict):
                raise RequestError(
                    f"'{name}' must be a JSON object, got {type(value).__name__}",
                    fix=f"send e.g. {self.example_keys(name)}",
                )
        assert isinstance(cands, dict) and isinstance(user, dict) and isinstance(context, dict)
        for section, given in (("user", user), ("candidates", cands)):
            want = {f.key for f in self.fields if f.section == section}
            missing, extra = want - given.keys(), given.keys() - want
            if missing:
                raise RequestError(
                    f"'{section}' lacks {sorted(missing)}", fix=f"'{section}' takes {sorted(want)}"
                )
            if extra:
                raise RequestError(
                    f"'{section}' has unknown fields {sorted(extra)}", fix=f"'{section}' takes {sorted(want)}"
                )
        bad_ctx = set(context) - set(CONTEXT_KEYS)
        if bad_ctx:
            raise RequestError(
                f"'context' has unknown keys {sorted(bad_ctx)}", fix=f"context keys: {list(CONTEXT_KEYS)}"
            )
        n = self._candidate_count(cands)
        self._check_user_size(user, n, compact_bags)
        leaves = self.template.leaves()
        new: dict[str, Any] = {}
        split: dict[str, torch.Tensor] = {}
        for f in self.fields:
            value = (user if f.section == "user" else cands)[f.key]
            if f.jagged:
                bags = [value] if f.section == "user" else value
                flat, lengths = _bags(f, bags)
                if f.section == "user" and compact_bags:  # the bag on row 0, empty bags after it
                    lengths = torch.cat([lengths, lengths.new_zeros(n - 1)])
                elif f.section == "user":
                    flat, lengths = flat.repeat(n), lengths.repeat(n)
                new[f.path] = flat
                companion, kind = self.spec.bags[f.path]
                per_row = offsets_from_counts(lengths)[:-1] if kind == "offsets" else lengths
                new[companion] = per_row.to(leaves[companion].dtype)
                continue
            t = _tensor(f, value, n if f.section == "candidates" else None)
            if f.per_request:
                t = t.unsqueeze(0)  # one request: one row
            elif f.section == "user":
                t = t.unsqueeze(0).expand(n, *t.shape).contiguous()
            if f.columns:
                out = split.get(f.path)
                if out is None:
                    ref = leaves[f.path]
                    out = split[f.path] = torch.empty((n, *ref.shape[1:]), dtype=ref.dtype)
                out[:, list(f.columns)] = t
            else:
                new[f.path] = t
        new.update(split)
        batch = RequestBatch(_replace_leaves(self.template.inputs, new), offsets_from_counts([n]))
        batch = batch.with_request_map(self.spec, {p: leaves[p].dtype for p in self.spec.request_map_inputs})
        self.inputs.check(batch, repeats=False, where=self._where)  # user rows were laid out above
        return batch, dict(context)

    def example_keys(self, section: str) -> dict[str, str]:
        if section == "context":
            return {"budget_ms": "50"}
        return {f.key: "..." for f in self.fields if f.section == section}

    def _candidate_count(self, cands: Mapping[str, Any]) -> int:
        counts = {}
        for f in self.fields:
            if f.section != "candidates":
                continue
            value = cands[f.key]
            if isinstance(value, np.ndarray) and value.ndim >= 1:  # from the v2 protocol's tensors
                counts[f.key] = value.shape[0]
                continue
            if not isinstance(value, list):
                raise RequestError(
                    f"candidates['{f.key}'] must be a list with one entry per candidate, got {type(value).__name__}"
                )
            counts[f.key] = len(value)
        sizes = set(counts.values())
        if len(sizes) > 1:
            raise RequestError(
                f"candidate fields disagree on the number of candidates: {counts}",
                fix="give every candidate field one entry per candidate",
            )
        n = sizes.pop()
        if n < 1:
            raise RequestError("the request has no candidates", fix="send at least one candidate")
        if n > self.max_candidates:
            raise RequestTooLargeError(
                f"the request has {n} candidates; this server takes at most {self.max_candidates} per request",
                fix="split the candidates over several requests",
            )
        return n

    def _check_user_size(self, user: Mapping[str, Any], n: int, compact_bags: bool) -> None:
        """Refuse a request whose user inputs, repeated for each of its ``n`` candidate rows, would be
        over ``max_user_elements``: before anything is allocated. A bag sent once counts once."""
        total, largest = 0, ("", 0)
        for f in self.fields:
            if f.section != "user" or f.per_request:
                continue
            value = user[f.key]
            size = len(value) if f.jagged and isinstance(value, list) else math.prod(f.row_shape)
            once = f.jagged and compact_bags and f.path in self.bags_sent_once
            total += size * -(-n // self.slice_rows) if once else size * n  # once per slice, or per row
            largest = max(largest, (f.key, size), key=lambda kv: kv[1])
        if total > self.max_user_elements:
            raise RequestTooLargeError(
                f"the user inputs of this request come to {total} values once repeated for its {n} "
                f"candidates (the model reads them on every candidate row; largest: user['{largest[0]}'] with "
                f"{largest[1]}), over this server's limit of {self.max_user_elements}",
                fix="send fewer candidates per request (split them over several) or shorter user bags",
            )

    def _where(self, path: str, column: str) -> str:
        for f in self.fields:
            if f.path != path:
                continue
            if column == "*" and not f.columns:
                return f"{f.section}['{f.key}']"
            if column != "*" and int(column) in f.columns:
                return f"{f.section}['{f.key}'] (column {f.columns.index(int(column))})"
        return f"input '{path}'"

    # ---- batch -> JSON -------------------------------------------------------------------
    def encode(
        self, batch: RequestBatch, request: int = 0, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The JSON request for request ``request`` of a flat batch (what a client sends)."""
        if not 0 <= request < batch.num_requests:
            raise RequestError(f"request {request} is outside the batch's {batch.num_requests} requests")
        a, b = int(batch.offsets[request]), int(batch.offsets[request + 1])
        leaves = batch.leaves()
        body: dict[str, Any] = {"user": {}, "candidates": {}}
        for f in self.fields:
            t = leaves[f.path]
            if f.jagged:
                segs = bag_segments(self.spec, leaves, f.path)
                value: Any = segs[a].tolist() if f.section == "user" else [s.tolist() for s in segs[a:b]]
            elif f.columns:
                rows = t[a:b][:, list(f.columns)]
                value = rows[0].tolist() if f.section == "user" else rows.tolist()
            elif f.per_request:
                value = t[request].tolist()
            else:
                value = t[a].tolist() if f.section == "user" else t[a:b].tolist()
            body[f.section][f.key] = value
        if context:
            body["context"] = dict(context)
        return body


def _tensor(f: WireField, value: Any, n: int | None) -> torch.Tensor:
    where = f"{f.section}['{f.key}']"
    want = (n, *f.row_shape) if n is not None else f.row_shape
    kind = "integers" if f.integral else "numbers"
    try:
        arr = np.array(value)  # several times faster than torch.tensor on nested lists
    except (TypeError, ValueError, OverflowError) as exc:
        raise RequestError(
            f"{where} is not a rectangular array of {kind} ({exc})".replace("\n", " "),
            fix=f"send {_shape_words(want)} of {kind}",
        ) from exc
    if f.integral and arr.dtype.kind in "fuO":  # ids beyond int64 make numpy fall back to these
        huge = _huge_int(value)
        if huge is not None:
            raise RequestError(
                f"{where} holds id {_short(huge)}, outside the 64-bit integer range",
                fix="ids must lie in their embedding table's rows",
            )
    if arr.dtype.kind not in "iuf" or (arr.size == 0 and arr.shape != want):
        if arr.dtype.kind == "O":
            raise RequestError(
                f"{where} is not a rectangular array of {kind}", fix=f"send {_shape_words(want)}"
            )
        raise RequestError(f"{where} must hold {kind}, got {_short(value)}", fix=f"send {_shape_words(want)}")
    if tuple(arr.shape) != tuple(want):
        raise RequestError(
            f"{where} has shape {list(arr.shape)}, expected {list(want)}", fix=f"send {_shape_words(want)}"
        )
    if f.integral and arr.dtype.kind == "f":
        raise RequestError(f"{where} must hold integer ids, got fractional numbers")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(f"{where} holds NaN or infinity", fix="send finite numbers")
    if arr.dtype.kind == "u" or (arr.dtype.kind == "i" and arr.dtype.itemsize > 8):
        arr = arr.astype(np.int64)
    return torch.from_numpy(arr).to(f.dtype)


def _huge_int(value: Any) -> int | None:
    """The first Python int in a nested list outside int64, if any."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, int) and not -(2**63) <= v < 2**63:
            return v
    return None


def _bags(f: WireField, bags: Any) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"{f.section}['{f.key}']"
    if not isinstance(bags, list):
        raise RequestError(f"{where} must be a list of id bags, got {type(bags).__name__}")
    lengths = []
    flat: list[Any] = []
    for i, bag in enumerate(bags):
        if not isinstance(bag, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in bag):
            at = where if f.section == "user" else f"{where} candidate {i}"
            raise RequestError(f"{at} must be a list of integer ids, got {_short(bag)}")
        lengths.append(len(bag))
        flat.extend(bag)
    try:
        values = torch.tensor(flat, dtype=torch.int64).to(f.dtype)
    except (OverflowError, RuntimeError) as exc:
        raise RequestError(f"{where} holds an id too large for {f.dtype}: {exc}") from exc
    return values, torch.tensor(lengths, dtype=torch.int64)


def _shape_words(shape: tuple[int | None, ...]) -> str:
    if not shape:
        return "one number"
    return "an array of shape [" + ", ".join("n_candidates" if d is None else str(d) for d in shape) + "]"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def scores_per_candidate(outputs: list[torch.Tensor], start: int, stop: int) -> list[Any]:
    """Candidate rows ``start:stop`` of the model's output tensors as JSON values.

    Each candidate gets one number when the model returns one value per candidate, else the list
    of its values over all output tensors (e.g. one per task head), in output order.
    """
    rows = [o[start:stop].reshape(stop - start, -1).double() for o in outputs]
    joined = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    values = joined.tolist()
    if joined.shape[1] == 1:
        return [_finite(v[0]) for v in values]
    return [[_finite(x) for x in v] for v in values]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
