"""Latency vs candidates for one request: the original flat model vs the request-sharing program.

Both run side by side in one process on the host CPU (eager execution of the captured graph; the
shared program also takes the request offsets). Prints a table of ratios and writes JSON and a PNG
plot to benchmarks/results/.

    .venv/bin/python benchmarks/request_scaling.py [--models useq dlrm] [--size small] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from functools import partial
from pathlib import Path

import torch

import codesign
from codesign.hardware.target import get_target
from codesign.hardware.timing import median_latency
from codesign.numerics import EXACT, compare_outputs
from codesign.passes import DeadCodeElimination, RequestSharing, RequestSharingConfig
from codesign.passes.manager import PassManager

warnings.filterwarnings("ignore", module=r"torch\..*")

CANDIDATES = (1, 16, 64, 256, 1024, 4096)
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["useq", "dlrm"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--candidates", type=int, nargs="+", default=list(CANDIDATES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rows = []
    print(f"{'model':<6} {'N':>5} {'original':>11} {'shared':>11} {'speedup':>8} {'max |diff|':>10}")
    for name in args.models:
        workload = codesign.load_model_ref(name, size=args.size)
        captured = codesign.capture(workload)
        host = get_target("host")
        # both sides get the same cleanup so the difference is the sharing alone
        original, _ = PassManager([DeadCodeElimination()], host).run(captured)
        shared, report = PassManager([RequestSharing(), DeadCodeElimination()], host).run(captured)
        was_forced = not report.passes[0].modified
        if was_forced:  # the cost model declined: measure the forced rewrite to show why
            print(
                f"{name}: request_sharing declined ({report.passes[0].stats.get('reason')}); timing it forced"
            )
            forced = RequestSharing(RequestSharingConfig(require_predicted_gain=False))
            shared, report = PassManager([forced, DeadCodeElimination()], host).run(captured)
        stats = report.passes[0].stats
        for n in args.candidates:
            batch = workload.make_batch([n], seed=n)
            t_orig = median_latency(partial(original.run, batch), args.repeats)
            t_shared = median_latency(partial(shared.run, batch), args.repeats)
            _, diff, _ = compare_outputs(shared.run(batch), original.run(batch), EXACT)
            rows.append(
                {
                    "model": name,
                    "size": args.size,
                    "candidates": n,
                    "original_s": t_orig,
                    "shared_s": t_shared,
                    "speedup": t_orig / t_shared,
                    "max_abs_diff": diff,
                    "nodes_shared": stats.get("nodes_shared", 0),
                    "forced": was_forced,
                }
            )
            print(
                f"{name:<6} {n:>5} {t_orig * 1e3:>9.2f}ms {t_shared * 1e3:>9.2f}ms {t_orig / t_shared:>7.1f}x "
                f"{diff:>10.1e}"
            )
        by_n = {r["candidates"]: r for r in rows if r["model"] == name}
        if 64 in by_n and 4096 in by_n:
            print(
                f"{name}: latency growth N=64 -> 4096: original {by_n[4096]['original_s'] / by_n[64]['original_s']:.1f}x,"
                f" shared {by_n[4096]['shared_s'] / by_n[64]['shared_s']:.1f}x"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"request-scaling-host-{args.size}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "request_scaling",
                "device": f"host CPU ({platform.machine()})",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    _plot(rows, RESULTS / f"request-scaling-host-{args.size}.png")
    print(f"wrote {out}")


def _plot(rows: list[dict[str, object]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'codesign[bench]'): no plot written")
        return
    models = sorted({str(r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        n = [r["candidates"] for r in mine]
        ax.loglog(n, [float(r["original_s"]) * 1e3 for r in mine], "o-", label="original (flat rows)")  # type: ignore[arg-type]
        ax.loglog(n, [float(r["shared_s"]) * 1e3 for r in mine], "s-", label="request sharing")  # type: ignore[arg-type]
        ax.set_title(f"{model}: one request, N candidates (host CPU)")
        ax.set_xlabel("candidates N")
        ax.set_ylabel("median latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
