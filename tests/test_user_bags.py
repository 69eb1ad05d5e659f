"""User id bags reach a request-sharing variant once per request, never once per candidate.

The DLRM example declares 13 of its 26 EmbeddingBag inputs request-level (a user's bags, repeated on
every candidate row of the flat layout). A request-sharing variant looks them up once per request,
so its graph reads only each request's first-row bag (``Variant.first_row_bags``); the server then
sends each bag once (``compact_request_bags``) and lays it out on every row only for a variant that
reads every row. Scores must equal the eager model on the flat layout either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import codesign
from codesign.ir.request import (
    RequestBatch,
    compact_request_bags,
    repeat_request_bags,
    split_candidates,
)
from codesign.ir.workload import Workload
from codesign.numerics import compare_outputs, output_tensors
from codesign.passes import default_passes, pass_by_name
from codesign.serving.deployment import Bundle
from codesign.serving.runtime import BatchingConfig, Runtime

USER_BAGS = {f"indices.{k}" for k in range(13)}  # examples/dlrm.py: USER_SPARSE
# eager variants of one fp32 graph; request sharing runs the same ops on fewer rows
TOL = 1e-5


@pytest.fixture(scope="module")
def workload() -> Workload:
    return codesign.load_model_ref("dlrm", size="tiny")


@pytest.fixture(scope="module")
def variants(workload: Workload) -> dict[str, codesign.Variant]:
    program = codesign.capture(workload)
    sharing = pass_by_name("request_sharing")().ungated()
    return {
        "shared": codesign.compile(program, target="host", backend="eager", passes=[sharing, "cse", "dce"]),
        "plain": codesign.compile(program, target="host", backend="eager", passes=[]),
    }


def eager(workload: Workload, batch: RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return output_tensors(workload.model(**batch.inputs))[0].reshape(-1)


def test_layouts_round_trip_and_split_like_the_flat_batch(workload: Workload) -> None:
    spec = workload.spec
    assert spec.request_bags == USER_BAGS
    flat = workload.make_batch([3, 1, 7], seed=0)
    compact = compact_request_bags(flat, spec, USER_BAGS)
    for r in range(flat.num_requests):  # one bag per request, on its first row
        first = int(flat.offsets[r])
        assert int(compact.inputs["offsets"][0][first + 1] - compact.inputs["offsets"][0][first]) > 0
    lengths = torch.diff(
        compact.inputs["offsets"][0], append=torch.tensor([compact.inputs["indices"][0].numel()])
    )
    assert int((lengths > 0).sum()) == 3
    assert compact.inputs["indices"][0].numel() < flat.inputs["indices"][0].numel()
    again = repeat_request_bags(compact, spec, USER_BAGS)
    for path, t in flat.leaves().items():
        assert torch.equal(again.leaves()[path], t), path
    for size in (1, 2, 4, 5):  # pieces cut inside a request get its bag on their first row
        for a, b in zip(
            split_candidates(flat, spec, size),
            split_candidates(compact, spec, size, compact=USER_BAGS),
            strict=True,
        ):
            b = repeat_request_bags(b, spec, USER_BAGS)
            for path, t in a.leaves().items():
                assert torch.equal(b.leaves()[path], t), (size, path)


def test_only_a_variant_that_reads_first_rows_claims_its_bags(
    workload: Workload, variants: dict[str, codesign.Variant]
) -> None:
    assert variants["shared"].first_row_bags == USER_BAGS
    assert variants["plain"].first_row_bags == frozenset()
    # with grouping and every other default pass forced: user tables grouped apart, still first rows
    program = codesign.capture(workload)
    forced = codesign.compile(
        program, target="host", backend="eager", passes=[p.ungated() for p in default_passes()]
    )
    assert forced.first_row_bags == USER_BAGS
    batch = workload.make_batch([5, 1, 30], seed=3)
    compact = compact_request_bags(batch, workload.spec, USER_BAGS)
    for name, v in (*variants.items(), ("forced", forced)):
        ok, max_abs, _ = compare_outputs(v.score(compact, check=False), eager(workload, batch), v.tolerance)
        # the claim is what makes the compact layout safe: the plain variant reads every row
        assert ok == (name != "plain"), (name, max_abs)
        # micro-batches cut the compact layout inside requests (Variant.score passes its claim on)
        v.micro_batch = 7
        try:
            ok, max_abs, _ = compare_outputs(
                v.score(compact, check=False), eager(workload, batch), v.tolerance
            )
        finally:
            v.micro_batch = None
        assert ok == (name != "plain"), (name, max_abs)


def _recording(variant: codesign.Variant, seen: list[int]) -> Callable[..., Any]:
    runner = variant.runner

    def run(**inputs: Any) -> Any:
        seen.append(int(inputs["indices"][0].numel()))
        return runner(**inputs)

    return run


def test_the_server_sends_user_bags_once_to_a_sharing_variant(
    workload: Workload, variants: dict[str, codesign.Variant]
) -> None:
    bundle = Bundle.build(dict(variants), candidates=(8, 64), requests=(1,), repeats=1)
    seen: dict[str, list[int]] = {name: [] for name in variants}
    runtime = Runtime(bundle, batching=BatchingConfig(max_delay_ms=1.0, max_candidates=16))
    try:
        assert runtime.schema.bags_sent_once == frozenset()  # the plain variant repeats them
        for name, v in bundle.variants.items():
            v.runner = _recording(v, seen[name])
        batch = workload.make_batch([40], seed=7)  # 40 candidates: slices of 16, 16 and 8 rows
        bag = int(batch.inputs["offsets"][0][1])  # the user's bag on table 0
        body = bundle.schema().encode(batch)
        for name in variants:
            reply = runtime.score_json({**body, "context": {"variant": name}})
            assert reply["variant"] == name
            got = torch.tensor(reply["scores"])
            assert (got - eager(workload, batch)).abs().max() <= TOL, name
        assert seen["shared"] == [bag, bag, bag]  # each slice: the bag once, on its first row
        assert seen["plain"] == [16 * bag, 16 * bag, 8 * bag]
    finally:
        runtime.close()


def test_a_claim_the_reference_batch_refutes_is_not_trusted(
    workload: Workload, variants: dict[str, codesign.Variant]
) -> None:
    plain = variants["plain"]
    bundle = Bundle.build({"plain": plain}, candidates=(8,), requests=(1,), repeats=1)
    plain = bundle.variants["plain"]
    plain.__dict__.pop("first_row_bags", None)
    plain.__dict__["graph_first_row_bags"] = frozenset(USER_BAGS)  # a wrong analysis
    runtime = Runtime(bundle, batching=BatchingConfig(max_delay_ms=1.0))
    try:
        assert plain.first_row_bags == frozenset() and runtime._first_row["plain"] == frozenset()
        batch = workload.make_batch([12], seed=8)
        reply = runtime.score_json(bundle.schema().encode(batch))
        assert (torch.tensor(reply["scores"]) - eager(workload, batch)).abs().max() <= TOL
    finally:
        runtime.close()
        for key in ("graph_first_row_bags", "first_row_bags"):
            plain.__dict__.pop(key, None)


def test_bags_sent_once_count_once_against_the_size_limit(
    workload: Workload, variants: dict[str, codesign.Variant]
) -> None:
    import dataclasses

    from codesign.errors import RequestTooLargeError

    bundle = Bundle.build({"shared": variants["shared"]}, candidates=(8,), requests=(1,), repeats=1)
    runtime = Runtime(bundle, batching=BatchingConfig(max_delay_ms=1.0))
    try:
        assert runtime.schema.bags_sent_once == USER_BAGS
        batch = workload.make_batch([200], seed=9)
        body = bundle.schema().encode(batch)
        user_dense = 5  # dense[:, 0:5] is request-level: 5 values per candidate row
        bags = sum(len(body["user"][p]) for p in USER_BAGS)
        limit = user_dense * 200 + bags  # the bags once, the dense row per candidate
        runtime.schema = dataclasses.replace(runtime.schema, max_user_elements=limit)
        reply = runtime.score_json(body)
        assert (torch.tensor(reply["scores"]) - eager(workload, batch)).abs().max() <= TOL
        repeated = dataclasses.replace(runtime.schema, bags_sent_once=frozenset())
        with pytest.raises(RequestTooLargeError, match="once repeated"):
            repeated.parse(body, compact_bags=True)
        # a request scored in 4 slices carries the bag into each of them: counted 4 times
        sliced = dataclasses.replace(runtime.schema, slice_rows=50)
        with pytest.raises(RequestTooLargeError, match="once repeated"):
            sliced.parse(body, compact_bags=True)
        limit4 = user_dense * 200 + 4 * bags
        assert dataclasses.replace(sliced, max_user_elements=limit4).parse(body, compact_bags=True)
    finally:
        runtime.close()


def test_a_structured_batch_reaches_a_sharing_variant_with_each_bag_once(
    workload: Workload, variants: dict[str, codesign.Variant]
) -> None:
    batch = workload.make_batch([4, 9], seed=10)
    structured = batch.to_structured(workload.spec)
    offsets = batch.inputs["offsets"][0]
    once = int(offsets[1] - offsets[0]) + int(offsets[5] - offsets[4])  # rows 0 and 4 start the requests
    for name, v in variants.items():
        seen: list[int] = []
        runner, v.runner = v.runner, _recording(v, seen)
        try:
            got = output_tensors(v.score(structured))[0].reshape(-1)
        finally:
            v.runner = runner
        assert (got - eager(workload, batch)).abs().max() <= TOL, name
        assert seen == [once if name == "shared" else batch.inputs["indices"][0].numel()], name
