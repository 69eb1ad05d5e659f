"""Serving over loopback HTTP: a steady mixed load, then an overload that a fixed variant cannot carry.

The bundle is ``examples/serving.py``'s: three variants of the ``medium`` user-sequence ranker
(``full``: 256 history items through two blocks, ``short``: the last 32 through one, ``tiny``: the
last 8 and no block), profiled on this host. Every request asks for ``--budget-ms`` and has 32,
128 or 512 candidates (40/40/20 %): user-heavy requests, where routing pays.
The server runs in its own process (``codesign serve``); clients send pre-encoded JSON over
persistent connections.

1. steady: ``--clients`` closed-loop clients for ``--duration`` s against the load-aware policy:
   QPS, p50/p99 per variant, errors, deadline misses.
2. capacity: the fixed-``full`` server's throughput under 8 closed-loop clients.
3. overload: open-loop Poisson arrivals at ``--overload`` x that capacity for ``--overload-duration``
   s, the same arrival schedule against the fixed-``full`` server and the load-aware one. Latency is
   counted from each request's scheduled arrival, so a queue that builds up shows.

4. burst: ``--burst`` requests of 128 candidates from ``--burst-clients`` clients started together
   against the fixed-``full`` server, once over persistent connections and once with a new
   connection per request: p50/p99, errors and connection resets, against the bound
   3 x the single-request latency + the queueing the bundle's latency curve predicts (the last of
   the clients' requests waits for the batches of all the others).

Both machines of this project are noisy and the load generator shares the CPU with the server:
quote medians and the side-by-side ratios, not absolute figures.

    .venv/bin/python benchmarks/serving.py [--duration 60] [--out benchmarks/results/serving-host.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import platform
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import codesign

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _common import serve_child
from serving import SIZE, make_bundle

SIZES = ((32, 0.4), (128, 0.4), (512, 0.2))


@dataclass
class Record:
    variant: str
    latency_s: float
    status: int
    candidates: int


class ServerProcess:
    """``codesign serve`` in a child process on a free port."""

    def __init__(self, bundle: Path, policy: str, budget_ms: float) -> None:
        args = [str(bundle), "--policy", policy, "--budget-ms", str(budget_ms)]
        self.proc, self.host, self.port = serve_child(args)

    def metrics(self) -> str:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict[str, Any]]:
    conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def closed_loop(
    server: ServerProcess, bodies: list[tuple[int, bytes]], clients: int, seconds: float
) -> tuple[list[Record], float]:
    records: list[Record] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        while time.perf_counter() < stop_at:
            n, body = bodies[rng.randrange(len(bodies))]
            t0 = time.perf_counter()
            status, reply = post(conn, body)
            rec = Record(reply.get("variant", "-"), time.perf_counter() - t0, status, n)
            with lock:
                records.append(rec)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def open_loop(
    server: ServerProcess,
    bodies: list[tuple[int, bytes]],
    schedule: list[tuple[float, int]],
    senders: int = 64,
) -> tuple[list[Record], float]:
    """Send ``bodies[i]`` at each scheduled offset; latency counts from the scheduled time."""
    work: queue.Queue[tuple[float, int] | None] = queue.Queue()
    records: list[Record] = []
    lock = threading.Lock()

    def sender() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
        while (item := work.get()) is not None:
            due, idx = item
            n, body = bodies[idx]
            status, reply = post(conn, body)
            rec = Record(reply.get("variant", "-"), time.perf_counter() - due, status, n)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    for offset, idx in schedule:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        work.put((start + offset, idx))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


RESETS = (
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.RemoteDisconnected,
    asyncio.IncompleteReadError,
)


def burst(server: ServerProcess, body: bytes, clients: int, total: int, keep_alive: bool) -> dict[str, Any]:
    """``total`` requests from ``clients`` clients released together; latency per request.

    The clients are coroutines on one event loop speaking HTTP/1.1 over raw sockets: 32 client threads
    parsing every reply with http.client and json took a core of the 2-core host from the server under
    test (the burst's p99 then measured the load generator). A reply is read whole (status line, headers,
    body by Content-Length) and its status counted; the body is not decoded.
    """
    return asyncio.run(_burst(server.host, server.port, body, clients, total, keep_alive))


async def _burst(
    host: str, port: int, body: bytes, clients: int, total: int, keep_alive: bool
) -> dict[str, Any]:
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("" if keep_alive else "Connection: close\r\n") + "\r\n"
    ).encode()
    request = head + body
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    resets = 0
    go = asyncio.Event()
    share = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return status

    async def client(count: int) -> None:
        nonlocal resets
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        await go.wait()
        for _ in range(count):
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                status = await asyncio.wait_for(one(*conn), timeout=300)
            except RESETS:
                resets += 1
                conn = await _close(conn)
                continue
            latencies.append((time.perf_counter() - t0) * 1e3)
            statuses[status] = statuses.get(status, 0) + 1
            if not keep_alive:
                conn = await _close(conn)
        await _close(conn)

    tasks = [asyncio.create_task(client(n)) for n in share]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {
        "requests": total,
        "clients": clients,
        "keep_alive": keep_alive,
        "client": "asyncio, one process",
        "seconds": seconds,
        "qps": ok / seconds,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": total - ok - resets,
        "resets": resets,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
    }


async def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    if conn is not None:
        conn[1].close()
        with contextlib.suppress(OSError):
            await conn[1].wait_closed()
    return None


def single_latency_ms(server: ServerProcess, body: bytes, calls: int = 30) -> float:
    """Median latency of one request at a time, sent by the burst's client (headers and body in one
    write: http.client writes them apart, and Nagle's algorithm then holds the body's last segment for
    the server's delayed ACK, ~40 ms on loopback, which inflated this figure and the bound built on it)."""
    return asyncio.run(_single(server.host, server.port, body, calls))


async def _single(host: str, port: int, body: bytes, calls: int) -> float:
    times = []
    for _ in range(calls):
        r = await _burst(host, port, body, clients=1, total=1, keep_alive=True)
        times.append(r["p50_ms"])
    return pct(times, 0.5)


def burst_phase(args: argparse.Namespace, bundle: Any, body: bytes, candidates: int) -> dict[str, Any]:
    server = ServerProcess(args.bundle, "fixed:full", args.budget_ms)
    try:
        single = single_latency_ms(server, body)
        per_batch = 16  # codesign serve's default --max-batch-requests
        batch_s = bundle.profiles["full"].latency(candidates * per_batch, per_batch)
        queueing_ms = -(-args.burst_clients // per_batch) * batch_s * 1e3
        bound = 3 * single + queueing_ms
        out: dict[str, Any] = {
            "single_ms": single,
            "queueing_predicted_ms": queueing_ms,
            "p99_bound_ms": bound,
        }
        for keep_alive in (True, False):
            key = "keep_alive" if keep_alive else "new_connection"
            out[key] = burst(server, body, args.burst_clients, args.burst, keep_alive)
            r = out[key]
            r["p99_within_bound"] = r["p99_ms"] <= bound
            print(
                f"\n== burst, {key}: {r['requests']} requests x {candidates} candidates from {r['clients']} clients: "
                f"{r['qps']:.1f} QPS, errors {r['errors']}, resets {r['resets']}, p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms (bound 3 x {single:.1f} + {queueing_ms:.1f} = {bound:.1f} ms: "
                f"{'within' if r['p99_within_bound'] else 'OVER'})"
            )
        return out
    finally:
        server.stop()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(records: list[Record], seconds: float, budget_ms: float) -> dict[str, Any]:
    ok = [r for r in records if r.status == 200]
    lat = [r.latency_s * 1e3 for r in ok]
    per: dict[str, Any] = {}
    for name in sorted({r.variant for r in ok}):
        v = [r.latency_s * 1e3 for r in ok if r.variant == name]
        per[name] = {
            "requests": len(v),
            "share": len(v) / max(1, len(ok)),
            "p50_ms": pct(v, 0.5),
            "p99_ms": pct(v, 0.99),
        }
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "statuses": dict(sorted(statuses.items())),  # 504: shed unscored, its budget passed while queued
        "qps": len(ok) / seconds,
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "over_budget": sum(1 for x in lat if x > budget_ms) / max(1, len(lat)),
        "variants": per,
    }


def print_phase(title: str, s: dict[str, Any], budget_ms: float) -> None:
    print(
        f"\n== {title}: {s['requests']} requests, {s['qps']:.1f} QPS, not 200: {s['errors']} {s['statuses']}, "
        f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms (budget {budget_ms:g} ms), "
        f"over budget {100 * s['over_budget']:.1f} %"
    )
    print(f"   {'variant':<8} {'share':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, v in s["variants"].items():
        print(f"   {name:<8} {100 * v['share']:>6.1f}% {v['p50_ms']:>8.1f} {v['p99_ms']:>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("out/bench-serving"))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if it exists")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--capacity-duration", type=float, default=10.0)
    parser.add_argument("--overload", type=float, default=1.5, help="arrival rate / fixed-full capacity")
    parser.add_argument("--overload-duration", type=float, default=20.0)
    parser.add_argument("--budget-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--burst", type=int, default=500, help="requests in the burst phase")
    parser.add_argument("--burst-clients", type=int, default=32)
    parser.add_argument(
        "--phases", default="steady,overload,burst", help="comma-separated: steady, overload, burst"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving-host.json"))
    args = parser.parse_args()

    if args.rebuild or not (args.bundle / "manifest.json").is_file():
        print(f"building {args.bundle} (three useq variants, profiled on this host)")
        make_bundle(args.bundle)
    bundle = codesign.load_bundle(args.bundle)
    schema = bundle.schema()
    workload = codesign.load_model_ref("useq", size=SIZE)
    rng = random.Random(args.seed)
    bodies = []
    for i in range(64):
        n = rng.choices([s for s, _ in SIZES], [w for _, w in SIZES])[0]
        body = schema.encode(workload.make_batch([n], seed=1000 + i), context={"budget_ms": args.budget_ms})
        bodies.append((n, json.dumps(body).encode()))
    result: dict[str, Any] = {
        "benchmark": "serving",
        "device": f"host CPU ({platform.machine()}, {platform.processor() or 'unknown'}), torch threads {torch.get_num_threads()}",
        "budget_ms": args.budget_ms,
        "sizes": SIZES,
        "profiles": {n: p.to_dict() for n, p in bundle.profiles.items()},
    }

    phases = set(args.phases.split(","))
    if "burst" in phases:
        n = 128
        body = schema.encode(workload.make_batch([n], seed=7), context={"budget_ms": 10_000})
        result["burst"] = burst_phase(args, bundle, json.dumps(body).encode(), n)
    if "steady" in phases:
        steady(args, bodies, result)
    if "overload" in phases:
        overload(args, bodies, result, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


def steady(args: argparse.Namespace, bodies: list[tuple[int, bytes]], result: dict[str, Any]) -> None:
    server = ServerProcess(args.bundle, "load-aware", args.budget_ms)
    try:
        records, seconds = closed_loop(server, bodies, args.clients, args.duration)
        result["steady"] = {
            "clients": args.clients,
            "seconds": seconds,
            **summarize(records, seconds, args.budget_ms),
        }
        print_phase(
            f"steady: {args.clients} clients, {seconds:.0f} s, load-aware", result["steady"], args.budget_ms
        )
    finally:
        server.stop()


def overload(
    args: argparse.Namespace, bodies: list[tuple[int, bytes]], result: dict[str, Any], rng: random.Random
) -> None:
    server = ServerProcess(args.bundle, "fixed:full", args.budget_ms)
    try:
        records, seconds = closed_loop(server, bodies, 8, args.capacity_duration)
        capacity = sum(1 for r in records if r.status == 200) / seconds
        result["capacity_full_qps"] = capacity
        print(
            f"\n== capacity of the fixed-full server: {capacity:.1f} QPS (8 closed-loop clients, {seconds:.0f} s)"
        )
        rate = args.overload * capacity
        t, schedule = 0.0, []
        while True:
            t += rng.expovariate(rate)
            if t >= args.overload_duration:
                break
            schedule.append((t, rng.randrange(len(bodies))))
        result["overload"] = {"rate_qps": rate, "factor": args.overload, "arrivals": len(schedule)}
        records, seconds = open_loop(server, bodies, schedule)
        result["overload"]["fixed-full"] = summarize(records, seconds, args.budget_ms)
    finally:
        server.stop()
    server = ServerProcess(args.bundle, "load-aware", args.budget_ms)
    try:
        records, seconds = open_loop(server, bodies, schedule)
        result["overload"]["load-aware"] = summarize(records, seconds, args.budget_ms)
    finally:
        server.stop()
    for policy in ("fixed-full", "load-aware"):
        print_phase(
            f"overload {args.overload:g}x ({rate:.1f} QPS offered), {policy}",
            result["overload"][policy],
            args.budget_ms,
        )
    fixed, aware = result["overload"]["fixed-full"], result["overload"]["load-aware"]
    result["overload"]["p99_ratio_fixed_over_aware"] = fixed["p99_ms"] / aware["p99_ms"]
    print(
        f"\np99 fixed-full / load-aware: {fixed['p99_ms'] / aware['p99_ms']:.1f}x; "
        f"load-aware p99 {'within' if aware['p99_ms'] <= args.budget_ms else 'OVER'} the {args.budget_ms:g} ms budget, "
        f"fixed-full p99 {'within' if fixed['p99_ms'] <= args.budget_ms else 'over'} it"
    )


if __name__ == "__main__":
    raise SystemExit(main())
