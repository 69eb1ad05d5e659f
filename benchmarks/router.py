"""Router overhead: microseconds per routing decision, per policy, for 3 and 8 variants.

Each policy decides for a fixed stream of 10,000 varied requests (candidates, history length,
tier, budget); the load-aware policy reads a live LoadTracker with queued and running work. The
table gives the median over rounds of the mean time per decision, with and without building the
explanation text (the server builds it for every response). Goal: < 50 us per decision.

    .venv/bin/python benchmarks/router.py [--out benchmarks/results/router-host.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from codesign.build.profiling import LatencyCurve, VariantProfile
from codesign.serving.router import (
    BudgetedPolicy,
    LoadAwarePolicy,
    LoadTracker,
    Policy,
    RequestFeatures,
    Router,
    Rule,
    RulesPolicy,
)

GOAL_US = 50.0
TIERS = ("free", "basic", "premium")


def profiles(count: int) -> list[VariantProfile]:
    """``count`` variants, each ~1.6x cheaper and a little worse than the last, on a 4x3 measured grid."""
    out = []
    for i in range(count):
        scale = 1.6**-i
        rows = tuple(
            tuple(scale * (0.001 + c * 2e-5 + r * 1e-4) for c in (16, 64, 256, 1024)) for r in (1, 4, 16)
        )
        curve = LatencyCurve((16, 64, 256, 1024), (1, 4, 16), rows, "synthetic")
        out.append(VariantProfile(f"v{i}", curve, 0.05 * i, "given", 1 << 30))
    return out


def policies(names: list[str]) -> dict[str, Policy]:
    rules = (
        Rule(names[0], {"tier": ("==", "premium")}, name="premium"),
        Rule(names[-1], {"history_length": ("<", 8), "candidates": (">=", 512)}, name="cold-large"),
        Rule(names[1], {"history_length": ("<", 64)}, name="light"),
        Rule(names[-1], {"tier": ("in", ("free",)), "candidates": (">", 2000)}, name="free-huge"),
    )
    return {
        "rules": RulesPolicy(rules, default=names[0]),
        "budgeted": BudgetedPolicy(default_budget_ms=50.0),
        "load-aware": LoadAwarePolicy(default_budget_ms=50.0),
    }


def stream(n: int, seed: int = 0) -> list[RequestFeatures]:
    rng = random.Random(seed)
    return [
        RequestFeatures(
            candidates=rng.choice((16, 64, 200, 512, 1024, 3000)),
            history_length=rng.randrange(0, 500),
            tier=rng.choice(TIERS),
            budget_ms=rng.choice((None, 10.0, 30.0, 80.0)),
            elapsed_ms=rng.random() * 3,
        )
        for _ in range(n)
    ]


def time_policy(router: Router, requests: list[RequestFeatures], explain: bool, rounds: int) -> float:
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        if explain:
            for f in requests:
                router.decide(f).explain()
        else:
            for f in requests:
                router.decide(f)
        means.append((time.perf_counter() - t0) / len(requests))
    return statistics.median(means) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router-host.json"))
    args = parser.parse_args()
    reqs = stream(args.requests)
    rows = []
    print(f"{'variants':>8} {'policy':<11} {'us/decision':>12} {'+explain':>10} {'goal':>6}")
    for count in (3, 8):
        profs = profiles(count)
        names = [p.name for p in profs]
        for pname, policy in policies(names).items():
            load = LoadTracker(names)
            for i, n in enumerate(names):  # some work queued and running on every variant
                load.enqueue(n, 256 * (i + 1))
                load.observe(n, 0.002, 0.0025)
            router = Router(profs, policy, load)
            bare = time_policy(router, reqs, False, args.rounds)
            full = time_policy(router, reqs, True, args.rounds)
            ok = full < GOAL_US
            rows.append(
                {
                    "variants": count,
                    "policy": pname,
                    "us_per_decision": bare,
                    "us_with_explain": full,
                    "meets_goal": ok,
                }
            )
            print(f"{count:>8} {pname:<11} {bare:>12.2f} {full:>10.2f} {'ok' if ok else 'MISS':>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "router",
                "device": f"host CPU ({platform.machine()}, {platform.processor() or 'unknown'})",
                "requests": args.requests,
                "rounds": args.rounds,
                "goal_us": GOAL_US,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0 if all(r["meets_goal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
