"""Live weight updates under load: latency while the server swaps weights vs steady state.

A useq bundle (``--size``, eager) is served by ``codesign serve`` in a child process with an admin
token. ``--clients`` closed-loop clients send one request of ``--candidates`` candidates after another
over persistent connections for the whole run. The run alternates quiet windows (steady state) with
updates: a delta file changing ``--rows`` rows of the item table and one dense weight
(``POST /v2/admin/weights``), then a rollback, ``--updates`` times each. A request counts as "during an
update" when it was sent or answered while an update or rollback call was open.

Measured: p50/p99 latency steady vs during updates (and their ratio), failed requests (any status but
200), and version order: a request sent after an update returned must be scored on the new version, one
answered before the update was called on the old one.

    .venv/bin/python benchmarks/weights_update.py [--size small] [--updates 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import codesign
from codesign.build.weights import WeightsDelta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import host_meta, serve_child

TOKEN = "bench-admin-token"


@dataclass
class Sample:
    sent: float
    done: float
    status: int
    version: str


class Served:
    """``codesign serve BUNDLE --admin-token-file`` in a child process on a free port."""

    def __init__(self, bundle: Path, tokens: Path, devices: int = 1) -> None:
        flags = ["--devices", str(devices)] if devices > 1 else []
        self.proc, self.host, self.port = serve_child(
            [str(bundle), "--admin-token-file", str(tokens), *flags]
        )

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        conn.close()
        return resp.status, out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--candidates", type=int, default=128)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000, help="item-table rows each delta changes")
    ap.add_argument("--updates", type=int, default=5, help="updates (each followed by a rollback)")
    ap.add_argument("--quiet-s", type=float, default=3.0, help="steady window before each update")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="K > 1: compile for K devices (no replicated tables) and serve with --devices K",
    )
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/weights-update-host[-kK].json")
    args = ap.parse_args()
    suffix = f"-k{args.devices}" if args.devices > 1 else ""
    args.out = args.out or Path(f"benchmarks/results/weights-update-host{suffix}.json")

    work = Path(tempfile.mkdtemp(prefix="codesign-weights-bench-"))
    w = codesign.load_model_ref("useq", size=args.size)
    if args.devices > 1:
        from codesign.passes import default_passes
        from codesign.passes.sharding import ShardEmbeddings, ShardingConfig

        sharding = ShardEmbeddings(ShardingConfig(sharding_types="no_replicas"))
        passes = [sharding if isinstance(p, ShardEmbeddings) else p for p in default_passes()]
        variant = codesign.compile(
            w, target=codesign.get_target("host", args.devices), backend="eager", passes=passes
        )
        assert variant.plan is not None
        print("plan:", dict(sorted(variant.plan.kinds.items())))
    else:
        variant = codesign.compile(w, target="host", backend="eager")
    variant.save(work / "bundle", verify="in_process")
    (work / "tokens").write_text(TOKEN + "\n")
    table = variant.exported.state_dict["item.weight"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(table.shape[0], generator=g)[: args.rows]
    dense = variant.exported.state_dict["cand_tower.0.weight"]
    delta = WeightsDelta(
        tensors={"cand_tower.0.weight": dense + 0.01 * torch.randn(dense.shape, generator=g)},
        rows={"item.weight": (ids, torch.randn(args.rows, table.shape[1], generator=g))},
    )
    sha = delta.save(work / "delta.pt")
    schema = codesign.load_bundle(work / "bundle").schema()
    body = json.dumps(schema.encode(w.make_batch([args.candidates], seed=1))).encode()
    served = Served(work / "bundle", work / "tokens", args.devices)
    samples: list[Sample] = []
    windows: list[tuple[float, float, str, float]] = []  # start, end, kind, seconds
    switched: list[tuple[float, str]] = []  # when a call returned, the version it put in rotation
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection(served.host, served.port, timeout=120)
        while not stop.is_set():
            t0 = time.perf_counter()
            conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            reply = json.loads(resp.read())
            with lock:
                samples.append(
                    Sample(t0, time.perf_counter(), resp.status, reply.get("weights_version", "-"))
                )

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    try:
        for t in threads:
            t.start()
        for _ in range(args.updates):
            for kind, path, payload in (
                ("update", "/v2/admin/weights", {"delta": str(work / "delta.pt"), "sha256": sha}),
                ("rollback", "/v2/admin/weights/rollback", None),
            ):
                time.sleep(args.quiet_s)
                t0 = time.perf_counter()
                status, record = served.call("POST", path, payload)
                t1 = time.perf_counter()
                if status != 200:
                    raise RuntimeError(f"{kind} failed: {status} {record}")
                windows.append((t0, t1, kind, t1 - t0))
                switched.append((t1, record["version"]))
        time.sleep(args.quiet_s)
    finally:
        stop.set()
        for t in threads:
            t.join()
        served.stop()

    def during(s: Sample) -> bool:
        return any(s.sent <= b and s.done >= a for a, b, _, _ in windows)

    steady = [(s.done - s.sent) * 1e3 for s in samples if not during(s)]
    busy = [(s.done - s.sent) * 1e3 for s in samples if during(s)]
    failed = sum(1 for s in samples if s.status != 200)
    # a request sent and answered outside every call must be scored on the version the last call put in
    # rotation (one that overlaps a call may be admitted on either side of the switch)
    stale = 0
    for s in samples:
        if during(s):
            continue
        version = next((v for t, v in reversed(switched) if t < s.sent), "v1")
        stale += s.version != version
    result = {
        "benchmark": "weights_update",
        **host_meta(),
        "model": f"useq {args.size} (eager), {args.candidates} candidates per request, {args.clients} clients",
        "devices": args.devices,
        "plan": dict(sorted(variant.plan.kinds.items())) if variant.plan is not None else None,
        "delta": f"{args.rows} rows of item.weight {tuple(table.shape)} + cand_tower.0.weight {tuple(dense.shape)}",
        "delta_bytes": (work / "delta.pt").stat().st_size,
        "requests": len(samples),
        "failed": failed,
        "stale_version": stale,
        "steady": {"n": len(steady), "p50_ms": pct(steady, 0.5), "p99_ms": pct(steady, 0.99)},
        "during_update": {"n": len(busy), "p50_ms": pct(busy, 0.5), "p99_ms": pct(busy, 0.99)},
        "p99_ratio": pct(busy, 0.99) / pct(steady, 0.99),
        "update_call_s": sorted(s for _, _, k, s in windows if k == "update"),
        "rollback_call_s": sorted(s for _, _, k, s in windows if k == "rollback"),
    }
    print(f"{'phase':<16}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name in ("steady", "during_update"):
        r = result[name]
        print(f"{name:<16}{r['n']:>10}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    print(f"p99 during / steady: {result['p99_ratio']:.2f}x; failed: {failed}; stale version: {stale}")
    print(f"update calls: {[round(s, 2) for s in result['update_call_s']]} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if failed == 0 and stale == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
