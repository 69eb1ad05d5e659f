"""Jagged inputs described by lengths (TorchRec's convention), not offsets.

The model takes ``values`` and per-candidate ``lengths`` and builds its EmbeddingBag offsets itself.
Declared with ``RequestSpec(jagged_lengths=...)``, it captures, compiles and scores on any batch, is
cut into micro-batches and joined by request as the offsets form is, and travels on the wire as bags.
"""

from __future__ import annotations

import json

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.build.variant import Variant
from codesign.errors import InputShapeError, InputValueError, SpecError
from codesign.ir.request import concat_batches, split_candidates
from codesign.ir.workload import Workload
from codesign.serving.wire import RequestSchema

SPEC = RequestSpec(
    request_inputs=("history",),
    jagged_lengths={"history": "history_lengths", "tags": "tag_lengths"},
)


class BagsByLengths(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.items = torch.nn.EmbeddingBag(100, 8, mode="mean")
        self.tags = torch.nn.EmbeddingBag(30, 8, mode="sum")
        self.dense = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(24, 1)

    def forward(
        self,
        history: torch.Tensor,
        history_lengths: torch.Tensor,
        tags: torch.Tensor,
        tag_lengths: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        h = self.items(history, torch.cumsum(history_lengths, 0) - history_lengths)
        t = self.tags(tags, torch.cumsum(tag_lengths, 0) - tag_lengths)
        return self.head(torch.cat([h, t, self.dense(dense)], 1)).squeeze(1)


def _batch(counts: list[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    history, history_lengths = [], []
    for c in counts:  # one history bag per request, repeated on each of its candidates
        bag = torch.randint(0, 100, (int(torch.randint(1, 6, (), generator=g)),), generator=g)
        history += [bag] * c
        history_lengths += [bag.numel()] * c
    tag_lengths = torch.randint(0, 4, (n,), generator=g)
    inputs = {
        "history": torch.cat(history),
        "history_lengths": torch.tensor(history_lengths),
        "tags": torch.randint(0, 30, (int(tag_lengths.sum()),), generator=g),
        "tag_lengths": tag_lengths,
        "dense": torch.randn(n, 4, generator=g),
    }
    return RequestBatch(inputs, offsets_from_counts(counts))


@pytest.fixture(scope="module")
def workload() -> Workload:
    torch.manual_seed(0)
    return Workload("bags_by_lengths", BagsByLengths().eval(), SPEC, _batch)


@pytest.fixture(scope="module")
def variant(workload: Workload) -> Variant:
    return codesign.compile(workload, backend="eager")


def _eager(workload: Workload, batch: RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return workload.model(**batch.inputs)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])  # 9 s
def test_lengths_inputs_capture_compile_and_score(workload: Workload, backend: str) -> None:
    v = codesign.compile(workload, backend=backend, micro_batch=5)
    for counts in ([1], [6, 1, 9], [2] * 7):
        batch = _batch(counts, 21)
        torch.testing.assert_close(v.score(batch), _eager(workload, batch), rtol=1e-4, atol=1e-5)


def test_splits_and_joins_keep_lengths_with_their_values(workload: Workload) -> None:
    batch = _batch([4, 3, 6], 22)
    pieces = split_candidates(batch, SPEC, 5)
    assert [p.num_candidates for p in pieces] == [5, 5, 3]
    for p in pieces:
        p.validate(SPEC)  # lengths add up to the piece's values; user bags still repeat per request
    joined = concat_batches(pieces, SPEC)
    for path in ("history", "history_lengths", "tags", "tag_lengths"):
        assert torch.equal(joined.inputs[path], batch.inputs[path]), path
    want = _eager(workload, batch)
    got = torch.cat([_eager(workload, p) for p in pieces])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_wire_sends_bags_and_builds_the_lengths(workload: Workload, variant: Variant) -> None:
    schema = RequestSchema.from_reference(SPEC, variant.reference_inputs, variant.id_bounds)
    keys = {(f.section, f.key) for f in schema.fields}
    assert keys == {("user", "history"), ("candidates", "tags"), ("candidates", "dense")}
    batch = _batch([3, 2], 23)
    parsed = [schema.parse(json.loads(json.dumps(schema.encode(batch, r))))[0] for r in range(2)]
    joined = concat_batches(parsed, SPEC)
    assert torch.equal(joined.inputs["tag_lengths"], batch.inputs["tag_lengths"])
    torch.testing.assert_close(variant.score(joined), _eager(workload, batch), rtol=1e-5, atol=1e-6)


def test_bad_lengths_are_refused(variant: Variant) -> None:
    batch = _batch([3, 2], 24)
    short = dict(batch.inputs, tag_lengths=batch.inputs["tag_lengths"][:4])
    with pytest.raises(
        InputShapeError, match="'tag_lengths' has 4 entries; it needs one bag length per candidate"
    ):
        variant.score(short, counts=[3, 2])
    off = dict(batch.inputs, tag_lengths=batch.inputs["tag_lengths"] + 1)
    with pytest.raises(InputValueError, match="'tag_lengths' must be >= 0 and add up to the"):
        variant.score(off, counts=[3, 2])
    with pytest.raises(SpecError, match="both jagged \\(offsets\\) and jagged_lengths"):
        RequestSpec(jagged={"tags": "o"}, jagged_lengths={"tags": "n"})
