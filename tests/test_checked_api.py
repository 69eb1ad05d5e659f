"""The checked Python API: malformed specs, batches and scoring calls each raise one typed error.

Every case below is a mistake a user makes by hand; each must be refused before any tensor reaches
the model, with the ``CodesignError`` subclass for its kind and a message naming the input at fault.
Deleting the check that catches a case makes that case fail (a raw torch error, or no error at all).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import codesign
from codesign.build.variant import Variant
from codesign.errors import (
    InputNameError,
    InputShapeError,
    InputTypeError,
    InputValueError,
    RequestError,
    SpecError,
)
from codesign.ir.request import RequestBatch, RequestSpec, offsets_from_counts
from codesign.numerics import output_tensors
from tests.conftest import tiny_workload

COUNTS = [3, 4]


def _sharing(name: str) -> Variant:
    """The example compiled with request sharing forced on: user work once per request, so user rows that
    differ within a request would be silently ignored (and must be refused)."""
    from codesign.passes import pass_by_name

    passes = [pass_by_name("request_sharing")().ungated(), "cse", "dce"]
    variant = codesign.compile(tiny_workload(name), backend="eager", target="host", passes=passes)
    assert variant.takes_request_offsets
    return variant


@pytest.fixture(scope="module")
def din() -> Variant:
    return _sharing("din")


@pytest.fixture(scope="module")
def dlrm() -> Variant:
    return _sharing("dlrm")


def _din_inputs() -> dict[str, Any]:
    return dict(tiny_workload("din").make_batch(COUNTS, 5).inputs)


def _dlrm_inputs() -> dict[str, Any]:
    return copy.copy(dict(tiny_workload("dlrm").make_batch(COUNTS, 5).inputs))


def _with(inputs: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(inputs)
    out.update(changes)
    return out


def _dlrm_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    inputs = _dlrm_inputs()
    inputs["indices"], inputs["offsets"] = list(inputs["indices"]), list(inputs["offsets"])
    change(inputs)
    return inputs


SPEC_CASES: list[tuple[str, Callable[[], Any], str]] = [
    (
        "request_inputs a string",
        lambda: RequestSpec(request_inputs="user_id"),
        r"request_inputs=\('user_id',\)",
    ),
    ("static_inputs a string", lambda: RequestSpec(static_inputs="table"), "is a string"),
    ("request_inputs of ints", lambda: RequestSpec(request_inputs=(1, 2)), "not input names"),
    ("request_inputs a dict", lambda: RequestSpec(request_inputs={"a": 1}), "tuple of input names"),
    ("request_columns a list", lambda: RequestSpec(request_columns=[("x", (0, 4))]), "must be a dict"),
    ("request_columns a string range", lambda: RequestSpec(request_columns={"x": "0:4"}), "not a list of"),
    ("request_columns bad pairs", lambda: RequestSpec(request_columns={"x": ((0,),)}), "not a list of"),
    ("jagged to an int", lambda: RequestSpec(jagged={"indices.0": 3}), "maps input names"),
    ("jagged a list", lambda: RequestSpec(jagged=["indices.0"]), "must be a dict"),
    (
        "input both whole and columns",
        lambda: RequestSpec(request_inputs=("x",), request_columns={"x": ((0, 2),)}),
        "both",
    ),
    ("batch inputs a list", lambda: RequestBatch([torch.zeros(2)], [0, 2]), "must be a dict"),  # type: ignore[arg-type]
    ("batch inputs int keys", lambda: RequestBatch({0: torch.zeros(2)}, [0, 2]), "must be a dict"),  # type: ignore[dict-item]
    ("offsets a string", lambda: RequestBatch({"x": torch.zeros(2)}, "0,2"), "not a list of integers"),
    ("offsets floats", lambda: RequestBatch({"x": torch.zeros(2)}, [0.0, 2.0]), "must be integers"),
    ("offsets one entry", lambda: RequestBatch({"x": torch.zeros(2)}, [5]), "R\\+1 >= 2"),
    ("offsets 2-D", lambda: RequestBatch({"x": torch.zeros(2)}, [[0, 2]]), "1-D"),
    ("offsets decreasing", lambda: RequestBatch({"x": torch.zeros(6)}, [0, 4, 2]), ">= 1 candidate"),
    ("offsets not from 0", lambda: RequestBatch({"x": torch.zeros(4)}, [1, 4]), "start at 0"),
    ("offsets empty request", lambda: RequestBatch({"x": torch.zeros(4)}, [0, 0, 4]), ">= 1 candidate"),
]


@pytest.mark.parametrize(("case", "make", "match"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_malformed_specs_and_batches_are_refused_at_construction(
    case: str, make: Callable[[], Any], match: str
) -> None:
    with pytest.raises(SpecError, match=match):
        make()


DIN_CASES: list[tuple[str, Callable[[], Any], dict[str, Any], type[Exception], str]] = [
    ("an int", lambda: 42, {}, RequestError, "got int"),
    ("a list of tensors", lambda: list(_din_inputs().values()), {}, RequestError, "got list"),
    (
        "missing input",
        lambda: {k: v for k, v in _din_inputs().items() if k != "cand_cat"},
        {"counts": COUNTS},
        InputNameError,
        r"lacks \['cand_cat'\]",
    ),
    (
        "unknown input",
        lambda: _with(_din_inputs(), extra=torch.zeros(7)),
        {"counts": COUNTS},
        InputNameError,
        r"unknown inputs \['extra'\]",
    ),
    (
        "a list, not a tensor",
        lambda: _with(_din_inputs(), cand_item=list(range(7))),
        {"counts": COUNTS},
        InputTypeError,
        "'cand_item' is a container of 7 values, not a tensor",
    ),
    (
        "float64 ids",
        lambda: _with(_din_inputs(), cand_item=_din_inputs()["cand_item"].double()),
        {"counts": COUNTS},
        InputTypeError,
        "'cand_item' is float64",
    ),
    (
        "int32 ids",
        lambda: _with(_din_inputs(), cand_cat=_din_inputs()["cand_cat"].int()),
        {"counts": COUNTS},
        InputTypeError,
        "'cand_cat' is int32",
    ),
    (
        "wider history",
        lambda: _with(_din_inputs(), history=torch.zeros(7, 9, dtype=torch.int64)),
        {"counts": COUNTS},
        InputShapeError,
        r"'history' has shape \[7, 9\]",
    ),
    (
        "a row short",
        lambda: _with(_din_inputs(), cand_item=_din_inputs()["cand_item"][:6]),
        {"counts": COUNTS},
        InputShapeError,
        "'cand_item' has shape \\[6\\]: 6 rows, but the batch's offsets give 7",
    ),
    (
        "extra dim",
        lambda: _with(_din_inputs(), cand_item=_din_inputs()["cand_item"][:, None]),
        {"counts": COUNTS},
        InputShapeError,
        "'cand_item' has shape \\[7, 1\\]",
    ),
    (
        "a scalar",
        lambda: _with(_din_inputs(), cand_cat=torch.tensor(3)),
        {"counts": COUNTS},
        InputShapeError,
        "'cand_cat' has shape \\[\\]",
    ),
    (
        "id past its table",
        lambda: _with(_din_inputs(), cand_item=torch.full((7,), 10**6)),
        {"counts": COUNTS},
        InputValueError,
        "'cand_item' holds id 1e\\+06, outside its embedding table's 500 rows",
    ),
    (
        "negative id",
        lambda: _with(_din_inputs(), cand_cat=torch.full((7,), -1)),
        {"counts": COUNTS},
        InputValueError,
        "'cand_cat' holds id -1",
    ),
    (
        "user rows differ",
        lambda: _with(_din_inputs(), history=_din_inputs()["history"].roll(1, 0)),
        {"counts": COUNTS},
        InputValueError,
        "'history' is declared request-level",
    ),
    ("counts do not add up", lambda: _din_inputs(), {"counts": [3, 3]}, InputShapeError, "offsets give 6"),
    ("counts with a zero", lambda: _din_inputs(), {"counts": [0, 7]}, RequestError, ">= 1 candidate"),
    (
        "counts a string",
        lambda: _din_inputs(),
        {"counts": "3,4"},
        RequestError,
        "not a list of candidate counts",
    ),
    (
        "counts with a RequestBatch",
        lambda: RequestBatch(_din_inputs(), offsets_from_counts(COUNTS)),
        {"counts": COUNTS},
        RequestError,
        "carries its own offsets",
    ),
    ("a dict with int keys", lambda: {0: torch.zeros(7)}, {"counts": [7]}, RequestError, "must be a dict"),
]


@pytest.mark.parametrize(
    ("case", "make", "kwargs", "error", "match"), DIN_CASES, ids=[c[0] for c in DIN_CASES]
)
def test_malformed_scoring_calls_raise_typed_errors(
    din: Variant,
    case: str,
    make: Callable[[], Any],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        din.score(make(), **kwargs)


def _shift_offsets(inputs: dict[str, Any]) -> None:
    inputs["offsets"][3] = inputs["offsets"][3].flip(0)


DLRM_CASES: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("dense float64", lambda d: d.update(dense=d["dense"].double()), InputTypeError, "'dense' is float64"),
    (
        "dense narrower",
        lambda d: d.update(dense=d["dense"][:, :12]),
        InputShapeError,
        r"'dense' has shape \[7, 12\]",
    ),
    (
        "user columns differ",
        lambda d: d.update(dense=d["dense"].roll(1, 0)),
        InputValueError,
        r"'dense'\[:, 0:5\] is declared request-level",
    ),
    (
        "offsets one short",
        lambda d: d["offsets"].__setitem__(2, d["offsets"][2][:6]),
        InputShapeError,
        "'offsets.2' has 6 entries",
    ),
    ("offsets decreasing", _shift_offsets, InputValueError, "'offsets.3' must start at 0 and not decrease"),
    (
        "offsets past the values",
        lambda d: d["offsets"].__setitem__(4, d["offsets"][4] + 10**4),
        InputValueError,
        "'offsets.4' must start at 0",
    ),
    (
        "bag values 2-D",
        lambda d: d["indices"].__setitem__(5, d["indices"][5][:, None]),
        InputShapeError,
        "'indices.5' has shape",
    ),
    (
        "bag id past its table",
        lambda d: d["indices"].__setitem__(20, d["indices"][20] + 10**5),
        InputValueError,
        "'indices.20' holds id",
    ),
    (
        "one table missing",
        lambda d: (d["indices"].pop(), d["offsets"].pop()),
        InputNameError,
        r"lacks \['indices.25', 'offsets.25'\]",
    ),
    (
        "a tuple for a list",
        lambda d: d.update(indices=tuple(d["indices"])),
        InputNameError,
        "another nesting",
    ),
]


@pytest.mark.parametrize(("case", "change", "error", "match"), DLRM_CASES, ids=[c[0] for c in DLRM_CASES])
def test_malformed_jagged_and_column_inputs_raise_typed_errors(
    dlrm: Variant, case: str, change: Callable[[dict[str, Any]], None], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        dlrm.score(_dlrm_with(change), counts=COUNTS)


def test_a_dict_with_counts_scores_like_its_batch_and_a_structured_batch(din: Variant) -> None:
    w = tiny_workload("din")
    batch = w.make_batch(COUNTS, 5)
    want = output_tensors(din.score(batch))
    for got in (
        din.score(dict(batch.inputs), counts=COUNTS),
        din.score(batch.to_structured(w.spec)),
        din.score(batch, check=False),
    ):
        torch.testing.assert_close(output_tensors(got), want, rtol=0, atol=0)
    # without counts a dict is one request; DIN's user rows differ between the two, so it is refused
    with pytest.raises(InputValueError, match="request-level"):
        din.score(dict(batch.inputs))
    one = w.make_batch([5], 6)
    torch.testing.assert_close(output_tensors(din.score(dict(one.inputs))), output_tensors(din.score(one)))


def test_user_rows_may_differ_for_a_variant_that_scores_every_row(din: Variant) -> None:
    """Without request sharing each row is scored on its own features, so nothing is refused."""
    plain = codesign.compile(tiny_workload("din"), backend="eager", target="host", passes=[])
    inputs = _with(_din_inputs(), history=_din_inputs()["history"].roll(1, 0))
    with torch.no_grad():
        want = tiny_workload("din").model(**inputs)
    torch.testing.assert_close(plain.score(inputs, counts=COUNTS), want)
    with pytest.raises(InputValueError, match="'history' is declared request-level"):
        din.score(inputs, counts=COUNTS)


def test_top_level_inputs_in_another_order_are_the_same_call(din: Variant) -> None:
    batch = tiny_workload("din").make_batch(COUNTS, 5)
    reordered = dict(reversed(list(batch.inputs.items())))
    torch.testing.assert_close(din.score(reordered, counts=COUNTS), din.score(batch), rtol=0, atol=0)


def test_a_loaded_bundle_checks_its_inputs(din: Variant, tmp_path: Any) -> None:
    loaded = codesign.load(din.save(tmp_path / "din", verify="none"))
    with pytest.raises(InputValueError, match="'cand_item' holds id"):
        loaded.score(_with(_din_inputs(), cand_item=torch.full((7,), 10**6)), counts=COUNTS)
