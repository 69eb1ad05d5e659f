"""Compile-time cost of the pass pipeline, this tree beside another checkout, in one run.

Each measurement runs in a fresh subprocess (so import caches and torch's global state do not leak
between trees), alternating between the trees round by round; the table shows medians and the ratio
this/baseline. Measured, on the tiny dcnv2 example:

* ``compile``: ``codesign.compile(program, target="host", backend="eager")`` (passes + export once);
* ``search``: ``codesign.tune(program, "h100", trials=N, storage=":memory:")`` on the cost model (no backend
  runs on this machine for an H100 target).

Capture is outside both timings; a warm-up run per tree first fills its host-calibration cache. The baseline is any checkout of codesign with the same public API
(``codesign.load_model_ref``, ``capture``, ``compile``, ``tune``), e.g. a ``git worktree`` of an older
commit::

    git worktree add /tmp/codesign-base <commit>
    .venv/bin/python benchmarks/pipeline.py --baseline /tmp/codesign-base [--rounds 3] [--trials 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent.parent

# Run inside the tree under test (its package first on sys.path); prints one JSON line of seconds.
_PROBE = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import codesign
what, model, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
program = codesign.capture(codesign.load_model_ref(model, size="tiny"))
t0 = time.perf_counter()
if what == "compile":
    codesign.compile(program, target="host", backend="eager")
else:
    codesign.tune(program, "h100", trials=trials, storage=":memory:")
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _measure(tree: Path, cache: Path, what: str, model: str, trials: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, what, model, str(trials)],
        cwd=tree,
        env={
            "PYTHONPATH": str(tree),
            "PATH": "/usr/bin:/bin",
            "CODESIGN_CACHE_DIR": str(cache),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{what} in {tree} failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of codesign")
    parser.add_argument("--model", default="dcnv2", help="example model, tiny size (default: dcnv2)")
    parser.add_argument("--rounds", type=int, default=3, help="subprocess runs per tree (default: 3)")
    parser.add_argument("--trials", type=int, default=100, help="search trials (default: 100)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline-host.json")
    args = parser.parse_args(argv)
    trees = {"this": HERE, "baseline": args.baseline.resolve()}
    rows: dict[str, dict[str, list[float]]] = {w: {t: [] for t in trees} for w in ("compile", "search")}
    caches = {tag: Path(tempfile.mkdtemp(prefix=f"codesign-bench-{tag}-")) for tag in trees}
    for tag, tree in trees.items():  # warm-up: the host calibration each tree caches on first use
        _measure(tree, caches[tag], "compile", args.model, 1)
    for what in rows:
        for _ in range(args.rounds):
            for tag, tree in trees.items():
                rows[what][tag].append(_measure(tree, caches[tag], what, args.model, args.trials))
    result: dict[str, Any] = {
        "model": f"{args.model} tiny",
        "machine": platform.platform(),
        "rounds": args.rounds,
        "trials": args.trials,
        "baseline": str(trees["baseline"]),
        "rows": {},
    }
    print(f"{'step':<10} {'this (s)':>10} {'baseline (s)':>13} {'this/baseline':>14}")
    for what, by_tree in rows.items():
        med = {t: statistics.median(v) for t, v in by_tree.items()}
        ratio = med["this"] / med["baseline"]
        result["rows"][what] = {"median_s": med, "runs_s": by_tree, "ratio": ratio}
        print(f"{what:<10} {med['this']:>10.2f} {med['baseline']:>13.2f} {ratio:>14.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
