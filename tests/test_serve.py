"""Multi-variant bundles and the HTTP server, driven over loopback with real useq variants.

Scores are checked against the eager PyTorch model of each variant; malformed requests must get a
400 naming the field while the server keeps serving; a variant that fails to load or raises at
run time leaves rotation and its traffic falls back to the next best variant.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import codesign
from codesign.errors import BundleError, RequestError
from codesign.ir.workload import Workload
from codesign.serving.deployment import Bundle, load_bundle
from codesign.serving.http import Server
from codesign.serving.router import BudgetedPolicy, FeatureConfig, RulesPolicy
from codesign.serving.runtime import BatchingConfig, Runtime
from codesign.serving.wire import RequestSchema

VARIANTS = {"full": {}, "short": {"keep": 4, "depth": 1}, "tiny": {"keep": 2, "depth": 0}}
# eager variants of the same fp32 graph; batching changes only the row count of each GEMM
SCORE_TOLERANCE = 1e-5


def workload(name: str) -> Workload:
    return codesign.load_model_ref("useq", size="tiny", **VARIANTS[name])


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    variants = {name: codesign.compile(workload(name), target="host", backend="eager") for name in VARIANTS}
    bundle = Bundle.build(
        variants,
        policy=BudgetedPolicy(default_budget_ms=100.0),
        features=FeatureConfig(history_input="history"),
        quality_reference="full",
        candidates=(8, 64),
        requests=(1, 4),
        repeats=1,
    )
    return bundle.save(tmp_path_factory.mktemp("bundles") / "useq", verify="in_process")


@pytest.fixture(scope="module")
def server(bundle_dir: Path) -> Iterator[Server]:
    runtime = Runtime(load_bundle(bundle_dir), batching=BatchingConfig(max_delay_ms=20.0))
    with Server(runtime, port=0) as srv:
        yield srv


def request(
    server: Server, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(data) if ctype.startswith("application/json") else data.decode()


def eager_scores(name: str, batch: codesign.RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return workload(name).model(**batch.inputs).reshape(-1)


def schema(bundle_dir: Path) -> RequestSchema:
    return load_bundle(bundle_dir).schema()


# ---- bundles ------------------------------------------------------------------------------------
def test_bundle_round_trip_keeps_profiles_policy_and_scores(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert list(bundle.variants) == list(VARIANTS) and not bundle.failed
    assert bundle.policy == BudgetedPolicy(default_budget_ms=100.0)
    assert bundle.features.history_input == "history"
    full, tiny = bundle.profiles["full"], bundle.profiles["tiny"]
    assert full.quality_source == "quality reference" and full.quality_loss_pct == 0.0
    assert "vs 'full'" in tiny.quality_source and tiny.quality_loss_pct >= 0
    assert full.latency.source == "measured on host" and full.latency.requests == (1, 4)
    assert all(s > 0 for row in full.latency.seconds for s in row)
    batch = workload("full").make_batch([5, 2], seed=3)
    for name, v in bundle.variants.items():
        got = v.score(batch).reshape(-1)
        assert (got - eager_scores(name, batch)).abs().max() <= SCORE_TOLERANCE
    with pytest.raises(BundleError, match="multi-variant bundle"):
        codesign.load(bundle_dir)


def test_bundle_refuses_variants_with_other_inputs(bundle_dir: Path) -> None:
    useq = load_bundle(bundle_dir).variants["full"]
    din = codesign.compile(codesign.load_model_ref("din", size="tiny"), target="host", backend="eager")
    with pytest.raises(BundleError, match="variant 'din' takes other inputs than 'useq'"):
        Bundle.build({"useq": useq, "din": din}, repeats=1, candidates=(8,), requests=(1,))
    with pytest.raises(BundleError, match="not a safe folder name"):
        Bundle.build({"../x": useq})


def test_tampered_variant_is_left_out_and_the_rest_serve(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    program = copy / "variants" / "full" / "program.pt2"
    program.write_bytes(program.read_bytes()[:-10] + b"0123456789")
    bundle = load_bundle(copy)
    assert list(bundle.variants) == ["short", "tiny"]
    assert "sha256" in bundle.failed["full"]
    router = bundle.router()
    assert router.down == {"full": bundle.failed["full"]}
    runtime = Runtime(bundle)
    try:
        body = bundle.schema().encode(workload("full").make_batch([3], seed=1))
        reply = runtime.score_json(body)
        assert reply["variant"] == runtime.router.available[0] != "full"
        assert "out of rotation: full" in reply["decision"]["explanation"]
        assert 'codesign_variant_up{variant="full"} 0' in runtime.metrics.render()
        assert runtime.health()["variants"]["full"].startswith("down: ")
    finally:
        runtime.close()
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy, strict=True)
    (copy / "router.json").write_text((copy / "router.json").read_text().replace("100.0", "5.0"))
    with pytest.raises(BundleError, match=r"router\.json is missing or does not match"):
        load_bundle(copy)


# ---- serving over HTTP ----------------------------------------------------------------------------
def test_scores_over_http_match_eager_for_every_variant(server: Server, bundle_dir: Path) -> None:
    sch = schema(bundle_dir)
    for seed, name in enumerate(VARIANTS):
        batch = workload("full").make_batch([7], seed=10 + seed)
        status, reply = request(server, "POST", "/v1/score", sch.encode(batch, context={"variant": name}))
        assert status == 200, reply
        assert reply["variant"] == name and reply["decision"]["kind"] == "forced"
        got = torch.tensor(reply["scores"])
        assert got.shape == (7,) and (got - eager_scores(name, batch)).abs().max() <= SCORE_TOLERANCE
    batch = workload("full").make_batch([4], seed=99)
    status, reply = request(server, "POST", "/v1/score", sch.encode(batch, context={"request_id": "r-1"}))
    assert status == 200 and reply["request_id"] == "r-1"
    assert reply["variant"] == "full" and "best quality predicted to fit" in reply["decision"]["explanation"]


def test_concurrent_requests_are_batched_and_scored_right(server: Server, bundle_dir: Path) -> None:
    sch = schema(bundle_dir)
    batches = [workload("full").make_batch([1 + i % 5], seed=200 + i) for i in range(12)]
    replies: list[Any] = [None] * len(batches)

    def send(i: int) -> None:
        replies[i] = request(server, "POST", "/v1/score", sch.encode(batches[i], context={"variant": "full"}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for batch, (status, reply) in zip(batches, replies, strict=True):
        assert status == 200, reply
        got = torch.tensor(reply["scores"]).reshape(-1)
        assert (got - eager_scores("full", batch)).abs().max() <= SCORE_TOLERANCE
    # 12 requests arriving together with a 20 ms batching window share batches
    assert max(reply["batch_requests"] for _, reply in replies) > 1


def _bad_requests(sch: RequestSchema) -> list[tuple[str, Any, str]]:
    good = sch.encode(workload("full").make_batch([3], seed=5))

    def edit(section: str, key: str, value: Any) -> dict[str, Any]:
        body = json.loads(json.dumps(good))
        body[section][key] = value
        return body

    return [
        ("not an object", [1, 2], "must be a JSON object"),
        ("missing field", {"user": good["user"], "candidates": {"cand_item": [1]}}, "lacks ['cand_dense']"),
        ("unknown field", edit("candidates", "price", [1, 2, 3]), "unknown fields ['price']"),
        ("unknown top-level key", {**good, "extra": 1}, "unknown top-level keys"),
        (
            "wrong row width",
            edit("candidates", "cand_dense", [[0.0] * 7] * 3),
            "cand_dense'] has shape [3, 7], expected [3, 8]",
        ),
        ("ragged rows", edit("candidates", "cand_dense", [[0.0] * 8, [0.0] * 8, [0.0]]), "rectangular"),
        ("count mismatch", edit("candidates", "cand_item", [1, 2]), "disagree on the number of candidates"),
        (
            "unknown item id",
            edit("candidates", "cand_item", [1, 2, 10**6]),
            "cand_item'] holds id 1e+06, outside",
        ),
        ("negative id", edit("user", "history", [-1] * 8), "holds id -1"),
        ("fractional id", edit("candidates", "cand_item", [1.5, 2, 3]), "integer ids"),
        ("strings", edit("user", "user_dense", ["a"] * 16), "must hold numbers"),
        (
            "no candidates",
            {"user": good["user"], "candidates": {"cand_item": [], "cand_dense": []}},
            "no candidates",
        ),
        ("bad budget", {**good, "context": {"budget_ms": -3}}, "budget_ms must be a non-negative number"),
        ("unknown context key", {**good, "context": {"deadline": 3}}, "unknown keys ['deadline']"),
        ("unknown variant", {**good, "context": {"variant": "medium"}}, "unknown variant 'medium'"),
        ("variant not a name", {**good, "context": {"variant": ["full"]}}, "unknown variant ['full']"),
    ]


def test_malformed_requests_get_specific_400s_and_the_server_keeps_serving(
    server: Server, bundle_dir: Path
) -> None:
    sch = schema(bundle_dir)
    for label, body, needle in _bad_requests(sch):
        status, reply = request(server, "POST", "/v1/score", body)
        assert status == 400, (label, reply)
        assert needle in reply["error"], (label, reply)
    status, reply = request(server, "POST", "/v1/score", raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"] and "fix" in reply
    status, _ = request(server, "GET", "/nowhere")
    assert status == 404
    status, health = request(server, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    batch = workload("full").make_batch([2], seed=7)
    status, reply = request(server, "POST", "/v1/score", sch.encode(batch))
    assert status == 200 and len(reply["scores"]) == 2


def test_schema_and_metrics_endpoints(server: Server, bundle_dir: Path) -> None:
    status, described = request(server, "GET", "/v1/schema")
    assert status == 200
    assert [f["key"] for f in described["user"]] == ["history", "actions", "user_dense"]
    assert {
        "key": "cand_dense",
        "section": "candidates",
        "input": "cand_dense",
        "dtype": "float32",
        "shape": [8],
    } in described["candidates"]
    request(server, "POST", "/v1/score", schema(bundle_dir).encode(workload("full").make_batch([3], seed=8)))
    status, text = request(server, "GET", "/metrics")
    assert status == 200
    for needle in (
        "# TYPE codesign_request_latency_seconds histogram",
        'codesign_request_latency_seconds_bucket{variant="full",le="+Inf"}',
        'codesign_requests_total{status="ok",variant="full"}',
        'codesign_routing_decisions_total{kind="fits",policy="budgeted",variant="full"}',
        'codesign_errors_total{kind="bad_request"}',
        'codesign_variant_up{variant="tiny"} 1',
        "codesign_queue_depth",
    ):
        assert needle in text, needle


def test_variant_that_raises_is_taken_out_and_traffic_falls_back(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    # no half-open probe within the test (test_serving_reliability covers recovery)
    batching = BatchingConfig(probe_interval_s=600.0, probe_max_interval_s=600.0)
    runtime = Runtime(bundle, policy=RulesPolicy((), default="full"), batching=batching)
    calls = {"n": 0}

    def broken(**inputs: Any) -> Any:  # fault injection: the device fails after the variant warmed up
        calls["n"] += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    bundle.variants["full"].runner = broken
    sch = bundle.schema()
    next_best = runtime.router.by_quality[1]  # the better of short / tiny by measured NE change
    with Server(runtime, port=0) as srv:
        batch = workload("full").make_batch([6], seed=11)
        status, reply = request(srv, "POST", "/v1/score", sch.encode(batch))
        assert status == 200, reply
        assert reply["variant"] == next_best and reply["decision"]["kind"] == "fallback"
        assert "fell back from 'full'" in reply["decision"]["explanation"]
        got = torch.tensor(reply["scores"])
        assert (got - eager_scores(next_best, batch)).abs().max() <= SCORE_TOLERANCE
        status, reply = request(srv, "POST", "/v1/score", sch.encode(batch))  # no second try on 'full'
        # 'full' ran twice, then never again: the batch, and the health probe on its reference batch
        assert status == 200 and reply["variant"] == next_best and calls["n"] == 2
        status, health = request(srv, "GET", "/healthz")
        # the state, not the exception text (that went to the log)
        assert (
            status == 200
            and health["variants"]["full"] == "down: failed a batch and then its reference batch"
        )
        assert "illegal" not in json.dumps(health)
        _, text = request(srv, "GET", "/metrics")
        assert 'codesign_variant_up{variant="full"} 0' in text
        assert 'codesign_variant_failures_total{stage="run",variant="full"} 1' in text
        for name in ("short", "tiny"):
            runtime.router.mark_down(name, "test")
        status, reply = request(srv, "POST", "/v1/score", sch.encode(batch))
        assert status == 503 and "no variant is in rotation" in reply["error"]
        status, _ = request(srv, "GET", "/healthz")
        assert status == 503


def test_history_length_feature_drives_rules(bundle_dir: Path) -> None:
    from codesign.serving.router import Rule

    bundle = load_bundle(bundle_dir)
    policy = RulesPolicy((Rule("tiny", {"history_length": ("<", 4)}, name="cold users"),), default="full")
    runtime = Runtime(bundle, policy=policy, batching=BatchingConfig(max_delay_ms=0.0))
    try:
        sch = bundle.schema()
        body = sch.encode(workload("full").make_batch([2], seed=12))
        body["user"]["history"] = [0, 0, 0, 0, 0, 0, 17, 42]  # padding id 0: two real items
        reply = runtime.score_json(body)
        assert reply["variant"] == "tiny" and "cold users" in reply["decision"]["explanation"]
        body["context"] = {"history_length": 100}  # a client-sent feature wins over the derived one
        assert runtime.score_json(body)["variant"] == "full"
        with pytest.raises(RequestError, match="history_length must be an integer"):
            runtime.score_json({**body, "context": {"history_length": 2.5}})
    finally:
        runtime.close()


def test_cli_bundle_and_serve(bundle_dir: Path, tmp_path: Path) -> None:
    from codesign.cli import main

    out = tmp_path / "two"
    args = [
        "bundle",
        str(out),
        "--variant",
        f"full={bundle_dir}/variants/full",
        "--variant",
        f"tiny={bundle_dir}/variants/tiny",
        "--verify",
        "in_process",  # the fresh-process proof has its own tests (test_bundle, test_cli compile)
    ]
    assert (
        main(
            [
                *args,
                "--quality-reference",
                "full",
                "--repeats",
                "1",
                "--policy",
                "budgeted",
                "--budget-ms",
                "40",
            ]
        )
        == 0
    )
    assert list(load_bundle(out).variants) == ["full", "tiny"]
    assert load_bundle(out).policy == BudgetedPolicy(default_budget_ms=40.0)
    assert main(["bundle", str(tmp_path / "bad"), "--variant", "oops"]) == 2
    proc = subprocess.Popen(
        [sys.executable, "-m", "codesign.cli", "serve", str(out), "--port", "0", "--policy", "fixed:tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = ""
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline and not url:
            line = proc.stdout.readline()
            if not line:
                break
            if "serving" in line and "http://" in line:
                url = line.split("http://", 1)[1].split()[0].rstrip(";")
        assert url, "codesign serve did not report its address"
        host, port = url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = load_bundle(out).schema().encode(workload("full").make_batch([3], seed=1))
        conn.request("POST", "/v1/score", body=json.dumps(body))
        reply = json.loads(conn.getresponse().read())
        assert reply["variant"] == "tiny" and len(reply["scores"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # a search plus one compile per chosen trial (~20 s)
def test_bundle_from_search_compiles_the_chosen_trials(tmp_path: Path) -> None:
    from codesign.backends import get_backend
    from codesign.cli import main
    from codesign.passes import CommonSubexpressionElimination, RequestSharing
    from codesign.search import SearchResult
    from codesign.search.result import TrialRecord
    from codesign.search.space import TrialConfig

    shared = TrialConfig((RequestSharing(), CommonSubexpressionElimination()), get_backend("eager"), None)
    plain = TrialConfig((CommonSubexpressionElimination(),), get_backend("eager"), 4)
    trials = [
        TrialRecord(0, "COMPLETE", {}, (2.0, 0.0, 30.0), (-1.0, -1.0, -1.0), shared.to_dict()),
        TrialRecord(1, "COMPLETE", {}, (1.0, 0.05, 40.0), (-1.0, -1.0, -1.0), plain.to_dict()),
        TrialRecord(2, "PRUNED", {}, None, None, None, reason="hopeless"),
    ]
    result = SearchResult("useq-host", ":memory:", "host", "measured on host", {}, trials)
    kwargs: dict[str, Any] = {"candidates": (8,), "requests": (1,), "repeats": 1}
    bundle = Bundle.from_search(result, workload("full"), k=2, **kwargs)
    assert sorted(bundle.variants) == ["best+small", "fast"]
    fast, best = bundle.profiles["fast"], bundle.profiles["best+small"]
    assert (fast.quality_loss_pct, fast.quality_source, fast.labels) == (0.05, "given", ("fast", "trial-1"))
    assert best.quality_loss_pct == 0.0
    assert bundle.variants["fast"].micro_batch == 4  # the trial's serving knob travels with the variant
    assert [p["name"] for p in bundle.variants["best+small"].passes][:1] == ["request_sharing"]
    batch = workload("full").make_batch([3, 9], seed=4)
    for v in bundle.variants.values():
        assert (v.score(batch).reshape(-1) - eager_scores("full", batch)).abs().max() <= SCORE_TOLERANCE
    saved = result.save(tmp_path / "result.json")
    out = tmp_path / "from-search"
    assert (
        main(
            ["bundle", str(out), "--from-search", str(saved), "--model", "useq", "--size", "tiny", "--k", "2"]
        )
        == 0
    )
    assert sorted(load_bundle(out).variants) == ["best+small", "fast"]


def test_a_request_the_model_cannot_score_fails_alone_and_the_variant_stays_up(tmp_path: Path) -> None:
    """zoo deepfm looks ids up at ``x[:, sparse] + field offsets`` (no id bound can be read off the graph),
    so an id past the shared table reaches the model and raises. That request gets a 400; the request
    batched with it is scored; the variant stays in rotation."""
    from tests.zoo import ZOO, deepfm

    w = ZOO["deepfm"]()
    variant = codesign.compile(w, target="host", backend="eager", passes=[])
    assert variant.id_bounds == {}
    bundle = Bundle.build({"only": variant}, candidates=(8,), requests=(1,), repeats=1)
    runtime = Runtime(bundle, batching=BatchingConfig(max_delay_ms=300.0))
    sch = bundle.schema()
    good = sch.encode(w.make_batch([5], seed=3))
    bad = sch.encode(w.make_batch([4], seed=4))
    field = next(f for f in sch.fields if f.section == "candidates" and f.key == "x")
    bad["candidates"]["x"][1][field.columns.index(deepfm.SPARSE_IDX[-1])] = 10**6
    results: dict[str, Any] = {}
    isolated: list[int] = []
    isolate = runtime._isolate

    def spy(name: str, v: Any, jobs: list[Any], exc: Exception) -> None:
        isolated.append(len(jobs))
        isolate(name, v, jobs, exc)

    runtime._isolate = spy  # type: ignore[method-assign]  # records the failed batch's size

    def send(label: str, body: dict[str, Any]) -> None:
        try:
            results[label] = runtime.score_json(body)
        except RequestError as exc:
            results[label] = exc

    threads = [threading.Thread(target=send, args=(k, b)) for k, b in (("bad", bad), ("good", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["bad"], RequestError), results["bad"]
    assert "could not score this request" in results["bad"].message
    assert results["good"]["variant"] == "only" and len(results["good"]["scores"]) == 5
    assert isolated == [2]  # the two were batched; the batch failed and each was scored alone
    assert runtime.router.down == {}
    assert runtime.score_json(good)["scores"] == results["good"]["scores"]
    runtime.close()
