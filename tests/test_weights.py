"""Live weight updates: a delta file or a new bundle, applied to a served variant without downtime.

Every expected score comes from the eager PyTorch model given the same new weights.
"""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import codesign
from codesign.backends import get_backend
from codesign.build.weights import WeightsDelta, apply_delta, weight_names
from codesign.errors import WeightsError
from codesign.ir.workload import Workload
from codesign.serving.deployment import Bundle
from codesign.serving.http import Server, ServerConfig
from codesign.serving.runtime import BatchingConfig, Runtime

TOL = 1e-5
ADMIN = "admin-t0ken"


def workload(name: str, seed: int = 0) -> Workload:
    return codesign.load_model_ref(name, size="tiny", seed=seed)


@pytest.fixture(scope="module")
def dlrm_variant() -> codesign.Variant:
    return codesign.compile(workload("dlrm"), target="host", backend="eager")


@pytest.fixture(scope="module")
def useq_variant() -> codesign.Variant:
    return codesign.compile(workload("useq"), target="host", backend="eager")


def scores(model: torch.nn.Module, batch: codesign.RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.inputs).reshape(-1)


def updated_model(w: Workload, tensors: dict[str, torch.Tensor], rows: dict[str, Any]) -> torch.nn.Module:
    """The eager model with the delta's weights (delta names are the model's own where passes kept them)."""
    model = copy.deepcopy(w.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
        for name, (ids, new) in rows.items():
            params[name][ids] = new
    return model


# ---- the delta, on a variant --------------------------------------------------------------------
def test_a_delta_of_rows_and_dense_weights_scores_as_the_model_with_those_weights(
    dlrm_variant: codesign.Variant, tmp_path: Path
) -> None:
    w = workload("dlrm")
    batch = w.make_batch([5, 1, 9], seed=4)
    before = dlrm_variant.score(batch).reshape(-1)
    ids = torch.tensor([0, 3, 7, 11, 40])
    rows = {
        "tables.0.weight": (ids, torch.randn(5, 8)),
        "tables.5.weight": (torch.tensor([2]), torch.randn(1, 8)),
    }
    tensors = {"top.0.weight": torch.randn(32, 359) * 0.05}
    sha = WeightsDelta(tensors=tensors, rows=rows).save(tmp_path / "delta.pt")
    new = apply_delta(dlrm_variant, WeightsDelta.read(tmp_path / "delta.pt", sha))
    want = scores(updated_model(w, tensors, rows), batch)
    got = new.score(batch).reshape(-1)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert (got - before).abs().max() > 1e-3  # the update changed the scores
    torch.testing.assert_close(dlrm_variant.score(batch).reshape(-1), before, rtol=0, atol=0)  # old one kept
    # health probes compare against the new weights' reference outputs, not the old ones
    assert not torch.equal(new.reference_outputs[0], dlrm_variant.reference_outputs[0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inductor", "aoti"])
def test_a_compiled_variant_takes_a_delta_through_its_backend(backend: str) -> None:
    # inductor compiles the new program again; aoti hands its package the new weights (load_constants)
    w = workload("dlrm")
    variant = codesign.compile(w, target="host", backend=backend, passes=[])
    batch = w.make_batch([4, 7], seed=6)
    rows = {"tables.2.weight": (torch.tensor([0, 1, 5, 9]), torch.randn(4, 8))}
    tensors = {"bottom.0.bias": torch.randn(32)}
    new = apply_delta(variant, WeightsDelta(tensors=tensors, rows=rows))
    want = scores(updated_model(w, tensors, rows), batch)
    torch.testing.assert_close(new.score(batch).reshape(-1), want, rtol=1e-4, atol=1e-5)
    assert (want - variant.score(batch).reshape(-1)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (
            lambda: WeightsDelta(tensors={"top.0.weigth": torch.zeros(32, 359)}),
            "has no weight 'top.0.weigth'",
        ),
        (lambda: WeightsDelta(tensors={"top.0.weight": torch.zeros(32, 358)}), "is (32, 358) torch.float32"),
        (
            lambda: WeightsDelta(tensors={"top.0.weight": torch.zeros(32, 359, dtype=torch.float64)}),
            "float64",
        ),
        (lambda: WeightsDelta(tensors={"top.0.bias": torch.full((32,), float("nan"))}), "NaN or inf"),
        (
            lambda: WeightsDelta(
                rows={"tables.1.weight": (torch.tensor([1]), torch.full((1, 8), float("inf")))}
            ),
            "NaN",
        ),
        (
            lambda: WeightsDelta(rows={"tables.0.weight": (torch.tensor([204]), torch.zeros(1, 8))}),
            "span 204..204",
        ),
        (lambda: WeightsDelta(rows={"tables.0.weight": (torch.tensor([3, 3]), torch.zeros(2, 8))}), "repeat"),
        (lambda: WeightsDelta(rows={"tables.0.weight": (torch.tensor([3]), torch.zeros(2, 8))}), "is (2, 8)"),
        (lambda: WeightsDelta(rows={"top.0.bias": (torch.tensor([[1]]), torch.zeros(1))}), "1-D int64"),
    ],
)
def test_a_delta_that_does_not_fit_is_refused_naming_the_entry(
    dlrm_variant: codesign.Variant, delta: Callable[[], WeightsDelta], message: str
) -> None:
    with pytest.raises(WeightsError) as err:
        apply_delta(dlrm_variant, delta())
    assert message in str(err.value)


def test_a_delta_file_is_read_only_with_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "delta.pt"
    sha = WeightsDelta(tensors={"w": torch.ones(2)}).save(path)
    assert WeightsDelta.read(path, sha).tensors["w"].tolist() == [1.0, 1.0]
    with pytest.raises(WeightsError, match="does not hash to"):
        WeightsDelta.read(path, "0" * 64)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02 not a pickle")
    with pytest.raises(WeightsError, match="does not hash to"):  # the hash is checked before anything is read
        WeightsDelta.read(garbage, sha)
    with pytest.raises(WeightsError, match="not a regular file"):
        WeightsDelta.read("/dev/zero", sha)
    with pytest.raises(WeightsError, match="64 hex digits"):
        WeightsDelta.read(path, sha[:10])
    other = tmp_path / "other.pt"
    torch.save({"w": torch.ones(2)}, other)
    import hashlib

    with pytest.raises(WeightsError, match="not a weight delta file"):
        WeightsDelta.read(other, hashlib.sha256(other.read_bytes()).hexdigest())
    torch.save({"format": "codesign-weights-delta/1", "tensors": {}, "rows": {"t": torch.zeros(2, 3)}}, other)
    with pytest.raises(WeightsError, match=r"not \(row ids, rows\) pairs"):
        WeightsDelta.read(other, hashlib.sha256(other.read_bytes()).hexdigest())
    with pytest.raises(WeightsError, match="empty"):
        WeightsDelta()


def test_a_backend_that_keeps_its_own_weights_is_refused(dlrm_variant: codesign.Variant) -> None:
    engine = dataclasses.replace(
        dlrm_variant, backend=get_backend("tensorrt")
    )  # its engine holds the weights
    with pytest.raises(WeightsError, match="keeps the weights it was built with"):
        apply_delta(engine, WeightsDelta(tensors={"top.0.bias": torch.zeros(32)}))


def test_a_weight_that_passes_rewrote_is_refused_with_the_way_out(useq_variant: codesign.Variant) -> None:
    # constant folding turns `position[-keep:]` into a new weight: `position` is no longer read
    assert "position" not in weight_names(useq_variant)
    with pytest.raises(WeightsError, match="new bundle compiled from the new weights"):
        apply_delta(useq_variant, WeightsDelta(tensors={"position": torch.zeros(8, 16)}))


class TwoUses(torch.nn.Module):
    """One weight read as it is and, through `w * 2`, as a constant that folding computes from it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 6))

    def forward(self, user: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.functional.linear
        return linear(user, self.w).sum(-1) + linear(cand, self.w * 2).sum(-1)


def two_uses() -> Workload:
    def make_batch(candidates: list[int], seed: int) -> codesign.RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.tensor(candidates)
        user = torch.randn(len(candidates), 6, generator=g).repeat_interleave(counts, 0)
        cand = torch.randn(int(counts.sum()), 6, generator=g)
        return codesign.RequestBatch({"user": user, "cand": cand}, codesign.offsets_from_counts(counts))

    spec = codesign.RequestSpec(request_inputs=("user",))
    return Workload("two_uses", TwoUses().eval(), spec, make_batch)


def test_a_weight_that_also_feeds_a_derived_weight_is_refused() -> None:
    variant = codesign.compile(two_uses(), target="host", backend="eager")
    assert "w" in weight_names(variant)  # still read as it is
    assert ["w"] in variant.derived_weights.values()  # and folded into `w * 2`
    with pytest.raises(WeightsError, match=r"passes computed \['_folded_mul'\] from weight 'w'"):
        apply_delta(variant, WeightsDelta(tensors={"w": torch.zeros(4, 6)}))
    unrecorded = dataclasses.replace(variant, derived_weights=None)  # a bundle from before the record
    with pytest.raises(WeightsError, match="does not record which weights"):
        apply_delta(unrecorded, WeightsDelta(tensors={"w": torch.zeros(4, 6)}))


# ---- the runtime: versions ----------------------------------------------------------------------
def gate(variant: codesign.Variant) -> threading.Event:
    """Hold the variant's first call until the event is set (the request is then in flight)."""
    release, inner, calls = threading.Event(), variant.runner, [0]

    def run(*args: Any, **inputs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            assert release.wait(60)
        return inner(*args, **inputs)

    variant.runner = run
    return release


def item_rows(tmp_path: Path, seed: int) -> tuple[Path, str, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(0, 500, 3)
    rows = {"item.weight": (ids, torch.randn(ids.numel(), 16, generator=g))}
    path = tmp_path / f"delta-{seed}.pt"
    return path, WeightsDelta(rows=rows).save(path), rows


def test_requests_finish_on_the_version_they_were_admitted_on_and_new_ones_see_the_update(
    useq_variant: codesign.Variant, tmp_path: Path
) -> None:
    w = workload("useq")
    served = copy.copy(useq_variant)  # its runner gets the gate; the module fixture's does not
    bundle = Bundle.build({"full": served}, candidates=(8,), requests=(1,), repeats=1)
    rt = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0, max_requests=16, warmup_calls=1))
    try:
        release = gate(served)
        batches = [w.make_batch([n], seed=s) for n, s in ((6, 1), (3, 2), (7, 3))]
        first = rt.admit(rt.schema.encode(batches[0]))  # scored at once, held in the model call
        second = rt.admit(rt.schema.encode(batches[1]))  # queued behind it
        path, sha, rows = item_rows(tmp_path, seed=5)
        assert rt.update_weights(delta=path, sha256=sha)["version"] == "v2"
        third = rt.admit(rt.schema.encode(batches[2]))
        release.set()
        answers = []
        for ticket in (first, second, third):
            assert ticket.wait(60)
            answers.append(rt.answer(ticket))
        new_model = updated_model(w, {}, rows)
        for answer, batch, version, model in zip(
            answers, batches, ("v1", "v1", "v2"), (w.model, w.model, new_model), strict=True
        ):
            assert answer["weights_version"] == version
            torch.testing.assert_close(
                torch.tensor(answer["scores"]), scores(model, batch), rtol=TOL, atol=TOL
            )
        assert (scores(new_model, batches[2]) - scores(w.model, batches[2])).abs().max() > 1e-3
        assert rt.weights()["previous"]["version"] == "v1"
        assert "codesign_weights_version 2" in rt.metrics.render().splitlines()
    finally:
        rt.close()


def test_rollback_restores_the_previous_version_and_a_refused_update_changes_nothing(
    useq_variant: codesign.Variant, tmp_path: Path
) -> None:
    w = workload("useq")
    bundle = Bundle.build({"full": useq_variant}, candidates=(8,), requests=(1,), repeats=1)
    rt = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0, warmup_calls=1))
    batch = w.make_batch([5], seed=9)
    body = rt.schema.encode(batch)
    try:
        with pytest.raises(WeightsError, match="no previous weights version"):
            rt.rollback()
        bad = tmp_path / "bad.pt"
        bad_sha = WeightsDelta(rows={"item.weight": (torch.tensor([1]), torch.zeros(1, 15))}).save(bad)
        with pytest.raises(WeightsError, match=r"is \(1, 15\)"):
            rt.update_weights(delta=bad, sha256=bad_sha)
        with pytest.raises(WeightsError, match="needs its sha256"):
            rt.update_weights(delta=bad)
        assert rt.weights()["current"]["version"] == "v1" and rt.weights()["previous"] is None
        assert rt.score_json(body)["weights_version"] == "v1"

        path, sha, rows = item_rows(tmp_path, seed=6)
        rt.update_weights(delta=path, sha256=sha)
        updated = scores(updated_model(w, {}, rows), batch)
        got = rt.score_json(body)
        assert got["weights_version"] == "v2"
        torch.testing.assert_close(torch.tensor(got["scores"]), updated, rtol=TOL, atol=TOL)
        assert rt.rollback()["version"] == "v1"
        got = rt.score_json(body)
        assert got["weights_version"] == "v1"
        torch.testing.assert_close(torch.tensor(got["scores"]), scores(w.model, batch), rtol=TOL, atol=TOL)
        assert rt.rollback()["version"] == "v2"  # and forward again
        torch.testing.assert_close(torch.tensor(rt.score_json(body)["scores"]), updated, rtol=TOL, atol=TOL)
    finally:
        rt.close()


def test_a_new_bundle_of_the_same_variants_replaces_the_weights_and_another_model_is_refused(
    useq_variant: codesign.Variant, dlrm_variant: codesign.Variant, tmp_path: Path
) -> None:
    retrained = workload("useq", seed=1)  # same model, other weights
    fresh = codesign.compile(retrained, target="host", backend="eager")
    fresh.save(tmp_path / "retrained", verify="in_process")
    assert (
        codesign.load(tmp_path / "retrained").derived_weights
        == fresh.derived_weights
        == {"_folded_slice_1": ["position"]}
    )
    dlrm_variant.save(tmp_path / "dlrm", verify="in_process")
    bigger = {path: {k: 2 * v for k, v in cols.items()} for path, cols in fresh.id_bounds.items()}
    dataclasses.replace(fresh, id_bounds=bigger).save(tmp_path / "bigger", verify="in_process")
    bundle = Bundle.build({useq_variant.name: useq_variant}, candidates=(8,), requests=(1,), repeats=1)
    rt = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0, warmup_calls=1))
    batch = retrained.make_batch([4, 2][:1], seed=2)
    body = rt.schema.encode(batch)
    try:
        with pytest.raises(WeightsError, match="holds variants"):
            rt.update_weights(bundle=tmp_path / "dlrm")
        with pytest.raises(WeightsError, match="does not load"):
            rt.update_weights(bundle=tmp_path / "missing")
        with pytest.raises(
            WeightsError, match="other table sizes"
        ):  # ids are checked against the served tables
            rt.update_weights(bundle=tmp_path / "bigger")
        record = rt.update_weights(bundle=tmp_path / "retrained")
        assert (
            record["version"] == "v2"
            and record["source"] == "bundle retrained"
            and len(record["sha256"]) == 64
        )
        got = rt.score_json(body)
        torch.testing.assert_close(
            torch.tensor(got["scores"]), scores(retrained.model, batch), rtol=TOL, atol=TOL
        )
        assert (scores(retrained.model, batch) - scores(workload("useq").model, batch)).abs().max() > 1e-3
    finally:
        rt.close()


# ---- over HTTP ----------------------------------------------------------------------------------
def call(srv: Server, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_admin_endpoints_update_and_roll_back_only_with_an_admin_token(
    useq_variant: codesign.Variant, tmp_path: Path
) -> None:
    w = workload("useq")
    batch = w.make_batch([6], seed=8)
    bundle = Bundle.build({"full": useq_variant}, candidates=(8,), requests=(1,), repeats=1)
    path, sha, rows = item_rows(tmp_path, seed=7)
    update = {"delta": str(path), "sha256": sha}
    rt = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0, warmup_calls=1))
    with Server(rt, port=0, config=ServerConfig()) as srv:  # no admin token: updates are off
        assert call(srv, "POST", "/v2/admin/weights", update, token=ADMIN)[0] == 403
    rt = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0, warmup_calls=1))
    with Server(rt, port=0, config=ServerConfig(admin_tokens=(ADMIN,))) as srv:  # scoring open, updates not
        assert call(srv, "POST", "/v1/score", rt.schema.encode(batch))[0] == 200
        assert call(srv, "GET", "/v2/admin/weights")[0] == 401
        assert call(srv, "GET", "/v2/admin/weights", token=ADMIN)[0] == 200
    rt = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0, warmup_calls=1))
    with Server(rt, port=0, config=ServerConfig(auth_tokens=("user",), admin_tokens=(ADMIN,))) as srv:
        body = rt.schema.encode(batch)
        assert call(srv, "POST", "/v2/admin/weights", update, token="user")[0] == 401
        assert call(srv, "POST", "/v2/admin/weights", update)[0] == 401  # no token at all
        status, got = call(
            srv, "POST", "/v2/admin/weights", {"delta": str(path), "sha256": "0" * 64}, token=ADMIN
        )
        assert status == 422 and "does not hash to" in got["error"]
        assert call(srv, "POST", "/v2/admin/weights", {"path": "x"}, token=ADMIN)[0] == 400
        status, got = call(srv, "POST", "/v2/admin/weights", update, token=ADMIN)
        assert status == 200 and got["version"] == "v2" and got["sha256"] == sha
        status, scored = call(srv, "POST", "/v1/score", body, token="user")
        assert status == 200 and scored["weights_version"] == "v2"
        want = scores(updated_model(w, {}, rows), batch)
        torch.testing.assert_close(torch.tensor(scored["scores"]), want, rtol=TOL, atol=TOL)
        status, state = call(srv, "GET", "/v2/admin/weights", token=ADMIN)
        assert status == 200 and state["current"]["version"] == "v2" and state["previous"]["version"] == "v1"
        assert call(srv, "POST", "/v2/admin/weights/rollback", token=ADMIN) == (200, {**state["previous"]})
        assert call(srv, "POST", "/v1/score", body, token=ADMIN)[1]["weights_version"] == "v1"
