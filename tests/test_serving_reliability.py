"""The serving stack under load, faults and hostile input: each case asserts its outcome.

A real useq (tiny, eager) bundle behind the real HTTP stack (uvicorn + Starlette) on loopback.
Faults are injected where a device would fail: a variant's runner made slow, raising, flaky or
numerically wrong; clients are raw sockets (for what a well-behaved client library cannot send) and
the real ``tritonclient`` HTTP client for the Open Inference Protocol. Scores are compared with the
eager PyTorch model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import codesign
from codesign.errors import BundleError
from codesign.ir.workload import Workload
from codesign.serving.deployment import Bundle, load_bundle
from codesign.serving.http import Server, ServerConfig
from codesign.serving.runtime import BatchingConfig, Runtime

TOL = 1e-5
TOKEN = "s3cret-token"


def useq() -> Workload:
    return codesign.load_model_ref("useq", size="tiny")


@pytest.fixture(scope="module")
def variant() -> codesign.Variant:
    return codesign.compile(useq(), target="host", backend="eager")


def make_bundle(variant: codesign.Variant, **more: codesign.Variant) -> Bundle:
    return Bundle.build({"full": variant, **more}, candidates=(8, 64), requests=(1,), repeats=1)


def eager(batch: codesign.RequestBatch) -> torch.Tensor:
    with torch.no_grad():
        return useq().model(**batch.inputs).reshape(-1)


@contextlib.contextmanager
def serving(
    bundle: Bundle, batching: BatchingConfig | None = None, **config: Any
) -> Iterator[tuple[Server, Runtime]]:
    runtime = Runtime(bundle, batching=batching or BatchingConfig(max_delay_ms=2.0))
    with Server(runtime, port=0, config=ServerConfig(**config)) as srv:
        yield srv, runtime


def address(srv: Server) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def call(
    srv: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(*address(srv), timeout=60)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    is_json = hdrs.get("content-type", "").startswith("application/json") and data
    parsed = json.loads(data) if is_json else data
    return resp.status, hdrs, parsed


def raw(srv: Server, payload: bytes, wait_s: float = 10.0) -> bytes:
    """What the server answers to raw bytes, until it closes the connection or ``wait_s`` passes."""
    with socket.create_connection(address(srv), timeout=wait_s) as s:
        s.sendall(payload)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
    return got


def slow_runner(v: codesign.Variant, seconds_per_row: float, floor_s: float = 0.0) -> Callable[..., Any]:
    inner = v.runner

    def run(*args: Any, **inputs: Any) -> Any:
        rows = next(t.shape[0] for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() > 1)
        time.sleep(floor_s + seconds_per_row * rows)
        return inner(*args, **inputs)

    return run


def body_for(bundle: Bundle, n: int, seed: int, **context: Any) -> tuple[dict[str, Any], torch.Tensor]:
    batch = useq().make_batch([n], seed=seed)
    return bundle.schema().encode(batch, context=context or None), eager(batch)


# ---- the Open Inference Protocol, with the real client ----------------------------------------------
def test_tritonclient_scores_over_the_open_inference_protocol(variant: codesign.Variant) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    bundle = make_bundle(variant)
    with serving(bundle, model_name="ranker") as (srv, _):
        client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ranker")
        meta = client.get_model_metadata("ranker")
        assert [i["name"] for i in meta["inputs"]] == [
            "history",
            "actions",
            "user_dense",
            "cand_item",
            "cand_dense",
        ]
        assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1]}]
        body, want = body_for(bundle, 9, seed=3)
        for binary in (True, False):
            inputs = []
            for spec in meta["inputs"]:
                section = "user" if spec["shape"][0] == 1 else "candidates"
                arr = np.asarray(
                    body[section][spec["name"]], dtype=np.int64 if spec["datatype"] == "INT64" else np.float32
                )
                arr = arr[None] if section == "user" else arr
                tensor = triton.InferInput(spec["name"], list(arr.shape), spec["datatype"])
                tensor.set_data_from_numpy(arr, binary_data=binary)
                inputs.append(tensor)
            out = [triton.InferRequestedOutput("scores", binary_data=binary)]
            result = client.infer(
                "ranker", inputs, outputs=out, request_id=f"r-{binary}", parameters={"budget_ms": 500}
            )
            got = torch.tensor(result.as_numpy("scores"))
            assert got.shape == (9,) and (got - want).abs().max() <= TOL
            reply = result.get_response()
            assert reply["id"] == f"r-{binary}" and reply["parameters"]["variant"] == "full"
        with pytest.raises(InferenceServerException, match="unknown model 'other'"):
            client.infer("other", inputs)
        with pytest.raises(
            InferenceServerException, match=r"input 'cand_dense' has shape|cand_dense'\] has shape"
        ):
            bad = triton.InferInput("cand_dense", [9, 3], "FP32")
            bad.set_data_from_numpy(np.zeros((9, 3), np.float32))
            client.infer("ranker", [*inputs[:4], bad])
        client.close()


def test_open_inference_protocol_takes_id_bags_as_ids_and_lengths() -> None:
    dlrm = codesign.load_model_ref("dlrm", size="tiny")
    v = codesign.compile(dlrm, target="host", backend="eager")
    bundle = Bundle.build({"dlrm": v}, candidates=(8,), requests=(1,), repeats=1)
    batch = dlrm.make_batch([5], seed=2)
    with torch.no_grad():
        want = dlrm.model(**batch.inputs).reshape(-1)
    body = bundle.schema().encode(batch)
    with serving(bundle) as (srv, _):
        _, _, meta = call(srv, "GET", "/v2/models/codesign")
        names = {i["name"]: i for i in meta["inputs"]}
        inputs = []
        for f in bundle.schema().fields:
            value = body[f.section][f.key]
            dt = names[f.key]["datatype"]
            if f.jagged and f.section == "candidates":
                flat = [x for bag in value for x in bag]
                inputs.append({"name": f.key, "datatype": dt, "shape": [len(flat)], "data": flat})
                lengths = [len(bag) for bag in value]
                inputs.append(
                    {"name": f"{f.key}.lengths", "datatype": "INT64", "shape": [5], "data": lengths}
                )
            else:
                arr = np.asarray(value)
                shape = [1, *arr.shape] if f.section == "user" and not f.jagged else list(arr.shape)
                inputs.append(
                    {"name": f.key, "datatype": dt, "shape": shape, "data": arr.reshape(-1).tolist()}
                )
        assert any(i["name"].endswith(".lengths") for i in inputs)  # the model has per-candidate bags
        status, _, reply = call(srv, "POST", "/v2/models/codesign/infer", {"inputs": inputs})
        assert status == 200, reply
        got = torch.tensor(reply["outputs"][0]["data"])
        assert (got - want).abs().max() <= TOL
        lengths = next(i for i in inputs if i["name"].endswith(".lengths"))
        lengths["data"] = [x + 1 for x in lengths["data"]]
        status, _, reply = call(srv, "POST", "/v2/models/codesign/infer", {"inputs": inputs})
        assert status == 400 and "must be >= 0 and add up to" in reply["error"]


# ---- endpoints --------------------------------------------------------------------------------------
def test_batch_endpoint_answers_each_request_with_its_own_status(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    a, want_a = body_for(bundle, 4, seed=1)
    b, want_b = body_for(bundle, 6, seed=2)
    with serving(bundle) as (srv, _):
        status, _, reply = call(srv, "POST", "/v1/score/batch", {"requests": [a, {"user": {}}, b]})
        assert status == 200
        codes = [r["status"] for r in reply["results"]]
        assert codes == [200, 400, 200]
        assert (torch.tensor(reply["results"][0]["scores"]) - want_a).abs().max() <= TOL
        assert (torch.tensor(reply["results"][2]["scores"]) - want_b).abs().max() <= TOL
        assert "'candidates' must be a JSON object" in reply["results"][1]["error"]
        status, _, reply = call(srv, "POST", "/v1/score/batch", {"requests": []})
        assert status == 400 and "1 to 256" in reply["error"]
        status, _, doc = call(srv, "GET", "/openapi.json")
        score = doc["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        cand = score["properties"]["candidates"]["properties"]["cand_dense"]
        assert cand["items"] == {"type": "array", "items": {"type": "number"}, "minItems": 8, "maxItems": 8}
        assert "/v2/models/codesign/infer" in doc["paths"]


# ---- HTTP parsing, limits, slow clients -----------------------------------------------------------
def test_malformed_http_is_refused_cleanly_and_never_smuggled(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    body, _ = body_for(bundle, 2, seed=4)
    data = json.dumps(body).encode()
    with serving(bundle) as (srv, _):
        head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        two_lengths = head + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(data) + data
        assert raw(srv, two_lengths).startswith(b"HTTP/1.1 400")
        te_and_cl = head + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        assert raw(srv, te_and_cl).startswith(b"HTTP/1.1 400")
        garbage = raw(srv, bytes(range(256)) * 4)
        assert garbage.startswith(b"HTTP/1.1 400")  # an HTTP/1.1 error, not an HTTP/0.9 reply
        status, headers, _ = call(srv, "HEAD", "/healthz")
        assert status == 200 and "server" not in headers  # no version banner
        # bodies that would crash a JSON decoder or overflow a tensor get a 400 naming the problem
        for payload, needle in (
            (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
            (b'{"user": ' + b"1" * 5000 + b"}", "not valid JSON"),
        ):
            conn = http.client.HTTPConnection(*address(srv), timeout=30)
            conn.request("POST", "/v1/score", body=payload)
            resp = conn.getresponse()
            assert resp.status == 400 and needle in json.loads(resp.read())["error"]
        for big in (2**63, 2**64, 2**70):
            bad = json.loads(json.dumps(body))
            bad["candidates"]["cand_item"] = [big, 1]
            status, _, reply = call(srv, "POST", "/v1/score", bad)
            assert status == 400, (big, reply)
        status, _, health = call(srv, "GET", "/healthz")
        assert status == 200 and health["status"] == "ok"


# waits out body and header timeouts (16 s): `make test-slow`
@pytest.mark.slow
def test_slow_and_oversized_requests_are_cut_off(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    with serving(bundle, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=1 << 16) as (srv, _):
        t0 = time.monotonic()
        assert raw(srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n") == b""  # headers never finish: closed
        assert time.monotonic() - t0 < 5
        short = raw(srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}")
        assert short.startswith(b"HTTP/1.1 408")
        huge = raw(srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 413")
        chunk = b"%x\r\n%s\r\n" % (1 << 15, b" " * (1 << 15))
        chunked = raw(
            srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
        )
        assert chunked.startswith(b"HTTP/1.1 413")
        # idle connections cost no thread each (asyncio), and the server keeps answering
        threads = threading.active_count()
        idle = [socket.create_connection(address(srv)) for _ in range(200)]
        try:
            status, _, _ = call(srv, "GET", "/v2/health/live")
            assert status == 200 and threading.active_count() <= threads + 4
        finally:
            for s in idle:
                s.close()


def test_pipelined_requests_outlive_the_header_timeout(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    bundle.variants["full"].runner = slow_runner(variant, 0.0, floor_s=0.4)
    body, _ = body_for(bundle, 3, seed=14)
    data = json.dumps(body).encode()
    one = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    with serving(bundle, header_timeout_s=0.3) as (srv, _):
        # two requests in one send: the second's headers are here, and it is scored for 0.4 s > 0.3 s
        got = raw(srv, one + one + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.count(b"HTTP/1.1 200") == 3, got[:400]


def test_hostile_infer_bodies_get_400s(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    good = {"name": "cand_item", "datatype": "INT64", "shape": [2], "data": [1, 2]}
    with serving(bundle) as (srv, _):
        for label, req in (
            ("input parameters not an object", {"inputs": [{**good, "parameters": [1]}]}),
            ("datatype not a string", {"inputs": [{**good, "datatype": ["FP32"]}]}),
            ("outputs not a list", {"inputs": [good], "outputs": 5}),
            ("output name not a string", {"inputs": [good], "outputs": [{"name": []}]}),
            (
                "output parameters not an object",
                {"inputs": [good], "outputs": [{"name": "scores", "parameters": 3}]},
            ),
            ("binary size a bool", {"inputs": [{**good, "parameters": {"binary_data_size": True}}]}),
            ("request parameters not an object", {"inputs": [good], "parameters": "fast"}),
        ):
            status, _, reply = call(srv, "POST", "/v2/models/codesign/infer", req)
            assert status == 400, (label, status, reply)


def test_user_inputs_too_large_once_repeated_are_refused_before_allocation(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    body, _ = body_for(bundle, 50, seed=5)
    with serving(bundle) as (srv, runtime):
        runtime.schema = dataclasses.replace(runtime.schema, max_user_elements=1000)
        status, _, reply = call(srv, "POST", "/v1/score", body)
        # 8 + 8 + 16 user values per candidate row x 50 rows = 1600 > 1000
        assert status == 413 and "1600 values" in reply["error"] and "fix" in reply
        runtime.schema = dataclasses.replace(runtime.schema, max_candidates=10)
        status, _, reply = call(srv, "POST", "/v1/score", body)
        assert status == 413 and "at most 10 per request" in reply["error"]


# ---- exposure -----------------------------------------------------------------------------------------
def test_bearer_tokens_rate_limits_and_clean_error_bodies(
    variant: codesign.Variant, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = make_bundle(variant)
    body, want = body_for(bundle, 3, seed=6)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serving(bundle, auth_tokens=(TOKEN,), rate_limit_rps=0.5, rate_limit_burst=3) as (srv, runtime):
        assert call(srv, "POST", "/v1/score", body)[0] == 401
        status, headers, _ = call(srv, "POST", "/v1/score", body, {"Authorization": "Bearer wrong"})
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert call(srv, "GET", "/metrics")[0] == 401
        assert call(srv, "GET", "/v2/health/ready")[0] == 200  # probes need no token
        status, _, reply = call(srv, "POST", "/v1/score", body, auth)
        assert status == 200 and (torch.tensor(reply["scores"]) - want).abs().max() <= TOL
        assert call(srv, "GET", "/v1/schema", headers=auth)[0] == 200
        # burst of 3 spent (score, schema, and this one): the next is over the rate
        assert call(srv, "GET", "/v1/schema", headers=auth)[0] == 200
        status, headers, reply = call(srv, "GET", "/v1/schema", headers=auth)
        assert status == 429 and int(headers["retry-after"]) >= 1 and "rate limit" in reply["error"]

    def explode(ticket: Any) -> Any:
        raise ValueError("cannot open /home/secret/weights.bin")

    with serving(bundle) as (srv, runtime):
        runtime.answer = explode  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="codesign.serving"):
            replies = [call(srv, "POST", "/v1/score", body) for _ in range(3)]
        for status, _, reply in replies:
            assert status == 500 and reply["error"] == "internal error" and "secret" not in json.dumps(reply)
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1 and sum("weights.bin" in r.getMessage() for r in caplog.records) == 3


# ---- admission, scheduling, deadlines ----------------------------------------------------------------
def test_full_queue_answers_429_with_retry_after_and_no_resets(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    bundle.variants["full"].runner = slow_runner(variant, 0.0, floor_s=0.15)
    body, want = body_for(bundle, 4, seed=7)
    batching = BatchingConfig(max_requests=1, max_delay_ms=0.0, max_queued_requests=2)
    with serving(bundle, batching) as (srv, _):
        results: list[Any] = [None] * 12

        def send(i: int) -> None:
            results[i] = call(srv, "POST", "/v1/score", body)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(r[0] for r in results)
    assert set(codes) == {200, 429} and codes.count(429) >= 4, codes
    for status, headers, reply in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "queued" in reply["error"]
        else:
            assert (torch.tensor(reply["scores"]) - want).abs().max() <= TOL


# huge requests scored for seconds (20 s): `make test-slow`
@pytest.mark.slow
def test_small_requests_do_not_wait_behind_huge_ones(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    bundle.variants["full"].runner = slow_runner(variant, 20e-6, floor_s=0.005)  # 20 us per candidate row
    batching = BatchingConfig(max_candidates=1024, max_delay_ms=1.0)
    big, want_big = body_for(bundle, 20_000, seed=8)  # ~0.5 s: 20 slices of 1024 rows
    small = [body_for(bundle, 3, seed=20 + i) for i in range(5)]
    finished: dict[str, float] = {}
    replies: dict[str, Any] = {}
    with serving(bundle, batching) as (srv, runtime):

        def send(key: str, body: Any) -> None:
            replies[key] = call(srv, "POST", "/v1/score", body)
            finished[key] = time.monotonic()

        t = threading.Thread(target=send, args=("big", big))
        t.start()
        deadline = time.monotonic() + 60
        while runtime.load.snapshot()["full"]["running_candidates"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # until the big request is being scored, slice by slice
        assert runtime.load.snapshot()["full"]["queued_candidates"] > 10_000  # most of it still to come
        smalls = [threading.Thread(target=send, args=(f"s{i}", b)) for i, (b, _) in enumerate(small)]
        for s in smalls:
            s.start()
        for s in [t, *smalls]:
            s.join()
    assert all(finished[f"s{i}"] < finished["big"] for i in range(5)), finished
    assert (torch.tensor(replies["big"][2]["scores"]) - want_big).abs().max() <= TOL
    for i, (_, want) in enumerate(small):
        assert (torch.tensor(replies[f"s{i}"][2]["scores"]) - want).abs().max() <= TOL


def test_a_request_past_its_budget_is_shed_unscored(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    bundle.variants["full"].runner = slow_runner(variant, 0.0, floor_s=0.3)
    blocker, _ = body_for(bundle, 2, seed=9)
    late, _ = body_for(bundle, 2, seed=10, budget_ms=50)
    batching = BatchingConfig(max_requests=1, max_delay_ms=0.0)
    with serving(bundle, batching) as (srv, runtime):
        t = threading.Thread(target=call, args=(srv, "POST", "/v1/score", blocker))
        t.start()
        time.sleep(0.05)
        status, _, reply = call(srv, "POST", "/v1/score", late)
        t.join()
        assert status == 504 and "shed unscored" in reply["error"]
        assert runtime.metrics.value("codesign_errors_total", kind="deadline") == 1


# ---- health ------------------------------------------------------------------------------------------
def test_failing_variant_is_probed_back_into_rotation(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    inner = variant.runner
    broken = {"on": False}

    def flaky(*args: Any, **inputs: Any) -> Any:
        if broken["on"]:
            raise RuntimeError("device lost")
        return inner(*args, **inputs)

    bundle.variants["full"].runner = flaky
    body, want = body_for(bundle, 5, seed=11)
    batching = BatchingConfig(max_delay_ms=0.0, probe_interval_s=0.1, probe_max_interval_s=0.2)
    with serving(bundle, batching) as (srv, runtime):
        broken["on"] = True
        status, _, reply = call(srv, "POST", "/v1/score", body)
        assert status == 503 and "no other variant" in reply["error"]
        assert call(srv, "GET", "/v2/health/ready")[0] == 503
        time.sleep(0.5)
        assert call(srv, "GET", "/healthz")[0] == 503  # probes fail while the device is lost
        broken["on"] = False
        deadline = time.monotonic() + 10
        while call(srv, "GET", "/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, _, reply = call(srv, "POST", "/v1/score", body)
        assert status == 200 and (torch.tensor(reply["scores"]) - want).abs().max() <= TOL
        assert runtime.metrics.value("codesign_variant_probes_total", variant="full", result="pass") == 1
        assert runtime.metrics.value("codesign_variant_probes_total", variant="full", result="fail") >= 1


def test_one_unscorable_request_does_not_take_the_variant_down(variant: codesign.Variant) -> None:
    bundle = make_bundle(variant)
    body, want = body_for(bundle, 4, seed=12)
    with serving(bundle) as (srv, runtime):
        # a bundle without id bounds: an out-of-range id reaches the model, which raises
        runtime.schema = dataclasses.replace(
            runtime.schema, inputs=dataclasses.replace(runtime.schema.inputs, id_bounds={})
        )
        bad = json.loads(json.dumps(body))
        bad["candidates"]["cand_item"][0] = 10**6
        status, _, reply = call(srv, "POST", "/v1/score", bad)
        assert status == 400 and "could not score this request" in reply["error"]
        assert call(srv, "GET", "/v2/health/ready")[0] == 200
        status, _, reply = call(srv, "POST", "/v1/score", body)
        assert status == 200 and (torch.tensor(reply["scores"]) - want).abs().max() <= TOL


def test_a_request_that_runs_out_of_device_memory_gets_413_and_the_variant_stays_up(
    variant: codesign.Variant,
) -> None:
    bundle = make_bundle(variant)
    inner = variant.runner

    def small_device(*args: Any, **inputs: Any) -> Any:  # memory for 64 rows (the reference batch fits)
        if inputs["cand_item"].shape[0] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return inner(*args, **inputs)

    bundle.variants["full"].runner = small_device
    big, _ = body_for(bundle, 100, seed=13)
    body, want = body_for(bundle, 6, seed=14)
    with serving(bundle) as (srv, _):
        status, _, reply = call(srv, "POST", "/v1/score", big)
        assert status == 413 and "ran out of device memory" in reply["error"], reply
        assert "fewer candidates" in reply["fix"]
        assert call(srv, "GET", "/v2/health/ready")[0] == 200
        status, _, reply = call(srv, "POST", "/v1/score", body)
        assert status == 200 and (torch.tensor(reply["scores"]) - want).abs().max() <= TOL


# waits out a drain timeout (10 s): `make test-slow`
@pytest.mark.slow
def test_shutdown_waits_at_most_one_drain_timeout(variant: codesign.Variant) -> None:
    """uvicorn's wait for open connections and the runtime's wait for admitted requests share the
    drain timeout (they used to take one each)."""
    bundle = make_bundle(variant)
    gate = threading.Event()
    inner = variant.runner

    def stuck(*args: Any, **inputs: Any) -> Any:
        if inputs["cand_item"].shape[0] == 7:
            gate.wait(30)
        return inner(*args, **inputs)

    bundle.variants["full"].runner = stuck
    body, _ = body_for(bundle, 7, seed=15)
    runtime = Runtime(bundle, batching=BatchingConfig(max_delay_ms=0.0))
    srv = Server(runtime, port=0, config=ServerConfig(drain_timeout_s=1.0)).start()
    host, port = address(srv)
    sender = threading.Thread(target=lambda: _post_quietly(host, port, body), daemon=True)
    sender.start()
    deadline = time.monotonic() + 10
    while runtime.inflight < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime.inflight == 1
    t0 = time.monotonic()
    srv.shutdown()
    took = time.monotonic() - t0
    gate.set()
    assert took < 1.9, f"shutdown took {took:.2f} s with a 1 s drain timeout"


def _post_quietly(host: str, port: int, body: Any) -> None:
    with contextlib.suppress(OSError, http.client.HTTPException):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/v1/score", body=json.dumps(body))
        conn.getresponse().read()


def test_variant_with_wrong_weights_never_becomes_ready() -> None:
    v = codesign.compile(useq(), target="host", backend="eager")
    with torch.no_grad():
        for p in v.program.graph_module.parameters():
            p.mul_(10.0)  # weights edited after the bundle was verified
    bundle = make_bundle(v)
    with serving(bundle) as (srv, runtime):
        assert not runtime.ready
        status, _, health = call(srv, "GET", "/healthz")
        assert status == 503 and health["variants"]["full"].startswith("down: does not score its reference")
        assert call(srv, "GET", "/v2/health/ready")[0] == 503
        assert call(srv, "GET", "/v2/health/live")[0] == 200
        body, _ = body_for(bundle, 3, seed=13)
        assert call(srv, "POST", "/v1/score", body)[0] == 503


def test_bad_id_bounds_are_refused_at_load(variant: codesign.Variant, tmp_path: Path) -> None:
    d = variant.save(tmp_path / "v", verify="none")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["id_bounds"], "the useq bundle records id bounds"
    path = next(iter(manifest["id_bounds"]))
    for bounds, needle in (
        ({path: {"99": 10}}, "names column '99'"),
        ({"nope": {"*": 10}}, "names 'nope', which is not a tensor input"),
        ({path: {"*": 1}}, "reference batch holds ids outside 0..0"),
    ):
        manifest["id_bounds"] = bounds
        (d / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=needle):
            codesign.load(d)


# ---- graceful shutdown -----------------------------------------------------------------------------------
def _serve_process(bundle_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "codesign.cli", "serve", str(bundle_dir), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "serving" in line and "http://" in line:
            return proc, line.split("http://", 1)[1].split()[0].rstrip(";")
    proc.kill()
    raise AssertionError("codesign serve did not report its address")


@pytest.mark.parametrize(
    "sig", [pytest.param(signal.SIGTERM), pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_signal_drains_every_request_in_flight_and_exits_0(
    variant: codesign.Variant, tmp_path: Path, sig: signal.Signals
) -> None:
    d = variant.save(tmp_path / "v", verify="none")
    # a batch waits up to 900 ms for more requests: the requests sit admitted and unanswered that long
    proc, url = _serve_process(d, "--max-batch-requests", "16", "--max-delay-ms", "900")
    host, port = url.rsplit(":", 1)
    bundle = load_bundle(d)
    bodies = [body_for(bundle, 200, seed=30 + i) for i in range(8)]
    results: list[Any] = [None] * len(bodies)

    def send(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/score", body=json.dumps(bodies[i][0]))
        resp = conn.getresponse()
        results[i] = (resp.status, json.loads(resp.read()))

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        inflight = 0.0
        deadline = time.monotonic() + 60
        while inflight < 4 and time.monotonic() < deadline:  # admitted and not yet answered
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            inflight = float(
                next(
                    ln.split()[-1] for ln in text.splitlines() if ln.startswith("codesign_inflight_requests")
                )
            )
        assert inflight >= 4, "requests never piled up in the server"
        proc.send_signal(sig)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    assert "terminate called" not in out
    for (status, reply), (_, want) in zip(results, bodies, strict=True):
        assert status == 200, reply
        assert (torch.tensor(reply["scores"]) - want).abs().max() <= TOL
