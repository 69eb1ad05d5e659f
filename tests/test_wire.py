"""The JSON wire format: every example model's requests survive encode -> JSON -> parse unchanged,
request batches join back into one multi-request batch, and embedding id bounds come from the graph."""

from __future__ import annotations

import json

import pytest
import torch

from codesign.analysis import embedding_id_bounds
from codesign.errors import RequestError, SpecError
from codesign.ir.request import concat_batches
from codesign.numerics import output_tensors
from codesign.serving.wire import RequestSchema, scores_per_candidate
from tests.conftest import tiny_program, tiny_workload


def test_every_example_round_trips_through_json_and_scores_the_same(example_name: str) -> None:
    w, program = tiny_workload(example_name), tiny_program(example_name)
    schema = RequestSchema.from_reference(w.spec, w.example(), embedding_id_bounds(program))
    batch = w.make_batch([3, 1, 4], 21)
    parsed = []
    for r in range(batch.num_requests):
        body = json.loads(json.dumps(schema.encode(batch, r)))
        one, context = schema.parse(body)
        one.validate(w.spec)
        assert context == {} and one.num_requests == 1 and one.num_candidates == int(batch.counts[r])
        parsed.append(one)
    joined = concat_batches(parsed, w.spec)
    assert torch.equal(joined.offsets, batch.offsets)
    for (path, a), (_, b) in zip(batch.leaves().items(), joined.leaves().items(), strict=True):
        assert torch.equal(a, b), path
    with torch.no_grad():
        want = output_tensors(w.model(**batch.inputs))
        got = output_tensors(w.model(**joined.inputs))
    for x, y in zip(want, got, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_id_bounds_name_each_table_input() -> None:
    bounds = embedding_id_bounds(tiny_program("useq"))
    assert bounds == {"history": {"*": 500}, "actions": {"*": 8}, "cand_item": {"*": 500}}
    dlrm = embedding_id_bounds(tiny_program("dlrm"))
    assert set(dlrm) == {f"indices.{k}" for k in range(26)}
    # multitask reads ids from columns of its float feature matrix
    assert embedding_id_bounds(tiny_program("multitask"))["x"] == {"8": 16, "25": 32}


def test_id_bounds_follow_column_slices_and_stop_at_arithmetic() -> None:
    """wide_deep looks up ``sparse[:, i:i+1]`` in table i (a column slice, not the whole input) and
    ``sparse + field_starts`` in its wide table (arithmetic: no bound)."""
    from tests.zoo import captured

    assert embedding_id_bounds(captured("wide_deep")) == {
        "sparse": {"0": 500, "1": 20, "2": 8, "3": 600, "4": 40}
    }


def test_split_inputs_have_user_and_candidate_fields_and_column_bounds_are_checked() -> None:
    w = tiny_workload("multitask")
    schema = RequestSchema.from_reference(w.spec, w.example(), embedding_id_bounds(tiny_program("multitask")))
    keys = {(f.section, f.key) for f in schema.fields}
    user_key = next(k for s, k in keys if s == "user")
    assert user_key.startswith("x[0:") and ("candidates", "x") in keys
    body = schema.encode(w.make_batch([2], 3))
    col = 25 - schema.fields[[f.key for f in schema.fields].index("x")].columns[0]
    body["candidates"]["x"][1][col] = 32.0  # one past the table
    with pytest.raises(RequestError, match=r"candidates\['x'\] \(column \d+\) holds id 32"):
        schema.parse(body)


def test_scores_per_candidate_one_number_or_one_list_per_candidate() -> None:
    single = [torch.tensor([[0.1], [0.2], [0.3]])]
    assert scores_per_candidate(single, 1, 3) == pytest.approx([0.2, 0.3])
    heads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    assert scores_per_candidate(heads, 0, 2) == [[1.0, 3.0], [2.0, 4.0]]


def test_concat_refuses_nothing() -> None:
    with pytest.raises(SpecError, match="at least one batch"):
        concat_batches([], tiny_workload("useq").spec)


def test_id_bounds_stop_where_a_select_drops_the_column_axis() -> None:
    """``x[:, 1][:, 0:3]`` on [N, F, L] ids picks positions of field 1, not columns 0-2 of x: no bound."""
    import codesign
    from codesign import RequestBatch, RequestSpec, offsets_from_counts

    class Positions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(10, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.table(x[:, 1][:, 0:3]).sum((1, 2)) + self.table(x[:, 0, 0]).sum(1)

    def make(counts: list[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        return RequestBatch(
            {"x": torch.randint(0, 10, (sum(counts), 2, 5), generator=g)}, offsets_from_counts(counts)
        )

    program = codesign.capture(Positions().eval(), make([2, 2], 0), RequestSpec(), make_batch=make)
    assert embedding_id_bounds(program) == {}
