"""Import cost: median wall time of ``import torch``, ``import codesign`` and the serving runtime.

Each import runs in a fresh interpreter (``sys.executable -c ...``), timed inside it around the
import statement alone (interpreter start-up excluded), round-robin across the modules so that
a noisy machine slows all of them alike; the table gives the median over rounds and each
module's cost beyond ``import torch`` (everything codesign imports needs torch anyway). Goal:
``import codesign`` and ``import codesign.serving.runtime`` at most 0.3 s beyond torch. Each run
also records which of the heavy optional modules it loaded (none should be, for these imports).

    .venv/bin/python benchmarks/imports.py [--rounds 7] [--out benchmarks/results/imports-host.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

GOAL_S = 0.3
MODULES = ("torch", "codesign", "codesign.serving.runtime", "codesign.serving.http")
HEAVY = ("torch._inductor", "torch._dynamo", "optuna", "matplotlib", "networkx", "sympy", "codesign.passes")

# runs in the child: time the import alone, then report the time and which heavy modules it loaded
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import {module}
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def time_import(module: str) -> tuple[float, list[str]]:
    """Seconds ``import module`` takes in a fresh interpreter, and the heavy modules it loaded."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(module=module, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return float(record["seconds"]), list(record["loaded"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--modules", nargs="+", default=list(MODULES), help="modules to time; torch is always timed first"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/imports-host.json"))
    args = parser.parse_args()
    modules = ["torch", *(m for m in args.modules if m != "torch")]
    times: dict[str, list[float]] = {m: [] for m in modules}
    loaded: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for module in modules:
            seconds, heavy = time_import(module)
            times[module].append(seconds)
            loaded[module] = heavy
    torch_s = statistics.median(times["torch"])
    rows = []
    print(
        f"{'import':<28} {'median s':>9} {'min s':>7} {'beyond torch':>13} {'goal':>5}  heavy modules loaded"
    )
    for module in modules:
        median = statistics.median(times[module])
        beyond = median - torch_s
        ok = module == "torch" or beyond <= GOAL_S
        rows.append(
            {
                "module": module,
                "median_s": round(median, 4),
                "min_s": round(min(times[module]), 4),
                "runs_s": [round(t, 4) for t in times[module]],
                "beyond_torch_s": round(beyond, 4),
                "meets_goal": ok,
                "heavy_loaded": loaded[module],
            }
        )
        extra = "" if module == "torch" else f"{beyond:>13.3f}"
        print(
            f"{module:<28} {median:>9.3f} {min(times[module]):>7.3f} {extra:>13} "
            f"{'' if module == 'torch' else ('ok' if ok else 'MISS'):>5}  {', '.join(loaded[module]) or '-'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "imports",
                "device": f"host CPU ({platform.machine()}, {os.cpu_count()} cores)",
                "python": platform.python_version(),
                "torch": importlib.metadata.version("torch"),
                "rounds": args.rounds,
                "goal_beyond_torch_s": GOAL_S,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
