from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.config import config_from_json
from codesign.errors import ConfigError, SpecError
from codesign.ir.request import flatten_inputs, resample_batch, split_candidates
from codesign.ir.synthetic import zipf_ids
from tests.conftest import EXAMPLES, tiny_workload


def _flat(batch: RequestBatch) -> list[torch.Tensor]:
    return [t for _, t in flatten_inputs(batch.inputs)]


def _simple_batch() -> RequestBatch:
    counts = torch.tensor([2, 3])
    user = torch.randn(2, 4).repeat_interleave(counts, 0)
    x = torch.cat([user, torch.randn(5, 3)], 1)
    return RequestBatch({"x": x, "ad": torch.randn(5, 2)}, offsets_from_counts(counts))


def test_unknown_input_names_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"'user'.*\['ad', 'x'\]"):
        _simple_batch().validate(RequestSpec(request_inputs=("user",)))


@pytest.mark.parametrize("ranges", [((0, 9),), ((-1, 2),), ((3, 3),)])
def test_bad_column_range_is_rejected(ranges: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(SpecError, match="outside the input's 7 columns"):
        _simple_batch().validate(RequestSpec(request_columns={"x": ranges}))


def test_overlapping_and_1d_column_ranges() -> None:
    with pytest.raises(SpecError, match="overlap"):
        _simple_batch().validate(RequestSpec(request_columns={"x": ((0, 3), (2, 4))}))
    b = RequestBatch({"v": torch.randn(4)}, offsets_from_counts([4]))
    with pytest.raises(SpecError, match="no column dimension"):
        b.validate(RequestSpec(request_columns={"v": ((0, 1),)}))


def test_request_level_data_must_repeat_within_a_request() -> None:
    b = _simple_batch()
    b.validate(RequestSpec(request_columns={"x": ((0, 4),)}))
    with pytest.raises(SpecError, match=r"'x'\[:, 0:5\].*row 1.*request 0"):
        b.validate(RequestSpec(request_columns={"x": ((0, 5),)}))
    with pytest.raises(SpecError, match="'ad' is declared request-level"):
        b.validate(RequestSpec(request_inputs=("ad",)))


def test_a_user_row_that_changes_late_in_a_request_is_named() -> None:
    # request 1 covers rows 2..4; its rows 2 and 3 agree, row 4 differs (a later row, not the second)
    b = _simple_batch()
    b.inputs["x"][4, 0] += 1.0
    with pytest.raises(SpecError, match=r"row 4 differs.*request 1"):
        b.validate(RequestSpec(request_columns={"x": ((0, 4),)}))


def test_many_requests_are_checked_in_one_pass_that_names_the_row() -> None:
    # 12 requests of 3 rows (past the per-request torch.equal path): request 7's last row differs
    counts = torch.full((12,), 3)
    user = torch.randn(12, 4).repeat_interleave(counts, 0)
    b = RequestBatch({"user": user, "ad": torch.randn(36, 2)}, offsets_from_counts(counts))
    b.validate(RequestSpec(request_inputs=("user",)))
    user[7 * 3 + 2, 1] += 1.0
    with pytest.raises(SpecError, match=r"row 23 differs.*request 7"):
        b.validate(RequestSpec(request_inputs=("user",)))


def test_bad_offsets_and_row_counts() -> None:
    b = _simple_batch()
    with pytest.raises(SpecError, match=r">= 1 candidate"):
        RequestBatch(b.inputs, torch.tensor([0, 0, 5])).validate(RequestSpec())
    assert RequestBatch(b.inputs, torch.tensor([0, 5], dtype=torch.int32)).offsets.dtype == torch.int64
    assert RequestBatch(b.inputs, [0, 2, 5]).offsets.tolist() == [0, 2, 5]  # a list is converted
    with pytest.raises(SpecError, match="must be integers"):
        RequestBatch(b.inputs, torch.tensor([0.0, 5.0]))
    with pytest.raises(SpecError, match="offsets give 6 candidates"):
        RequestBatch(b.inputs, offsets_from_counts([3, 3])).validate(RequestSpec())


def test_spec_round_trips_through_json_and_rejects_unknown_types() -> None:
    spec = RequestSpec(request_inputs=("a",), request_columns={"x": ((0, 4),)}, jagged={"i": "o"})
    assert config_from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="allow-list"):
        config_from_json('{"type": "os.system", "version": 1, "fields": {}}')
    with pytest.raises(ConfigError, match="newer"):
        config_from_json(spec.to_json().replace('"version": 1', '"version": 99'))


@pytest.mark.parametrize("name", EXAMPLES)
def test_structured_round_trip_and_resampling(name: str) -> None:
    w = tiny_workload(name)
    batch = w.make_batch([4, 1, 6], 3)
    batch.validate(w.spec)
    structured = batch.to_structured(w.spec)
    for key, t in structured.request.items():
        if not key.endswith("#lengths") and key.split("[")[0] not in w.spec.jagged:
            assert t.shape[0] == 3, key  # one row per request
    back = structured.to_flat(w.spec, batch)
    assert all(torch.equal(a, b) for a, b in zip(_flat(back), _flat(batch), strict=True))
    fresh = resample_batch(batch, w.spec, [2, 5, 1, 1], seed=1)
    fresh.validate(w.spec)
    assert fresh.num_requests == 4 and fresh.num_candidates == 9


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=6), st.integers(0, 10_000))
def test_generators_honour_any_jagged_counts(counts: list[int], seed: int) -> None:
    for name in ("dlrm", "multitask"):
        w = tiny_workload(name)
        batch = w.make_batch(counts, seed)
        batch.validate(w.spec)
        assert batch.counts.tolist() == counts
        back = batch.to_structured(w.spec).to_flat(w.spec, batch)
        assert all(torch.equal(a, b) for a, b in zip(_flat(back), _flat(batch), strict=True))


def test_zipf_ids_are_heavy_tailed_and_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    ids = zipf_ids(100_000, 200_000, generator=g)
    assert int(ids.min()) >= 0 and int(ids.max()) < 100_000
    counts = torch.bincount(ids, minlength=100_000).sort(descending=True).values
    top1pct = counts[:1000].sum().item() / ids.numel()
    assert top1pct > 0.4, top1pct  # power law: 1% of ids take far more than 1% of lookups
    assert len(ids.unique()) > 10_000  # but the tail is still visited


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("shared", [False, True], ids=["flat", "request-sharing"])
def test_micro_batched_scores_equal_whole_batch_scores(name: str, shared: bool) -> None:
    import codesign
    from codesign.passes import RequestSharing, RequestSharingConfig
    from tests.conftest import tiny_program

    program = tiny_program(name)
    passes = [RequestSharing(RequestSharingConfig(require_predicted_gain=False))] if shared else []
    variant = codesign.compile(program, passes=passes, micro_batch=7, verify=False)
    # pieces of 7 rows cut requests in the middle: 3 requests of 5, 11 and 1 candidates -> 3 pieces
    batch = program.sample_batch([5, 11, 1], seed=4)
    assert len(split_candidates(batch, program.spec, 7)) == 3
    torch.testing.assert_close(variant.score(batch), program.run(batch), rtol=1e-5, atol=1e-6)


def test_split_candidates_cuts_jagged_inputs_at_their_offsets() -> None:
    spec = RequestSpec(jagged={"ids": "off"})
    batch = RequestBatch(
        {"ids": torch.arange(10), "off": torch.tensor([0, 3, 3, 7]), "x": torch.arange(4.0)},
        offsets_from_counts([1, 3]),
    )
    first, second = split_candidates(batch, spec, 2)
    assert first.inputs["ids"].tolist() == [0, 1, 2] and first.inputs["off"].tolist() == [0, 3]
    assert second.inputs["ids"].tolist() == [3, 4, 5, 6, 7, 8, 9] and second.inputs["off"].tolist() == [0, 4]
    assert first.offsets.tolist() == [0, 1, 2] and second.offsets.tolist() == [0, 2]
    with pytest.raises(SpecError, match="micro_batch"):
        split_candidates(batch, spec, 0)
