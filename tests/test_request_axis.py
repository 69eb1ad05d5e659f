"""Request-level inputs with a request axis: a model written request-centric by hand.

``forward(user_feats[R, 16], item_feats[N, 8], request_index[N])`` gathers the user tower's output
per candidate itself. Declared with ``per_request_inputs`` and ``request_index_input``, it captures
with a dynamic request dimension and scores any request count on every backend, in bundles, in
micro-batches and on the wire; declared wrongly, capture says how to declare it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.build.variant import Variant
from codesign.errors import InputShapeError, InputValueError, SpecError
from codesign.ir.request import concat_batches
from codesign.ir.workload import Workload
from codesign.numerics import output_tensors
from codesign.serving.wire import RequestSchema

SPEC = RequestSpec(per_request_inputs=("user_feats",), request_index_input="request_index")


class TwoTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        self.item = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        self.head = torch.nn.Linear(32, 1)

    def forward(
        self, user_feats: torch.Tensor, item_feats: torch.Tensor, request_index: torch.Tensor
    ) -> torch.Tensor:
        u = self.user(user_feats)[request_index]  # the user tower runs once per request
        i = self.item(item_feats)
        return torch.sigmoid(self.head(torch.cat([u * i, u - i], -1))).squeeze(-1)


def _batch(counts: list[int], seed: int, spec: RequestSpec = SPEC) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    inputs = {
        "user_feats": torch.randn(len(counts), 16, generator=g),
        "item_feats": torch.randn(n, 8, generator=g),
        "request_index": torch.zeros(n, dtype=torch.int64),
    }
    return RequestBatch(inputs, offsets_from_counts(counts)).with_request_map(spec)


@pytest.fixture(scope="module")
def workload() -> Workload:
    torch.manual_seed(0)
    return Workload("two_tower", TwoTower().eval(), SPEC, _batch)


@pytest.fixture(scope="module")
def variant(workload: Workload) -> Variant:
    return codesign.compile(workload, backend="eager", micro_batch=None)


def _eager(workload: Workload, batch: RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return workload.model(**batch.inputs)


@pytest.mark.parametrize("backend", ["eager", "inductor", pytest.param("aoti", marks=pytest.mark.slow)])
def test_any_request_count_scores_like_the_model(workload: Workload, backend: str, tmp_path: Path) -> None:
    program = codesign.capture(workload)
    assert program.metadata["request_form"] == "per_request"
    v = codesign.compile(program, backend=backend)
    loaded = codesign.load(v.save(tmp_path / backend, verify="in_process"))
    for counts in ([1], [5, 1, 30, 2], [3] * 9):
        batch = _batch(counts, 11)
        want = _eager(workload, batch)
        torch.testing.assert_close(v.score(batch), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.score(batch), want, rtol=1e-4, atol=1e-5)


def test_micro_batches_cut_requests_and_keep_their_user_rows(workload: Workload) -> None:
    v = codesign.compile(workload, backend="eager", micro_batch=7)
    batch = _batch([5, 1, 30, 2], 12)  # pieces of 7 rows cut requests 0 and 2
    torch.testing.assert_close(v.score(batch), _eager(workload, batch), rtol=1e-5, atol=1e-6)


def test_the_wire_sends_one_user_row_per_request(workload: Workload, variant: Variant) -> None:
    schema = RequestSchema.from_reference(SPEC, variant.reference_inputs)
    assert [(f.section, f.key) for f in schema.fields] == [
        ("user", "user_feats"),
        ("candidates", "item_feats"),
    ]
    batch = _batch([3, 1, 4], 13)
    parsed = []
    for r in range(batch.num_requests):
        body = json.loads(json.dumps(schema.encode(batch, r)))
        assert len(body["user"]["user_feats"]) == 16  # one row, not repeated per candidate
        parsed.append(schema.parse(body)[0])
    joined = concat_batches(parsed, SPEC)
    assert torch.equal(joined.inputs["request_index"], batch.request_index)
    torch.testing.assert_close(variant.score(joined), _eager(workload, batch), rtol=1e-5, atol=1e-6)


def test_request_offsets_form_captures_too() -> None:
    class ByOffsets(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user = torch.nn.Linear(16, 8)
            self.item = torch.nn.Linear(8, 8)

        def forward(self, user_feats: torch.Tensor, item_feats: torch.Tensor, offsets: torch.Tensor) -> Any:
            counts = offsets[1:] - offsets[:-1]
            u = torch.repeat_interleave(self.user(user_feats), counts, dim=0, output_size=item_feats.shape[0])
            return (u * self.item(item_feats)).sum(-1)

    spec = RequestSpec(per_request_inputs=("user_feats",), request_offsets_input="offsets")

    def make(counts: list[int], seed: int) -> RequestBatch:
        b = _batch(counts, seed)
        inputs = {
            "user_feats": b.inputs["user_feats"],
            "item_feats": b.inputs["item_feats"],
            "offsets": b.offsets,
        }
        return RequestBatch(inputs, b.offsets)

    w = Workload("by_offsets", ByOffsets().eval(), spec, make)
    v = codesign.compile(w, backend="eager")
    batch = make([2, 7, 1], 14)
    torch.testing.assert_close(v.score(batch), _eager(w, batch), rtol=1e-5, atol=1e-6)


def test_a_dict_without_the_index_gets_it_from_the_counts(workload: Workload, variant: Variant) -> None:
    batch = _batch([3, 4], 17)
    given = {"user_feats": batch.inputs["user_feats"], "item_feats": batch.inputs["item_feats"]}
    torch.testing.assert_close(
        variant.score(given, counts=[3, 4]), _eager(workload, batch), rtol=1e-5, atol=1e-6
    )


def test_wrong_rows_and_a_stale_request_index_are_refused(variant: Variant) -> None:
    batch = _batch([3, 4], 15)
    with pytest.raises(InputShapeError, match="'user_feats' has shape \\[3, 16\\]; this per-request input"):
        variant.score(RequestBatch({**batch.inputs, "user_feats": torch.randn(3, 16)}, batch.offsets))
    stale = {**batch.inputs, "request_index": torch.zeros(7, dtype=torch.int64)}
    with pytest.raises(InputValueError, match="'request_index' must hold the batch's request index"):
        variant.score(RequestBatch(stale, batch.offsets))


def test_capture_says_how_to_declare_a_request_axis(workload: Workload) -> None:
    example = _batch([3, 4], 16)
    with pytest.raises(SpecError, match="one row per request \\(2\\): declare it per_request_inputs"):
        codesign.capture(workload.model, example, RequestSpec())  # user_feats taken as candidate-level
    with pytest.raises(SpecError, match="static input 'user_feats' has 2 rows, the example's request count"):
        codesign.capture(workload.model, example, RequestSpec(static_inputs=("user_feats",)))
    with pytest.raises(SpecError, match="names no input that tells the model which request"):
        RequestSpec(per_request_inputs=("user_feats",))
    with pytest.raises(SpecError, match="per-request"):
        RequestSpec(per_request_inputs=("u",), request_inputs=("u",), request_index_input="i")


def test_the_flat_form_is_reported_as_such() -> None:
    from tests.conftest import tiny_program

    assert tiny_program("din").metadata["request_form"] == "flat"
    assert output_tensors(tiny_program("din").run(tiny_program("din").example))
