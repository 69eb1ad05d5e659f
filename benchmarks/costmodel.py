"""Cost model vs measurement on the host CPU: predicted / measured latency per example and size.

Each row captures an example model, predicts its latency on the calibrated host with the roofline
cost model, and measures the eager (captured FX graph) latency side by side in the same run.
Prints a table of ratios and writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/costmodel.py [--size small] [--candidates 16 256 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import warnings
from functools import partial
from pathlib import Path

import torch

import codesign
from codesign.analysis import analyze
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import get_target
from codesign.hardware.timing import median_latency

warnings.filterwarnings("ignore", module=r"torch\..*")

EXAMPLES = ("dlrm", "dcnv2", "din", "multitask", "useq")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "costmodel-host.json")
    args = parser.parse_args()

    host = get_target("host")
    rows = []
    print(
        f"host: {host.hardware.source}; fp32 GEMM {host.hardware.matmul_flops_per_s['fp32'] / 1e9:.0f} GFLOP/s, "
        f"copy {host.hardware.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
        f"per-op {host.hardware.launch_overhead_s * 1e6:.1f} µs"
    )
    print(
        f"{'model':<10} {'cands':>6} {'reqs':>5} {'GFLOP':>8} {'predicted':>11} {'measured':>11} {'pred/meas':>10}"
    )
    for name in EXAMPLES:
        workload = codesign.load_model_ref(name, size=args.size)
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
                    "model": name,
                    "size": args.size,
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
                f"{name:<10} {n:>6} {requests:>5} {predicted.flops / 1e9:>8.3f} {predicted.latency_s * 1e3:>9.2f}ms "
                f"{measured * 1e3:>9.2f}ms {ratio:>10.2f}"
            )
    ratios = [r["ratio"] for r in rows]
    print(f"median pred/meas {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "costmodel",
                "device": f"host CPU: {platform.processor() or platform.machine()}",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "host_spec": host.hardware.to_dict(),
                "rows": rows,
                "median_ratio": statistics.median(ratios),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
