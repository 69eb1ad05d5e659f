"""Eager vs plain torch.compile vs codesign (default passes, then Inductor), side by side in one run.

For each example model and candidate count (one request of N candidates, the serving case):

* ``eager``: the captured graph run op by op (what ``torch.export`` gives);
* ``torch.compile``: ``torch.compile(model, dynamic=True)`` on the original module;
* ``passes+eager``: codesign's passes, the graph run op by op (what the passes alone buy);
* ``codesign``: codesign's passes lowered with the ``inductor`` backend (``torch.compile`` of the
  rewritten graph, same settings as the plain one).

Timings interleave the variants round by round and report medians; ratios are taken within one
round set, so machine drift hits all variants alike. Also printed: graph ops and kernels (ops that
are not views) before and after the passes, and the kernels Inductor generated for each compile.

    .venv/bin/python benchmarks/compile.py [--models dlrm useq] [--size small] [--candidates 64 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch._inductor.metrics as inductor_metrics

import codesign
from codesign.analysis import count_kernels
from codesign.hardware.target import get_target
from codesign.hardware.timing import interleaved_medians, median_latency
from codesign.numerics import Tolerance, compare_outputs
from codesign.passes import default_passes
from codesign.passes.manager import PassManager

warnings.filterwarnings("ignore", module=r"torch\..*")

MODELS = ("dlrm", "dcnv2", "din", "multitask", "useq")
CANDIDATES = (64, 1024)
RESULTS = Path(__file__).parent / "results"
# compiled kernels reorder fp32 sums: outputs agree to a few ulps of the sums
AGREE = Tolerance(rtol=1e-3, atol=1e-4)


def _compiled_kernels(run: Callable[[], Any]) -> tuple[int, float]:
    """(kernels Inductor generated, seconds) for the first call, which compiles."""
    inductor_metrics.reset()
    t0 = time.perf_counter()
    run()
    return int(inductor_metrics.generated_kernel_count), time.perf_counter() - t0


def bench_model(name: str, size: str, candidates: list[int], rounds: int) -> list[dict[str, Any]]:
    workload = codesign.load_model_ref(name, size=size)
    program = codesign.capture(workload)
    host = get_target("host")
    t0 = time.perf_counter()
    optimized, report = PassManager(default_passes(), host).run(program)
    pass_s = time.perf_counter() - t0
    applied = [r.name for r in report.passes if r.modified]
    variant = codesign.compile(optimized, backend="inductor", passes=[], verify=False)
    plain = torch.compile(workload.model, dynamic=True)
    rows = []
    for n in candidates:
        batch = workload.make_batch([n], seed=n)
        shared_inputs = optimized.call_inputs(batch)
        with torch.no_grad():
            fns: dict[str, Callable[[], Any]] = {
                "eager": partial(program.graph_module, **batch.inputs),
                "torch.compile": partial(plain, **batch.inputs),
                "passes+eager": partial(optimized.graph_module, **shared_inputs),
                "codesign": partial(variant.runner, **shared_inputs),
            }
            kernels_plain, compile_plain_s = _compiled_kernels(fns["torch.compile"])
            kernels_codesign, compile_codesign_s = _compiled_kernels(fns["codesign"])
            reference = fns["eager"]()
            agree = {k: compare_outputs(fn(), reference, AGREE) for k, fn in fns.items()}
            calls = max(
                1, int(0.02 / max(1e-6, median_latency(fns["eager"], repeats=1)))
            )  # ~20 ms of work per sample
            times = interleaved_medians(fns, rounds, calls)
        row = {
            "model": name,
            "size": size,
            "candidates": n,
            **{f"{k}_s": v for k, v in times.items()},
            "codesign_vs_compile": times["torch.compile"] / times["codesign"],
            "codesign_vs_eager": times["eager"] / times["codesign"],
            "passes_vs_eager": times["eager"] / times["passes+eager"],
            "graph_ops_before": program.op_count(),
            "graph_ops_after": optimized.op_count(),
            "kernels_before": count_kernels(program),
            "kernels_after": count_kernels(optimized),
            "inductor_kernels_plain": kernels_plain,
            "inductor_kernels_codesign": kernels_codesign,
            "first_call_s_plain": compile_plain_s,
            "first_call_s_codesign": compile_codesign_s,
            "passes_s": pass_s,
            "passes_applied": applied,
            "max_abs_diff_vs_eager": {k: v[1] for k, v in agree.items()},
            "all_agree": all(v[0] for v in agree.values()),
        }
        rows.append(row)
        _print_row(row)
    return rows


_HEADER = (
    f"{'model':<9} {'N':>5} {'eager':>9} {'compile':>9} {'passes':>9} {'codesign':>9} "
    f"{'cs/compile':>10} {'cs/eager':>8} {'kernels':>9} {'ind.k':>7} agree  passes applied"
)


def _print_row(r: dict[str, Any]) -> None:
    ms = {k: r[f"{k}_s"] * 1e3 for k in ("eager", "torch.compile", "passes+eager", "codesign")}
    print(
        f"{r['model']:<9} {r['candidates']:>5} {ms['eager']:>7.2f}ms {ms['torch.compile']:>7.2f}ms "
        f"{ms['passes+eager']:>7.2f}ms {ms['codesign']:>7.2f}ms {r['codesign_vs_compile']:>9.2f}x "
        f"{r['codesign_vs_eager']:>7.2f}x {r['kernels_before']:>4}->{r['kernels_after']:<4} "
        f"{r['inductor_kernels_plain']:>3}/{r['inductor_kernels_codesign']:<3} {'yes' if r['all_agree'] else 'NO ':<5} "
        f"{','.join(r['passes_applied'])}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", default="small")
    parser.add_argument("--candidates", type=int, nargs="+", default=list(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: results/compile-host-SIZE.json)"
    )
    args = parser.parse_args()

    print(_HEADER)
    rows = [row for name in args.models for row in bench_model(name, args.size, args.candidates, args.rounds)]
    ratios = [r["codesign_vs_compile"] for r in rows]
    print(
        f"codesign vs plain torch.compile: median {statistics.median(ratios):.2f}x, "
        f"min {min(ratios):.2f}x, max {max(ratios):.2f}x (goal >= 1.2x on every example)"
    )
    out = args.out or RESULTS / f"compile-host-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "compile",
                "device": f"host CPU ({platform.machine()}, {platform.processor() or 'unknown'})",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
