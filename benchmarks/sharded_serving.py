"""Sharded serving on CPU: memory per rank and latency at K = 1, 2, 4 ranks (``codesign serve --devices K``).

The model is DLRM (``--size large``: 26 tables, 2.7 M rows x 64, 690 MiB of fp32 tables). It is
compiled for K devices whose memory holds 1/K of the tables plus 10 % (and the dense part and
activations), the case a sharded server exists for, with the planner's ``no_replicas`` types. K = 1 is
the whole-model process: the K = 2 bundle served without ``--devices`` (it puts every table back
together). Each K runs ``codesign serve`` in a child process with the host's cores split among its
ranks (``--threads``), and is measured by:

- embedding memory per rank: the bytes of the shards each rank holds (``/healthz``), against 1/K of
  the tables (goal: at most 1/K + 10 %), and each rank's peak RSS (``VmHWM`` of its process);
- one client sending one request of 1024 candidates at a time: p50/p99 latency, requests/s;
- 16 clients at once, 64 candidates each (batches of 16 requests): p50/p99, requests/s;
- the share of rank 0's sharded-call time spent in the all-to-alls (``/metrics``): waiting for
  the other ranks' lookups included.

    .venv/bin/python benchmarks/sharded_serving.py [--size large] [--requests 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import codesign
from codesign.hardware.target import Target, get_target
from codesign.passes import default_passes
from codesign.passes.manager import PassManager
from codesign.passes.sharding import ShardEmbeddings, ShardingConfig, program_tables
from codesign.serving.deployment import load_bundle
from codesign.sharding import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import host_meta, pyplot, serve_child

MIB = 2**20


def compile_for(wl: Any, devices: int, out: Path) -> tuple[Path, int]:
    """The workload compiled for ``devices`` devices that each hold 1/K of its tables + 10 %."""
    program = codesign.capture(wl)
    tables, _, _ = program_tables(program)
    total = sum(t.rows * t.dim * 4 for t in tables)
    config = ShardingConfig(sharding_types="no_replicas")
    host = get_target("host", devices)
    probe, _ = PassManager([ShardEmbeddings(config)], host).run(program)
    margin = 1.0 - config.memory_margin
    reserved = (
        host.hardware.memory_bytes * margin
        - Plan.from_dict(probe.metadata["sharding_plan"]).device_capacity_bytes[0]
    )
    hw = dataclasses.replace(host.hardware, memory_bytes=(total / devices * 1.1 + reserved) / margin)
    passes = [ShardEmbeddings(config) if isinstance(p, ShardEmbeddings) else p for p in default_passes()]
    variant = codesign.compile(wl, target=Target(hw, devices), backend="eager", passes=passes)
    return variant.save(out, verify="none"), total


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Client:
    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        self.conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def closed_loop(host: str, port: int, body: bytes, clients: int, requests: int) -> dict[str, float]:
    """``clients`` clients each sending ``requests`` requests back to back: latency and throughput."""
    lat: list[float] = []
    failed = [0]

    def run() -> None:
        c = Client(host, port)
        for _ in range(requests):
            t0 = time.perf_counter()
            status, _ = c.call("POST", "/v1/score", body)
            lat.append(time.perf_counter() - t0)
            failed[0] += status != 200

    for _ in range(2):  # warm: first calls pay one-off costs
        Client(host, port).call("POST", "/v1/score", body)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return {
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": q[98] * 1e3,
        "requests_per_s": len(lat) / wall,
        "failed": failed[0],
    }


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def measure(bundle: Path, devices: int, total: int, requests: int, wl: Any) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    threads = max(1, cores // devices)
    flags = ["--threads", str(threads), "--max-delay-ms", "2"]
    if devices > 1:
        flags += ["--devices", str(devices)]
    proc, host, port = serve_child([str(bundle), *flags])
    try:
        c = Client(host, port)
        health = json.loads(c.call("GET", "/healthz")[1])
        schema = load_bundle(bundle, planned_tables="leave").schema()
        one = json.dumps(schema.encode(wl.make_batch([1024], seed=1))).encode()
        small = json.dumps(schema.encode(wl.make_batch([64], seed=2))).encode()
        m0 = c.call("GET", "/metrics")[1].decode()
        single = closed_loop(host, port, one, 1, requests)
        batched = closed_loop(host, port, small, 16, max(4, requests // 4))
        m1 = Client(host, port).call("GET", "/metrics")[1].decode()
        group = health.get("group")
        if group:
            ranks = {int(r): i for r, i in group["ranks"].items()}
        else:
            ranks = {0: {"pid": proc.pid, "shard_bytes": total}}
        per_rank = {
            r: {"shard_mib": i["shard_bytes"] / MIB, "peak_rss_mib": peak_rss(int(i["pid"])) / MIB}
            for r, i in sorted(ranks.items())
        }
        calls = metric(m1, "codesign_shard_call_seconds_total") - metric(
            m0, "codesign_shard_call_seconds_total"
        )
        comm = metric(m1, "codesign_shard_comm_seconds_total") - metric(
            m0, "codesign_shard_comm_seconds_total"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    worst = max(i["shard_mib"] for i in per_rank.values()) * MIB
    return {
        "devices": devices,
        "threads_per_rank": threads,
        "ranks": per_rank,
        "max_rank_shard_share": worst / total * devices,  # 1.0: exactly 1/K of the tables
        "one_request_1024": single,
        "sixteen_requests_64": batched,
        "comm_share": comm / calls if calls else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="large")
    ap.add_argument("--requests", type=int, default=40, help="requests per closed-loop client")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sharded-serving-host.json"))
    args = ap.parse_args()
    wl = codesign.load_model_ref("dlrm", size=args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        b2, total = compile_for(wl, 2, Path(tmp) / "b2")
        b4, _ = compile_for(wl, 4, Path(tmp) / "b4")
        for devices, bundle in ((1, b2), (2, b2), (4, b4)):
            rows.append(measure(bundle, devices, total, args.requests, wl))
            print(f"K={devices} done", flush=True)
    whole = rows[0]["ranks"][0]["peak_rss_mib"]
    print(
        f"\nDLRM {args.size}: {total / MIB:.0f} MiB of tables; whole-model process peak RSS {whole:.0f} MiB"
    )
    print(
        f"{'K':>2} {'max shard/(1/K)':>15} {'peak RSS per rank (MiB)':>28} {'1x1024 p50/p99 ms':>18} "
        f"{'req/s':>6} {'16x64 p50/p99 ms':>17} {'req/s':>6} {'comm':>6}"
    )
    for r in rows:
        rss = "/".join(f"{i['peak_rss_mib']:.0f}" for i in r["ranks"].values())
        s, b = r["one_request_1024"], r["sixteen_requests_64"]
        comm = f"{r['comm_share']:.0%}" if r["comm_share"] is not None else "-"
        print(
            f"{r['devices']:>2} {r['max_rank_shard_share']:>15.3f} {rss:>28} "
            f"{s['p50_ms']:>8.1f}/{s['p99_ms']:<8.1f} {s['requests_per_s']:>6.1f} "
            f"{b['p50_ms']:>8.1f}/{b['p99_ms']:<8.1f} {b['requests_per_s']:>6.1f} {comm:>6}"
        )
    result = {"host": host_meta(), "model": f"dlrm {args.size}", "tables_mib": total / MIB, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plt = pyplot()
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for r in rows:
            k = r["devices"]
            for rank, i in r["ranks"].items():
                x = k + 0.15 * (int(rank) - (len(r["ranks"]) - 1) / 2)
                a.bar(x, i["peak_rss_mib"], width=0.14, color="tab:blue")
                a.bar(x, i["shard_mib"], width=0.14, color="tab:orange")
        a.axhline(whole, ls=":", color="gray")
        a.set(
            xlabel="ranks K",
            ylabel="MiB",
            title="per rank: peak RSS (blue), shards held (orange)",
            xticks=[1, 2, 4],
        )
        ks = [r["devices"] for r in rows]
        b.plot(ks, [r["one_request_1024"]["p50_ms"] for r in rows], "o-", label="1x1024 p50")
        b.plot(ks, [r["one_request_1024"]["p99_ms"] for r in rows], "o--", label="1x1024 p99")
        b.plot(ks, [r["sixteen_requests_64"]["p50_ms"] for r in rows], "s-", label="16x64 p50")
        b.plot(ks, [r["sixteen_requests_64"]["p99_ms"] for r in rows], "s--", label="16x64 p99")
        b.set(xlabel="ranks K", ylabel="ms", title="latency", xticks=[1, 2, 4])
        b.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
