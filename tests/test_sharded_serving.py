"""Sharded serving (``codesign serve BUNDLE --devices K``): scores, per-rank loading, lost ranks.

The server runs in its own process (it initializes a torch.distributed group) and starts K-1 rank
processes; every test talks to it over HTTP as a client would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
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
from codesign.build.bundle import load
from codesign.build.shard_blocks import TABLES, read_block
from codesign.errors import BundleError, ConfigError, ShardingError
from codesign.hardware.target import Target, get_target
from codesign.ir.workload import load_model_ref
from codesign.passes import default_passes
from codesign.passes.sharding import ShardEmbeddings, ShardingConfig, program_tables
from codesign.serving.deployment import load_bundle
from codesign.serving.sharded import ShardedServing, sharded_names

SCORE_ATOL = 1e-6  # the bar: sharded scores equal the single-device bundle's
_KINDS = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


def sharded_bundle(directory: Path, world: int) -> Path:
    """dlrm tiny compiled for ``world`` devices (two per host) with every sharding type forced
    round robin over its tables (table_row_wise needs 4 devices)."""
    wl = load_model_ref("dlrm", size="tiny")
    tables, _, _ = program_tables(codesign.capture(wl))
    kinds = _KINDS if world >= 4 else tuple(k for k in _KINDS if k != "table_row_wise")
    forced = tuple((t.name, kinds[i % len(kinds)]) for i, t in enumerate(tables))
    passes = [
        ShardEmbeddings(ShardingConfig(constraints=forced)) if isinstance(p, ShardEmbeddings) else p
        for p in default_passes()
    ]
    host = get_target("host", world)
    target = Target(dataclasses.replace(host.hardware, devices_per_host=2), world)
    variant = codesign.compile(wl, target=target, backend="eager", passes=passes)
    assert variant.plan is not None and set(variant.plan.kinds.values()) == set(kinds)
    return variant.save(directory, verify="in_process")


@pytest.fixture(scope="module")
def bundle2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharded_bundle(tmp_path_factory.mktemp("sharded") / "b2", 2)


class Served:
    """A ``codesign serve`` process and its URL."""

    def __init__(self, bundle: Path, *flags: str, launcher: tuple[str, ...] = ()) -> None:
        """``launcher``: what runs ``-m codesign.cli`` instead of this interpreter (torchrun)."""
        serve = ["-m", "codesign.cli", "serve", str(bundle), "--port", "0", "--threads", "1", *flags]
        cmd = [*(launcher or (sys.executable,)), *serve]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port = 0
        deadline = time.monotonic() + 240
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "serving " in line and " at http://" in line:
                self.port = int(line.split(" at http://", 1)[1].split()[0].rsplit(":", 1)[1])
                break
        if not self.port:
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines[-30:]))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def served2(bundle2: Path) -> Iterator[Served]:
    srv = Served(bundle2, "--devices", "2", "--rank-timeout", "4")
    yield srv
    srv.stop()


def _plan_bytes(bundle: Path, rank: int) -> int:
    """What rank ``rank`` must hold by the plan: its shards' elements at the tables' dtype."""
    variant = load(bundle, planned_tables="leave")
    assert variant.plan is not None and variant.sharded_tables is not None
    record = variant.sharded_tables[1]
    total = 0
    for s in variant.plan.shards:
        if s.device == rank:
            size = torch.empty(
                (), dtype=getattr(torch, record[s.table]["dtype"].split(".")[1])
            ).element_size()
            total += (s.row_end - s.row_start) * (s.col_end - s.col_start) * size
    return total


def _scores_match(srv: Served, bundle: Path, sizes: list[int], single: Any = None) -> float:
    """Send requests of ``sizes`` candidates concurrently; the largest difference from the
    single-device bundle's scores (or from ``single``'s)."""
    single = single if single is not None else codesign.load(bundle)
    schema = load_bundle(bundle).schema()
    wl = load_model_ref("dlrm", size="tiny")
    errors: list[float] = []

    def one(i: int, n: int) -> None:
        batch = wl.make_batch([n], seed=1000 + i)
        status, reply = srv.request("POST", "/v1/score", schema.encode(batch))
        assert status == 200, reply
        errors.append(float((torch.tensor(reply["scores"]) - single.score(batch).reshape(-1)).abs().max()))

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == len(sizes)
    return max(errors)


# ---- scores -------------------------------------------------------------------------------------


def test_sharded_server_scores_equal_the_single_device_bundle_at_2_ranks(
    served2: Served, bundle2: Path
) -> None:
    status, health = served2.request("GET", "/healthz")
    assert status == 200 and health["group"]["world"] == 2, health
    for rank in (0, 1):  # each rank holds exactly its own shards, by the plan
        assert health["group"]["ranks"][str(rank)]["shard_bytes"] == _plan_bytes(bundle2, rank)
    assert _scores_match(served2, bundle2, [1, 7, 64, 300, 3, 1024, 2, 17]) <= SCORE_ATOL


@pytest.mark.slow  # four rank processes on a 2-core host: ~60 s
def test_sharded_server_scores_equal_the_single_device_bundle_at_4_ranks(tmp_path: Path) -> None:
    bundle = sharded_bundle(tmp_path / "b4", 4)
    srv = Served(bundle, "--devices", "4")
    try:
        status, health = srv.request("GET", "/healthz")
        assert status == 200 and health["group"]["world"] == 4
        for rank in range(4):
            assert health["group"]["ranks"][str(rank)]["shard_bytes"] == _plan_bytes(bundle, rank)
        assert _scores_match(srv, bundle, [1, 9, 128, 500, 4, 1024]) <= SCORE_ATOL
    finally:
        assert srv.stop() == 0


# ---- faults -------------------------------------------------------------------------------------


def _load_until(srv: Served, bundle: Path, stop: threading.Event, replies: list[tuple[int, Any]]) -> None:
    schema = load_bundle(bundle).schema()
    batch = load_model_ref("dlrm", size="tiny").make_batch([256], seed=3)
    body = schema.encode(batch)
    while not stop.is_set():
        try:
            replies.append(srv.request("POST", "/v1/score", body, timeout=30))
        except (OSError, http.client.HTTPException):
            replies.append((-1, None))  # the server has exited
            time.sleep(0.05)


def test_a_killed_rank_turns_the_server_unready_answers_503_naming_it_and_exits_3(
    served2: Served, bundle2: Path
) -> None:
    _, health = served2.request("GET", "/healthz")
    pid = health["group"]["ranks"]["1"]["pid"]
    replies: list[tuple[int, Any]] = []
    stop = threading.Event()
    loader = threading.Thread(target=_load_until, args=(served2, bundle2, stop, replies))
    loader.start()
    while len(replies) < 3:  # under load
        time.sleep(0.05)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    try:
        code = served2.proc.wait(timeout=60)
    finally:
        stop.set()
        loader.join()
    assert code == 3, "".join(served2.lines[-20:])
    assert time.monotonic() - killed < 4 + 30  # rank timeout + the drain of what it held
    lost = [r for s, r in replies if s == 503]
    assert lost, replies[-5:]
    assert all("rank 1" in r["error"] and "exited" in r["error"] for r in lost), lost[:2]
    assert all(s in (200, 503, -1) for s, _ in replies), {s for s, _ in replies}
    assert any("rank 1" in line and "exiting with code 3" in line for line in served2.lines)


@pytest.mark.slow  # a restart starts the other rank again (~40 s on 2 cores)
def test_a_hung_rank_is_found_by_its_heartbeat_and_the_group_restarts(bundle2: Path, tmp_path: Path) -> None:
    from codesign.build.weights import WeightsDelta, apply_delta

    single = codesign.load(bundle2)
    plan = single.plan
    assert plan is not None
    row_t = next(t for t, k in plan.kinds.items() if k == "row_wise")
    table = single.exported.state_dict[row_t]
    ids = torch.arange(table.shape[0] // 2, table.shape[0])  # the rows rank 1 holds
    delta = WeightsDelta(rows={row_t: (ids, torch.randn(ids.numel(), table.shape[1]))})
    sha = delta.save(tmp_path / "delta.pt")
    (tmp_path / "admin").write_text("admin-secret\n")
    srv = Served(
        bundle2,
        *("--devices", "2", "--rank-timeout", "3", "--on-rank-failure", "restart"),
        *("--admin-token-file", str(tmp_path / "admin")),
    )
    try:
        # a weights version the restarted rank must build again (from the same delta file)
        status, reply = _post(
            srv, "/v2/admin/weights", {"delta": str(tmp_path / "delta.pt"), "sha256": sha}, "admin-secret"
        )
        assert status == 200 and reply["version"] == "v2", reply
        _, health = srv.request("GET", "/healthz")
        pid = health["group"]["ranks"]["1"]["pid"]
        os.kill(pid, signal.SIGSTOP)  # hung: alive, silent
        stopped = time.monotonic()
        status, reply = 200, None
        while time.monotonic() - stopped < 3 + 5 and status == 200:
            status, reply = srv.request("GET", "/v2/health/ready")
            time.sleep(0.1)
        assert status == 503, "still ready after the rank timeout"
        _, health = srv.request("GET", "/healthz")
        assert "rank 1" in health["group"]["problem"] and "no heartbeat" in health["group"]["problem"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and srv.request("GET", "/v2/health/ready")[0] != 200:
            time.sleep(0.5)
        _, health = srv.request("GET", "/healthz")
        assert health["group"]["restarts"] == 1 and health["group"]["problem"] is None, health
        assert health["group"]["ranks"]["1"]["pid"] != pid
        updated = apply_delta(single, delta)
        batch = load_model_ref("dlrm", size="tiny").make_batch([200], seed=1001)  # _scores_match's second
        assert (updated.score(batch) - single.score(batch)).abs().max() > 1e-3  # rank 1's new rows show
        assert _scores_match(srv, bundle2, [5, 200, 33], updated) <= SCORE_ATOL
    finally:
        with_pid = locals().get("pid")
        if with_pid:  # a rank left stopped must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(with_pid, signal.SIGKILL)
        assert srv.stop() == 0


# ---- the bundle layout and clear refusals -----------------------------------------------------------


def test_a_rank_reads_only_its_blocks_each_checked_by_its_sha256(bundle2: Path, tmp_path: Path) -> None:
    variant = load(bundle2, planned_tables="leave")
    assert variant.plan is not None and variant.sharded_tables is not None
    path, record = variant.sharded_tables
    weights = variant.exported.state_dict
    for name in record:  # the program holds one-element placeholders, not the tables
        assert weights[name].untyped_storage().nbytes() <= weights[name].element_size()
    full = codesign.load(bundle2)  # a single-process load puts every table back together
    row = next(s for s in variant.plan.shards if s.kind == "row_wise")
    block = read_block(path, record, row.table, (row.row_start, row.row_end, row.col_start, row.col_end))
    want = full.exported.state_dict[row.table][row.row_start : row.row_end, row.col_start : row.col_end]
    assert torch.equal(block, want) and block.shape[0] < full.exported.state_dict[row.table].shape[0]
    with pytest.raises(BundleError, match="only as a rank of a sharded server"):
        variant(**variant.reference_inputs.inputs)
    # one flipped byte in a block: that block is refused when a rank reads it
    copy = tmp_path / "tampered"
    copy.mkdir()
    for f in bundle2.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta = record[row.table]["blocks"][0]
    data = bytearray((copy / TABLES).read_bytes())
    data[meta["offset"]] ^= 0xFF
    (copy / TABLES).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        read_block(copy / TABLES, record, row.table, tuple(meta["block"]))
    with pytest.raises(BundleError, match="tampered"):  # a whole-model load hashes the whole file
        codesign.load(copy)


def test_sharded_serving_refuses_what_it_cannot_serve(bundle2: Path) -> None:
    bundle = load_bundle(bundle2, planned_tables="leave")
    with pytest.raises(ShardingError, match="planned for 2 devices, not 4"):
        sharded_names(bundle.variants, 4)
    with pytest.raises(ConfigError, match="2 or more devices"):
        ShardedServing(devices=1)
    with pytest.raises(ConfigError, match="exceed 4 heartbeats"):
        ShardedServing(devices=2, rank_timeout_s=0.5)
    one = load_bundle(
        codesign.compile(load_model_ref("dlrm", size="tiny"), backend="eager").save(
            bundle2.parent / "one", verify="none"
        ),
        planned_tables="leave",
    )
    with pytest.raises(ShardingError, match="no variant of this bundle is planned"):
        sharded_names(one.variants, 2)


# ---- live weight updates --------------------------------------------------------------------------


def _post(srv: Served, path: str, body: Any, token: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow  # a sharded server, an update and a rollback under load (~40 s)
def test_every_rank_switches_to_a_weight_delta_together_and_rolls_back(bundle2: Path, tmp_path: Path) -> None:
    from codesign.build.weights import WeightsDelta, apply_delta

    leave = load(bundle2, planned_tables="leave")
    assert leave.plan is not None
    kinds = leave.plan.kinds
    row_t = next(t for t, k in kinds.items() if k == "row_wise")
    col_t = next(t for t, k in kinds.items() if k == "column_wise")
    rep_t = next(t for t, k in kinds.items() if k == "data_parallel")
    derived = leave.derived_weights or {}
    sources = {s for srcs in derived.values() for s in srcs}
    dense = next(
        n
        for n, t in leave.exported.state_dict.items()
        if n not in kinds and n not in derived and n not in sources and t.dim() == 2
    )
    single = codesign.load(bundle2)
    weights = single.exported.state_dict
    g = torch.Generator().manual_seed(0)
    rows = weights[row_t].shape[0]
    row_ids = torch.tensor([0, rows // 2, rows - 1])  # rows on both ranks' blocks
    delta = WeightsDelta(
        tensors={rep_t: torch.randn(weights[rep_t].shape, generator=g), dense: weights[dense] * 1.5},
        rows={
            row_t: (row_ids, torch.randn(3, weights[row_t].shape[1], generator=g)),
            col_t: (torch.tensor([1, 2]), torch.randn(2, weights[col_t].shape[1], generator=g)),
        },
    )
    sha = delta.save(tmp_path / "delta.pt")
    expected = apply_delta(single, delta)
    tokens = tmp_path / "admin"
    tokens.write_text("admin-secret\n")
    srv = Served(bundle2, "--devices", "2", "--admin-token-file", str(tokens))
    try:
        schema = load_bundle(bundle2).schema()
        wl = load_model_ref("dlrm", size="tiny")
        # ids that hit every changed row: the batch's ids are drawn over each table's rows
        batches = [wl.make_batch([n], seed=50 + i) for i, n in enumerate([64, 300, 1])]
        replies: list[tuple[int, Any]] = []
        stop = threading.Event()
        loader = threading.Thread(target=_load_until, args=(srv, bundle2, stop, replies))
        loader.start()
        try:
            status, reply = _post(
                srv, "/v2/admin/weights", {"delta": str(tmp_path / "delta.pt"), "sha256": sha}, "admin-secret"
            )
            assert status == 200 and reply["version"] == "v2", reply
            for batch in batches:
                status, got = srv.request("POST", "/v1/score", schema.encode(batch))
                assert status == 200 and got["weights_version"] == "v2"
                want = expected.score(batch).reshape(-1)
                assert (torch.tensor(got["scores"]) - want).abs().max() <= SCORE_ATOL
                assert (want - single.score(batch).reshape(-1)).abs().max() > 1e-3  # the update shows
            status, reply = _post(srv, "/v2/admin/weights/rollback", {}, "admin-secret")
            assert status == 200 and reply["version"] == "v1", reply
            for batch in batches:
                status, got = srv.request("POST", "/v1/score", schema.encode(batch))
                assert status == 200 and got["weights_version"] == "v1"
                assert (
                    torch.tensor(got["scores"]) - single.score(batch).reshape(-1)
                ).abs().max() <= SCORE_ATOL
            # v3 on top of v1: v2's shards (version 1) are served by nothing now and every rank drops them
            update = {"delta": str(tmp_path / "delta.pt"), "sha256": sha}
            status, reply = _post(srv, "/v2/admin/weights", update, "admin-secret")
            assert status == 200 and reply["version"] == "v3", reply
            status, got = srv.request("POST", "/v1/score", schema.encode(batches[0]))
            assert status == 200 and got["weights_version"] == "v3"
            want = expected.score(batches[0]).reshape(-1)
            assert (torch.tensor(got["scores"]) - want).abs().max() <= SCORE_ATOL
            held = lambda: srv.request("GET", "/healthz")[1]["group"]["weights_versions"]  # noqa: E731
            deadline = time.monotonic() + 10
            while held() != [0, 2] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert held() == [0, 2]
        finally:
            stop.set()
            loader.join()
        assert replies and all(s == 200 for s, _ in replies), {s for s, _ in replies}  # no request failed
        # a bundle cannot be sent to a sharded server: refused, nothing changed
        status, reply = _post(srv, "/v2/admin/weights", {"bundle": str(bundle2)}, "admin-secret")
        assert status == 422 and "takes weight deltas" in reply["error"], reply
    finally:
        assert srv.stop() == 0


@pytest.mark.slow  # torchrun starts both ranks (~40 s)
def test_the_same_server_under_torchrun_scores_equal_the_single_device_bundle(bundle2: Path) -> None:
    with socket.socket() as sock:  # torchrun's store port (it takes no 0)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port)
    srv = Served(bundle2, launcher=torchrun)
    try:
        status, health = srv.request("GET", "/healthz")
        assert status == 200 and health["group"]["world"] == 2
        assert health["group"]["ranks"]["1"]["shard_bytes"] == _plan_bytes(bundle2, 1)
        assert _scores_match(srv, bundle2, [3, 100, 1024]) <= SCORE_ATOL
    finally:
        srv.stop()  # torchrun's own exit status after SIGTERM is not the server's


@pytest.mark.slow  # a server that fails to start (~20 s)
def test_a_rank_refuses_a_tampered_block_of_its_own_and_the_server_does_not_start(
    bundle2: Path, tmp_path: Path
) -> None:
    variant = load(bundle2, planned_tables="leave")
    assert variant.plan is not None and variant.sharded_tables is not None
    record = variant.sharded_tables[1]
    shard = next(s for s in variant.plan.shards if s.device == 1 and s.kind == "row_wise")
    block = [shard.row_start, shard.row_end, shard.col_start, shard.col_end]
    meta = next(b for b in record[shard.table]["blocks"] if b["block"] == block)
    copy = tmp_path / "tampered"
    copy.mkdir()
    for f in bundle2.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / TABLES).read_bytes())
    data[meta["offset"]] ^= 0xFF  # one byte of a block only rank 1 reads
    (copy / TABLES).write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "codesign.cli", "serve", str(copy), "--port", "0", "--devices", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "rank 1" in done.stdout + done.stderr and "does not match its sha256" in done.stdout + done.stderr
