"""Every gated pass decision on the examples and the zoo, checked against measurement.

Compiles each model for this machine with the default passes and ``verify_gates=True``: both sides of
each gated decision (the pass's input and its rewrite) are timed on the gate layouts, and a decision
is wrong when measurement contradicts it by more than 10 % (``codesign.passes.manager.WRONG_BY``).
``--cost-model`` makes the gates decide on the cost model's predictions instead (what other targets
get), to see how often those predictions would decide wrongly here. Prints a table; writes JSON.

    .venv/bin/python benchmarks/gates.py [--models dlrm zoo] [--cost-model]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from _common import host_meta, workloads

import codesign
from codesign.hardware.target import get_target
from codesign.passes import RequestSharing, RequestSharingConfig, default_passes
from codesign.passes.manager import PassManager

warnings.filterwarnings("ignore", module=r"torch\..*")

EXAMPLES = ("dlrm", "dcnv2", "din", "multitask", "useq")
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=[*EXAMPLES, "zoo"])
    parser.add_argument("--size", default="small", help="size of the example models (the zoo has one size)")
    parser.add_argument("--cost-model", action="store_true", help="gate on predictions, not timings")
    args = parser.parse_args()
    host = get_target("host")
    rows: list[dict[str, Any]] = []
    print(
        f"{'model':<14} {'pass':<22} {'decided by':<12} {'decision':<10} {'predicted':>9} {'measured':>9} verdict"
    )
    for workload in workloads(args.models, args.size):
        program = codesign.capture(workload)
        passes = default_passes()
        if args.cost_model:  # request sharing times its own rewrite unless told not to
            cost_only = RequestSharing(RequestSharingConfig(gate_by_measurement=False))
            passes = [cost_only if p.name == "request_sharing" else p for p in passes]
        manager = PassManager(passes, host, verify_gates=True, gate_by_measurement=not args.cost_model)
        _, report = manager.run(program)
        for record in report.passes:
            check = record.gate_check
            if check is None:
                continue
            rows.append({"model": workload.name, "pass": record.name, **check})
            print(
                f"{workload.name:<14} {record.name:<22} {check['decided_by']:<12} "
                f"{'kept' if check['kept'] else 'discarded':<10} {check['predicted_ratio']:>9.3f} "
                f"{check['measured_ratio']:>9.3f} {'WRONG' if check['wrong'] else 'ok'}",
                flush=True,
            )
    wrong = [r for r in rows if r["wrong"]]
    print(f"\n{len(rows)} gated decisions, {len(wrong)} wrong")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gates-host{'-cost-model' if args.cost_model else ''}.json"
    meta = host_meta()
    out.write_text(
        json.dumps(
            {
                "benchmark": "gates",
                **meta,
                "cost_model": args.cost_model,
                "wrong": len(wrong),
                "decisions": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
