"""Cost model vs measurement on the host CPU: predicted / measured latency per program and per node.

Each model (the examples and, with ``zoo``, every model of tests/zoo) is captured; at each batch size
the calibrated host cost model predicts its latency and the eager run of the captured FX graph is
measured side by side. Per node, a copy of the graph whose generated code reads the clock around each
call_function node is run (median over rounds), and the node's predicted time (its kernel, or a
view's dispatch) is compared with it. The goal of issue #22: predicted/measured median within [0.8, 1.25] and p90 of the error
factor (max(r, 1/r)) within 2x, over whole programs and over nodes.
Prints a table of ratios and writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/costmodel.py [--models dlrm dcnv2 din multitask useq zoo] [--size small]
"""

from __future__ import annotations

import argparse
import copy
import json
import operator
import statistics
import time
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.fx
from _common import host_meta, workloads

import codesign
from codesign.analysis import analyze
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import calibrate_host, get_target, op_class
from codesign.hardware.timing import median_latency
from codesign.ir.program import Program
from codesign.ir.request import RequestBatch, flatten_inputs

warnings.filterwarnings("ignore", module=r"torch\..*")

EXAMPLES = ["dlrm", "dcnv2", "din", "multitask", "useq"]


class _Clock:
    """Per-node wall times, written by the calls ``timed_graph`` puts around each node."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds: dict[str, list[float]] = defaultdict(list)


_CLOCK = _Clock()


def _tick() -> None:
    _CLOCK.start = time.perf_counter()


def _tock(name: str) -> None:
    _CLOCK.seconds[name].append(time.perf_counter() - _CLOCK.start)


def timed_graph(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``module`` (its weights shared) whose generated code reads the clock just before and after each
    call_function node: node times as the compiled graph pays them (its own argument passing, the
    op's dispatch, the kernel), not an interpreter's. Two clock calls per node are the only addition;
    ``clock_overhead_s`` measures them."""
    graph = copy.deepcopy(module.graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        with graph.inserting_before(node):
            graph.call_function(_tick, ())
        with graph.inserting_after(node):
            graph.call_function(_tock, (node.name,))
    graph.set_codegen(torch.fx.graph.CodeGen())  # flat inputs, as the placeholders take them
    return torch.fx.GraphModule(module, graph)


def clock_overhead_s(rounds: int = 7) -> float:
    """Seconds the two clock calls add to a node: measured around ``getitem`` nodes, which do
    nothing else (~0.1 µs)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    nodes = [graph.call_function(operator.getitem, (x, 0)) for _ in range(200)]
    graph.output(nodes)
    timed = timed_graph(torch.fx.GraphModule(torch.nn.Module(), graph))
    _CLOCK.seconds.clear()
    for _ in range(rounds):
        timed((1, 2))
    return statistics.median(t for ts in _CLOCK.seconds.values() for t in ts)


def node_times(program: Program, batch: RequestBatch, rounds: int, overhead_s: float) -> dict[str, float]:
    """Median seconds of each call_function node over ``rounds`` runs of the graph's timed copy (after
    one warm-up), less the clock's own time."""
    args = [v for _, v in flatten_inputs(program.call_inputs(batch))]
    timed = timed_graph(program.graph_module)
    with torch.no_grad():
        timed(*args)
        _CLOCK.seconds.clear()
        for _ in range(rounds):
            timed(*args)
    return {name: statistics.median(ts) - overhead_s for name, ts in _CLOCK.seconds.items()}


def error_factor(ratio: float) -> float:
    return max(ratio, 1 / ratio) if ratio > 0 else float("inf")


def summarize(ratios: list[float]) -> dict[str, float]:
    factors = sorted(error_factor(r) for r in ratios)
    return {
        "count": len(ratios),
        "median_ratio": statistics.median(ratios),
        "p90_error_factor": factors[min(len(factors) - 1, int(0.9 * len(factors)))],
        "within_2x": sum(f <= 2 for f in factors) / len(factors),
    }


def by_op(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (class, op): how many nodes, their median ratio and times, and the summed misprediction, worst first."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in nodes:
        groups[(r["class"], r["op"])].append(r)
    rows = [
        {
            "class": kind,
            "op": op,
            "nodes": len(rs),
            "median_ratio": statistics.median(r["ratio"] for r in rs),
            "median_measured_s": statistics.median(r["measured_s"] for r in rs),
            "median_predicted_s": statistics.median(r["predicted_s"] for r in rs),
            "missed_s": sum(r["measured_s"] - r["predicted_s"] for r in rs),
        }
        for (kind, op), rs in groups.items()
    ]
    return sorted(rows, key=lambda r: -abs(r["missed_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=[*EXAMPLES, "zoo"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calibrate", action="store_true", help="measure the host again first")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "costmodel-host.json")
    args = parser.parse_args()

    if args.calibrate:
        calibrate_host(force=True)
    host = get_target("host")
    hw = host.hardware
    print(
        f"host: {hw.source}; fp32 GEMM {hw.matmul_flops_per_s['fp32'] / 1e9:.0f} GFLOP/s, "
        f"copy {hw.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s; fixed cost per op class: "
        + ", ".join(f"{k} {v * 1e6:.1f} µs" for k, v in hw.op_overhead_s.items())
    )
    print(
        f"{'model':<14} {'cands':>6} {'reqs':>5} {'GFLOP':>8} {'predicted':>11} {'measured':>11} {'pred/meas':>10}"
    )
    rows, nodes = [], []
    overhead = clock_overhead_s()
    print(f"clock overhead per node (subtracted from node timings): {overhead * 1e6:.2f} µs")
    for workload in workloads(args.models, args.size):
        program = codesign.capture(workload)
        for n in args.candidates:
            requests = max(1, n // 64)
            counts = [n // requests + (1 if i < n % requests else 0) for i in range(requests)]
            batch = workload.make_batch(counts, seed=1)
            predicted = estimate_analysis(analyze(program, batch), host)
            measured = median_latency(partial(program.run, batch), args.repeats)
            ratio = predicted.latency_s / measured
            rows.append(
                {
                    "model": workload.name,
                    "candidates": n,
                    "requests": requests,
                    "flops": predicted.flops,
                    "predicted_s": predicted.latency_s,
                    "measured_s": measured,
                    "ratio": ratio,
                    "predicted_compute_s": predicted.compute_s,
                    "predicted_memory_s": predicted.memory_s,
                    "predicted_launch_s": predicted.launch_s,
                }
            )
            print(
                f"{workload.name:<14} {n:>6} {requests:>5} {predicted.flops / 1e9:>8.3f} "
                f"{predicted.latency_s * 1e3:>9.2f}ms {measured * 1e3:>9.2f}ms {ratio:>10.2f}"
            )
            measured_nodes = node_times(program, batch, args.repeats, overhead)
            analysis = analyze(program, batch)
            engines = {c.name: (c.op, c.engine) for c in analysis.nodes}
            for op in predicted.ops:
                seconds = measured_nodes.get(op.name)
                if seconds is None or op.op == "getitem":  # getitem: Python indexing, not an op
                    continue
                seconds = max(seconds, 0.5e-6)  # a node faster than the overhead's noise
                name, engine = engines.get(op.name, (op.op, "vector"))
                kind = "view" if op.rate_dtype == "-" else op_class(name, engine)
                nodes.append(
                    {
                        "model": workload.name,
                        "candidates": n,
                        "node": op.name,
                        "op": op.op,
                        "class": kind,
                        "predicted_s": op.time_s,
                        "measured_s": seconds,
                        "ratio": op.time_s / seconds,
                    }
                )
    programs = summarize([r["ratio"] for r in rows])
    per_node = summarize([r["ratio"] for r in nodes])
    by_class = {
        kind: summarize([r["ratio"] for r in nodes if r["class"] == kind])
        for kind in sorted({r["class"] for r in nodes})
    }
    print(
        f"\nprograms: median pred/meas {programs['median_ratio']:.2f}, p90 error factor "
        f"{programs['p90_error_factor']:.2f}x, within 2x {100 * programs['within_2x']:.0f}% ({programs['count']})"
    )
    print(
        f"nodes:    median pred/meas {per_node['median_ratio']:.2f}, p90 error factor "
        f"{per_node['p90_error_factor']:.2f}x, within 2x {100 * per_node['within_2x']:.0f}% ({per_node['count']})"
    )
    for kind, s in by_class.items():
        print(
            f"  {kind:<9} median {s['median_ratio']:.2f}, p90 error {s['p90_error_factor']:.2f}x, "
            f"within 2x {100 * s['within_2x']:.0f}% ({s['count']} nodes)"
        )
    goal = {
        "programs": 0.8 <= programs["median_ratio"] <= 1.25 and programs["p90_error_factor"] <= 2,
        "nodes": 0.8 <= per_node["median_ratio"] <= 1.25 and per_node["p90_error_factor"] <= 2,
    }
    print(
        f"goal (median in [0.8, 1.25], p90 error <= 2x): programs {goal['programs']}, nodes {goal['nodes']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "costmodel",
                **host_meta(),
                "host_spec": hw.to_dict(),
                "programs": programs,
                "nodes": per_node,
                "nodes_by_class": by_class,
                "goal_met": goal,
                "rows": rows,
                "nodes_by_op": by_op(nodes),  # 2,600 node rows would be 700 kB of JSON
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
