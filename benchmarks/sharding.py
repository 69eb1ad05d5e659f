"""Embedding sharding planner: planning time, slowest device vs the lower bound, memory per device.

Table sets: the MLPerf DLRMv2 tables (26 tables, dim 128, published multi-hot sizes) on 8 x H100
and on 16 x A100-40GB; a synthetic 1-trillion-parameter set (1,000 tables, Zipf sizes, dims 64/128/
256) on 64 x H100 (fp16 storage: 2 TB) and 256 x H100 (fp32: 4 TB), plus the 1T set in FP8 on 64.
For each: planning seconds, slowest device cost per step, the lower bound, their ratio (goal
<= 1.05), the simple bound, memory per device (max / capacity) and tables by sharding type.
Costs are the planner's model (datasheet HBM and link bandwidths), not measurements.

Then, on paper, one request of 1,000 candidates on the DLRMv2 plan (8 x H100; dense part: DCNv2 at
the MLPerf shape, 32.1 MFLOP per candidate, tests/test_analysis.py) and on the 1T plan (64 x H100,
fp16; dense part: 10 GFLOP per candidate, the LLM-scale seed figure): lookup, all-to-all, dense
and queueing at 70 % utilization on the slowest device (``codesign.sharding.latency``).

    .venv/bin/python benchmarks/sharding.py [--out benchmarks/results/sharding-host.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from codesign.hardware.target import get_target
from codesign.sharding import Plan, Topology, plan_sharding
from codesign.sharding.latency import request_latency
from codesign.sharding.tablesets import mlperf_dlrmv2_tables, synthetic_tables

CASES = (
    ("mlperf-dlrmv2", "fp32", "h100", 8),
    ("mlperf-dlrmv2", "fp32", "a100-40gb", 16),
    ("synthetic-1t", "fp16", "h100", 64),
    ("synthetic-1t", "fp8", "h100", 64),
    ("synthetic-1t", "fp32", "h100", 256),
)
GIB = 1 << 30
# the cases priced per request, with their dense FLOPs per candidate (see the module docstring)
LATENCY_CASES = {("mlperf-dlrmv2", "fp32", "h100", 8): 32.1e6, ("synthetic-1t", "fp16", "h100", 64): 10e9}
REQUEST_CANDIDATES = 1000


def run_case(tables_name: str, storage: str, target: str, devices: int) -> dict[str, object]:
    tables = (
        mlperf_dlrmv2_tables(storage=storage)
        if tables_name == "mlperf-dlrmv2"
        else synthetic_tables(storage=storage)
    )
    t0 = time.perf_counter()
    plan = plan_sharding(tables, Topology.uniform(get_target(target).hardware, devices))
    seconds = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    for kind in plan.kinds.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "tables": tables_name,
        "count": len(tables),
        "params": plan.total_params,
        "storage": storage,
        "target": target,
        "devices": devices,
        "planning_s": seconds,
        "max_cost_s": plan.max_cost_s,
        "lower_bound_s": plan.lower_bound_s,
        "simple_lower_bound_s": plan.simple_lower_bound_s,
        "gap": plan.gap,
        "max_device_gib": max(plan.device_bytes) / GIB,
        "min_device_gib": min(plan.device_bytes) / GIB,
        "capacity_gib": min(plan.device_capacity_bytes) / GIB,
        "kinds": kinds,
        **_latency((tables_name, storage, target, devices), plan),
    }


def _latency(case: tuple[str, str, str, int], plan: Plan) -> dict[str, object]:
    flops = LATENCY_CASES.get(case)
    if flops is None:
        return {}
    latency = request_latency(plan, REQUEST_CANDIDATES, dense_flops_per_candidate=flops)
    return {"request_latency": {"dense_flops_per_candidate": flops, **latency.to_dict()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sharding-host.json"))
    args = ap.parse_args()
    rows = [run_case(*case) for case in CASES]
    header = f"{'tables':<14}{'params':>8}{'fmt':>6}{'devices':>16}{'plan s':>8}{'max ms':>9}{'bound ms':>10}{'gap':>7}{'GiB/dev':>14}  kinds"
    print(header)
    for r in rows:
        devices = f"{r['devices']} x {r['target']}"
        print(
            f"{r['tables']:<14}{r['params'] / 1e9:>7.0f}B{r['storage']:>6}{devices:>16}{r['planning_s']:>8.2f}"
            f"{r['max_cost_s'] * 1e3:>9.3f}{r['lower_bound_s'] * 1e3:>10.3f}{r['gap']:>7.3f}"
            f"{r['max_device_gib']:>7.1f}/{r['capacity_gib']:<6.1f}  {r['kinds']}"
        )
    print(f"\none request of {REQUEST_CANDIDATES} candidates, slowest device, on paper:")
    for r in rows:
        lat = r.get("request_latency")
        if isinstance(lat, dict):
            parts = ("lookup_s", "all_to_all_s", "dense_s", "queueing_s", "total_s")
            print(
                f"  {r['tables']} on {r['devices']} x {r['target']}: "
                + ", ".join(f"{p.removesuffix('_s')} {lat[p] * 1e3:.3f} ms" for p in parts)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": torch.get_num_threads(),
                "note": "costs are the planner's model (datasheet bandwidths); planning time measured here",
                "cases": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
