"""Search benchmark: how long searches take, what fronts they find, and what the chosen variants buy.

1. cost-model searches for H100 (default 100 trials, one worker, TPE, seed 0) on every example:
   wall time, trials per second, Pareto front size, the fast / best / small / balanced variants,
   and the ratio of the default pipeline's predicted latency to the fast variant's (same settings);
2. the same seed twice: identical trials (params and values) or not;
3. two workers on one journal file vs one worker: wall time ratio for the same trial budget;
4. a host-measured search (eager and Inductor backends), then the default pipeline (eager) and
   the fast variant re-measured side by side in interleaved rounds: medians and their ratio.

    .venv/bin/python benchmarks/search.py [--models din multitask] [--trials 100] [--measured-trials 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import codesign
from codesign.hardware.target import get_target
from codesign.search import ObjectiveSettings, SearchResult, Tuner, tune

warnings.filterwarnings("ignore")

MODELS = ("dlrm", "dcnv2", "din", "multitask", "useq")
RESULTS = Path(__file__).parent / "results"


def _variants(result: SearchResult) -> list[dict[str, Any]]:
    return [
        {"label": c.label, "trial": c.trial.number, "values": c.trial.values, "params": c.trial.params}
        for c in result.select_variants(3)
    ]


def cost_model_search(name: str, size: str, trials: int, seed: int) -> dict[str, Any]:
    program = codesign.capture(codesign.load_model_ref(name, size=size))
    t0 = time.perf_counter()
    tuner = Tuner(program, "h100", storage=":memory:", seed=seed)
    result = tuner.run(trials)
    wall = time.perf_counter() - t0
    default = tuner.evaluator.evaluate(tuner.space.configure(tuner.space.defaults()))
    variants = _variants(result)
    fast_ms = variants[0]["values"][0]
    return {
        "model": name,
        "trials": len(result.trials),
        "counts": result.counts(),
        "wall_s": wall,
        "front": len(result.pareto),
        "variants": variants,
        "default_latency_ms": default.values()[0],
        "default_vs_fast": default.values()[0] / fast_ms,
    }


def same_seed(name: str, size: str, trials: int) -> bool:
    program = codesign.capture(codesign.load_model_ref(name, size=size))
    runs = [Tuner(program, "h100", storage=":memory:", seed=3).run(trials) for _ in range(2)]
    return [(t.params, t.values) for t in runs[0].trials] == [(t.params, t.values) for t in runs[1].trials]


def workers(name: str, size: str, trials: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "trials": trials}
    with tempfile.TemporaryDirectory() as d:
        for n in (1, 2):
            t0 = time.perf_counter()
            result = tune(
                name,
                "h100",
                trials=trials,
                storage=f"journal:{d}/w{n}.log",
                workers=n,
                factory_kwargs={"size": size},
            )
            out[f"wall_s_{n}"] = time.perf_counter() - t0
            out[f"trials_{n}"] = len(result.trials)
            numbers = [t.number for t in result.trials]
            out[f"numbered_without_gaps_{n}"] = numbers == list(range(len(numbers)))
    out["speedup"] = out["wall_s_1"] / out["wall_s_2"]
    return out


def measured_search(name: str, size: str, trials: int, rounds: int) -> dict[str, Any]:
    program = codesign.capture(codesign.load_model_ref(name, size=size))
    host = get_target("host")
    settings = ObjectiveSettings(candidates=(64, 1024), repeats=5)
    t0 = time.perf_counter()
    tuner = Tuner(program, host, settings=settings, storage=":memory:", backends=("eager", "inductor"))
    result = tuner.run(trials)
    wall = time.perf_counter() - t0
    fast = result.select_variants(3)[0]
    default_cfg = tuner.space.configure({**tuner.space.defaults(), "backend": "eager"})
    fast_cfg = tuner.space.configure(fast.trial.params)
    ev = tuner.evaluator  # its compiled runners are reused
    samples: dict[str, list[float]] = {"default": [], "fast": []}
    for _ in range(rounds):  # interleaved: drift hits both alike
        samples["default"].append(ev.evaluate(default_cfg).latency_s)
        samples["fast"].append(ev.evaluate(fast_cfg).latency_s)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": name,
        "trials": len(result.trials),
        "counts": result.counts(),
        "wall_s": wall,
        "front": len(result.pareto),
        "variants": _variants(result),
        "fast_backend": fast_cfg.backend.name if fast_cfg.backend else "-",
        "fast_micro_batch": fast_cfg.micro_batch,
        "default_eager_ms": med["default"] * 1e3,
        "fast_ms": med["fast"] * 1e3,
        "default_vs_fast": med["default"] / med["fast"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--measured-model", default="din")
    parser.add_argument("--measured-trials", type=int, default=20)
    parser.add_argument("--workers-model", default="multitask")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "search-host.json")
    args = parser.parse_args()

    print(f"1. cost-model search for h100, {args.trials} trials, one worker (size {args.size})")
    print(
        f"{'model':10} {'wall':>8} {'trials/s':>9} {'front':>6} {'default/fast':>13}  variants (latency ms, NE %, MB)"
    )
    rows = []
    for name in args.models:
        r = cost_model_search(name, args.size, args.trials, seed=0)
        rows.append(r)
        picks = "; ".join(
            f"{v['label']} #{v['trial']} ({v['values'][0]:.3f}, {v['values'][1]:.4f}, {v['values'][2]:.2f})"
            for v in r["variants"]
        )
        print(
            f"{name:10} {r['wall_s']:7.1f}s {r['trials'] / r['wall_s']:9.2f} {r['front']:6d} "
            f"{r['default_vs_fast']:12.2f}x  {picks}"
        )
    print("\n2. same seed twice (20 trials):", end=" ")
    reproducible = same_seed(args.models[0], args.size, 20)
    print("identical trials" if reproducible else "DIFFERENT trials")

    print(f"\n3. one vs two workers on a journal file ({args.workers_model}, {args.trials} trials)")
    w = workers(args.workers_model, args.size, args.trials)
    print(
        f"1 worker {w['wall_s_1']:.1f}s ({w['trials_1']} trials), 2 workers {w['wall_s_2']:.1f}s "
        f"({w['trials_2']} trials): {w['speedup']:.2f}x; numbered without gaps: "
        f"{w['numbered_without_gaps_1'] and w['numbered_without_gaps_2']}"
    )

    print(
        f"\n4. host-measured search ({args.measured_model}, {args.measured_trials} trials, eager + inductor)"
    )
    m = measured_search(args.measured_model, args.size, args.measured_trials, args.rounds)
    print(
        f"wall {m['wall_s']:.1f}s, {m['counts']}, front {m['front']}; fast variant: {m['fast_backend']}, "
        f"micro-batch {m['fast_micro_batch']}; re-measured medians of {args.rounds} interleaved rounds: "
        f"default (all passes, eager) {m['default_eager_ms']:.3f} ms, fast {m['fast_ms']:.3f} ms, "
        f"ratio {m['default_vs_fast']:.2f}x"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "search",
                "device": f"host CPU ({platform.machine()}, {platform.processor() or 'unknown'})",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "size": args.size,
                "cost_model": rows,
                "same_seed_identical": reproducible,
                "workers": w,
                "measured": m,
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
