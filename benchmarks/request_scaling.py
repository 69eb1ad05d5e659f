"""Latency vs candidates: the original flat model vs what request sharing makes of it, per model.

Models: examples (``useq``, ``dlrm``, ...) and the test zoo (``zoo`` = every model in tests/zoo, written
from scratch in practitioners' idioms). For each: the share of FLOPs the rewrite moves to the request
level (at 1024 candidates / 16 requests), the speedup over the original at N=1024 (one request) and
for a 16-request batch of 1024 candidates, and latency growth from N=64 to N=4096. Both sides run the
same backend (eager execution of the captured graph; ``--backend inductor`` compiles both with
Inductor) and get the same cleanup, so the difference is the sharing alone. The shared side is what
the default pass decides: where its gate keeps the original the speedup is 1.0 by construction, and
the forced rewrite is timed too to show what was declined. Timings are medians of interleaved rounds.
Prints a table and writes JSON and a PNG plot to benchmarks/results/.

    .venv/bin/python benchmarks/request_scaling.py [--models useq dlrm zoo] [--size small] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from _common import host_meta, pyplot, workloads

import codesign
from codesign.hardware.target import get_target
from codesign.hardware.timing import interleaved_medians
from codesign.ir.program import Program
from codesign.numerics import EXACT, compare_outputs
from codesign.passes import DeadCodeElimination, RequestSharing, RequestSharingConfig
from codesign.passes.manager import PassManager

warnings.filterwarnings("ignore", module=r"torch\..*")

CANDIDATES = (1, 64, 256, 1024, 4096)
RESULTS = Path(__file__).parent / "results"


def _runner(program: Program, backend: str) -> Any:
    """A callable scoring a batch: the captured graph itself, or a variant built with ``backend``."""
    if backend == "eager":
        return program.run
    variant = codesign.compile(program, passes=[], backend=backend)
    return variant.score


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["useq", "dlrm", "zoo"])
    parser.add_argument("--size", default="small", help="size of the example models (the zoo has one size)")
    parser.add_argument("--candidates", type=int, nargs="+", default=list(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    args = parser.parse_args()

    host = get_target("host")
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    print(
        f"{'model':<14} {'N':>9} {'original':>10} {'shared':>10} {'speedup':>8} {'forced':>8} {'forced |diff|':>13}"
    )
    for workload in workloads(args.models, args.size):
        name = workload.name
        captured = codesign.capture(workload)
        # both sides get the same cleanup, so the difference is the sharing alone
        original, _ = PassManager([DeadCodeElimination()], host).run(captured)
        shared, report = PassManager([RequestSharing(), DeadCodeElimination()], host).run(captured)
        forced_pass = RequestSharing(RequestSharingConfig(require_predicted_gain=False))
        forced, forced_report = PassManager([forced_pass, DeadCodeElimination()], host).run(captured)
        record, forced_record = report.passes[0], forced_report.passes[0]
        fstats = forced_record.stats
        moved = fstats.get("flops_moved_to_request_level", 0) / max(1, fstats.get("flops_before", 1))
        # where the gate kept the original, "shared" is that same program: it is not timed twice (its
        # ratio is 1.0 by construction; timing one graph twice only measures the machine's noise)
        sides = [("original", original), ("forced", forced)] + (
            [("shared", shared)] if record.modified else []
        )
        runners = {k: _runner(p, args.backend) for k, p in sides}
        layouts = [(f"1x{n}", [n]) for n in args.candidates] + [("16x64", [64] * 16)]
        times: dict[str, dict[str, float]] = {}
        for label, counts in layouts:
            batch = workload.make_batch(counts, seed=sum(counts))
            fns = {k: partial(fn, batch) for k, fn in runners.items()}
            times[label] = interleaved_medians(fns, rounds=args.rounds, warmup=1)
            times[label].setdefault("shared", times[label]["original"])
            _, diff, _ = compare_outputs(runners["forced"](batch), runners["original"](batch), EXACT)
            t = times[label]
            rows.append(
                {
                    "model": name,
                    "layout": label,
                    "candidates": sum(counts),
                    **{f"{k}_s": v for k, v in t.items()},
                    "max_abs_diff": diff,
                }
            )
            print(
                f"{name:<14} {label:>9} {t['original'] * 1e3:>8.2f}ms {t['shared'] * 1e3:>8.2f}ms "
                f"{t['original'] / t['shared']:>7.2f}x {t['original'] / t['forced']:>7.2f}x {diff:>13.1e}"
            )
        big = "1x1024" if "1x1024" in times else layouts[-2][0]
        entry = {
            "model": name,
            "kept": record.modified,
            "skip": None if record.skip is None else str(record.skip),
            "request_flops_moved": moved,
            "speedup_1x1024": times[big]["original"] / times[big]["shared"],
            "speedup_16x64": times["16x64"]["original"] / times["16x64"]["shared"],
            "forced_speedup_1x1024": times[big]["original"] / times[big]["forced"],
        }
        if "1x64" in times and "1x4096" in times:
            entry["growth_64_to_4096_original"] = times["1x4096"]["original"] / times["1x64"]["original"]
            entry["growth_64_to_4096_shared"] = times["1x4096"]["shared"] / times["1x64"]["shared"]
        goal = 2.0 if moved >= 0.5 else 1.0
        entry["goal_speedup"] = goal
        entry["meets_goal"] = min(entry["speedup_1x1024"], entry["speedup_16x64"]) >= goal * 0.97 or (
            goal == 1.0 and not record.modified
        )
        summary.append(entry)

    print()
    print(
        f"{'model':<14} {'moved':>6} {'kept':>5} {'1x1024':>8} {'16x64':>8} {'forced':>8} {'growth':>8} {'goal':>5}"
    )
    for e in summary:
        growth = e.get("growth_64_to_4096_shared")
        print(
            f"{e['model']:<14} {e['request_flops_moved']:>6.0%} {e['kept']!s:>5} {e['speedup_1x1024']:>7.2f}x "
            f"{e['speedup_16x64']:>7.2f}x {e['forced_speedup_1x1024']:>7.2f}x "
            f"{(f'{growth:.1f}x' if growth else '-'):>8} {('ok' if e['meets_goal'] else 'MISS'):>5}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"request-scaling-host-{args.size}" + ("" if args.backend == "eager" else f"-{args.backend}")
    out = RESULTS / f"{stem}.json"
    meta = host_meta()
    out.write_text(
        json.dumps(
            {
                "benchmark": "request_scaling",
                "backend": args.backend,
                **meta,
                "models": summary,
                "rows": rows,
            },
            indent=2,
        )
    )
    _plot(rows, RESULTS / f"{stem}.png")
    print(f"wrote {out}")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    cols = 4
    fig, axes = plt.subplots(
        -(-len(models) // cols), cols, figsize=(4.5 * cols, 3.4 * -(-len(models) // cols)), squeeze=False
    )
    for ax, model in zip(axes.flat, models, strict=False):
        mine = [r for r in rows if r["model"] == model and str(r["layout"]).startswith("1x")]
        n = [r["candidates"] for r in mine]
        ax.loglog(n, [r["original_s"] * 1e3 for r in mine], "o-", label="original")
        ax.loglog(n, [r["shared_s"] * 1e3 for r in mine], "s-", label="request sharing (gated)")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("candidates (one request)")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
