"""The GPU run: what to measure in the few minutes a GPU is lent, in one script that fits 8 minutes.

1. ``vs_compile`` on the examples, on the device: eager, ``torch.compile``, codesign on its eager,
   inductor and aoti backends (medians of interleaved rounds, each call ended by a device synchronize);
2. ``useq`` large, one request of 1000 candidates (~10 GFLOPs per candidate when scored naively),
   codesign with its default passes on inductor: p50/p99 latency over single timed calls, the FLOPs one
   call executes (torch's FlopCounterMode on the optimized program) and MFU against the target's
   datasheet peak. Goals (issue #22): MFU ≥ 35 %, p99 ≤ 100 ms.

A part that fails is recorded with its error and the run goes on; the JSON is rewritten after every
part, so a run cut short keeps what it measured. ``--budget-s`` skips what would start past it.
``--dry-run`` runs the same code small (tiny models, 2 rounds) on any device: the test suite runs it on
the CPU so that lent GPU minutes are not spent on debugging this script.

    .venv/bin/python benchmarks/gpu.py                       # on the GPU machine
    .venv/bin/python benchmarks/gpu.py --dry-run --device cpu --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import host_meta, workloads
from torch.utils.flop_counter import FlopCounterMode
from vs_compile import EXAMPLES, bench

import codesign
from codesign.hardware.target import Target, get_target, target_names
from codesign.ir.workload import Workload
from codesign.numerics import Tolerance, compare_outputs

warnings.filterwarnings("ignore", module=r"torch\..*")

RESULTS = Path(__file__).parent / "results"
MFU_GOAL, P99_GOAL_S, USEQ_CANDIDATES = 0.35, 0.100, 1000
AGREE = Tolerance(rtol=1e-3, atol=1e-4)


def device_target(device: torch.device) -> Target:
    """The catalogue target that is this device (``host`` for the CPU)."""
    if device.type == "cpu":
        return get_target("host")
    here = [t for t in map(get_target, target_names()) if t.hardware.kind == "gpu" and t.runs_here]
    if not here:
        raise SystemExit(
            f"no catalogue target matches {torch.cuda.get_device_name(device)!r} ('codesign targets')"
        )
    return here[0]


def on_device(workload: Workload, device: torch.device) -> Workload:
    """The same workload with its model and every batch it makes on ``device``."""
    make = workload.make_batch
    return Workload(
        name=workload.name,
        model=workload.model.to(device).eval(),
        spec=workload.spec,
        make_batch=lambda counts, seed: make(counts, seed).to(device),
        description=workload.description,
        metadata=workload.metadata,
    )


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def part_vs_compile(device: torch.device, target: Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.models:
        workload = on_device(workloads([name], args.size)[0], device)
        rows += bench(
            workload,
            args.modes,
            args.rounds,
            target=target.name,
            synchronize=synchronizer(device),
            backends=tuple(args.backends),
        )
    return rows


def part_useq(device: torch.device, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    sync = synchronizer(device)
    workload = on_device(codesign.load_model_ref("useq", size=args.useq_size), device)
    program = codesign.capture(workload)
    t0 = time.perf_counter()
    variant = codesign.compile(program, target=target.name, backend="inductor")
    compile_s = time.perf_counter() - t0
    assert variant.program is not None
    batch = workload.make_batch([args.useq_candidates], 1)
    inputs = variant.program.call_inputs(batch)
    with torch.no_grad():
        ok, diff, _ = compare_outputs(variant(**inputs), workload.model(**batch.inputs), AGREE)
        with FlopCounterMode(display=False) as counter:
            variant.program.graph_module(**inputs)
        for _ in range(args.warmup):
            variant(**inputs)
        sync()
        latencies = []
        for _ in range(args.calls):
            t = time.perf_counter()
            variant(**inputs)
            sync()
            latencies.append(time.perf_counter() - t)
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    flops = counter.get_total_flops()
    peaks = dict(target.hardware.matmul_flops_per_s)
    peak = peaks.get("fp32", max(peaks.values()))
    return {
        "size": args.useq_size,
        "candidates": args.useq_candidates,
        "passes_applied": [r["name"] for r in (variant.report or {}).get("passes", []) if r.get("modified")],
        "compile_s": compile_s,
        "agrees_with_eager": ok,
        "max_abs_diff": diff,
        "calls": len(latencies),
        "p50_s": p50,
        "p99_s": p99,
        "flops_per_call": flops,
        "flops_per_s": flops / p50,
        "peak_flops_per_s": peak,
        "peak_dtype": "fp32" if "fp32" in peaks else max(peaks, key=peaks.__getitem__),
        "mfu": flops / p50 / peak,
        "tf32_mfu": flops / p50 / peaks["tf32"] if "tf32" in peaks else None,
        "goal_mfu": MFU_GOAL,
        "goal_p99_s": P99_GOAL_S,
        "meets_goals": p99 <= P99_GOAL_S and flops / p50 / peak >= MFU_GOAL,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny models, 2 rounds: checks the script, not the device"
    )
    ap.add_argument("--models", nargs="+", default=list(EXAMPLES))
    ap.add_argument(
        "--modes", nargs="+", default=["default"], help="torch.compile modes (vs_compile --modes)"
    )
    ap.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "inductor", "aoti"],
        help="codesign backends (vs_compile --backends; aoti-mA builds take minutes per example on a GPU)",
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="parts that would start later are skipped")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu-<device>.json)")
    args = ap.parse_args(argv)
    args.size, args.rounds, args.useq_size = "small", 7, "large"
    args.useq_candidates, args.calls, args.warmup = USEQ_CANDIDATES, 200, 10
    if args.dry_run:
        args.size, args.rounds, args.useq_size, args.calls, args.warmup = "tiny", 2, "tiny", 20, 2
        args.models = args.models[:1]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run --device cpu to check the script")
    target = device_target(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else host_meta()["device"]
    out = Path(args.out) if args.out else RESULTS / f"gpu-{target.name}.json"
    record: dict[str, Any] = {
        "benchmark": "gpu",
        **host_meta(),
        "device": name,
        "target": target.name,
        "dry_run": args.dry_run,
        "parts": {},
    }
    start = time.perf_counter()
    parts: dict[str, Callable[[], Any]] = {
        "vs_compile": lambda: part_vs_compile(device, target, args),
        "useq": lambda: part_useq(device, target, args),
    }
    for part, run in parts.items():
        if time.perf_counter() - start > args.budget_s:
            record["parts"][part] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
            continue
        t0 = time.perf_counter()
        try:
            record["parts"][part] = {"result": run()}
        except Exception as exc:  # one failing part must not lose the others' measurements
            record["parts"][part] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        record["parts"][part]["seconds"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=str))
        print(
            f"{part}: {'error' if 'error' in record['parts'][part] else 'done'} in {record['parts'][part]['seconds']:.0f} s",
            flush=True,
        )
    useq = record["parts"]["useq"].get("result")
    if useq:
        print(
            f"useq {useq['size']} 1x{useq['candidates']}: p50 {useq['p50_s'] * 1e3:.2f} ms, p99 "
            f"{useq['p99_s'] * 1e3:.2f} ms, {useq['flops_per_s'] / 1e12:.2f} TFLOP/s, MFU {useq['mfu']:.1%} "
            f"({useq['peak_dtype']} peak)"
        )
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    return record


if __name__ == "__main__":
    main()
