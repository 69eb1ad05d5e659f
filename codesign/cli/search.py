"""``codesign search``: tune pass knobs, backend and micro-batch with Optuna; print the Pareto front."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import (
    DEFAULT_TARGET,
    add_json_flag,
    add_model_flags,
    command_parser,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from codesign.cli.output import fmt_n, fmt_s, note, progress_bar, show, table

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers
    from codesign.search import SearchResult

NAME = "search"
HELP = "tune pass knobs, backend and micro-batch with Optuna; print the Pareto front"
DESCRIPTION = (
    "Multi-objective search (latency, NE quality loss, memory). Several processes with the same "
    "--storage and --study-name share one study; a rerun resumes it."
)
# codesign.search.tuner's DEFAULT_STORAGE and SAMPLERS (that module imports torch; test_cli checks they agree)
DEFAULT_STORAGE = "sqlite:///codesign-search.db"
SAMPLERS = ("tpe", "nsga2")


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP, DESCRIPTION)
    if not arguments:
        p.set_defaults(handler=run)
        return
    add_model_flags(p)
    p.add_argument("--target", default=DEFAULT_TARGET, help="a target of 'codesign targets'")
    p.add_argument("--trials", type=positive_int, default=100, help="finished trials the study should hold")
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="sqlite:///file.db, postgresql://..., journal:file.log or :memory: (default: %(default)s)",
    )
    p.add_argument("--study-name", help="the study (default: <model>-<target>-<measured|predicted>)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes sharing the study")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampler seed")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler")
    p.add_argument(
        "--candidates",
        type=int_list,
        default=(64, 1024),
        help="candidates per request at which latency is taken, comma-separated (default: 64,1024)",
    )
    p.add_argument("--requests", type=positive_int, default=1, help="requests per call")
    p.add_argument(
        "--measure",
        default="auto",
        choices=("auto", "predicted", "measured"),
        help="auto: measured for target host, cost model otherwise",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=5, help="timed calls per candidate count (measured)"
    )
    p.add_argument(
        "--slo-ms", type=positive_float, help="latency SLO (constraint on the worst candidate count)"
    )
    p.add_argument(
        "--quality-budget", type=non_negative_float, default=0.1, help="largest NE change in percent"
    )
    p.add_argument("--memory-gb", type=positive_float, help="memory capacity (default: the target's)")
    p.add_argument(
        "--backends",
        help="comma-separated backends to search (measured searches; default: eager,inductor,aoti)",
    )
    p.add_argument("--variants", type=positive_int, default=3, help="variants to pick from the front")
    p.add_argument("--out", type=Path, help="write the result (all trials, front) as JSON")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bar on stderr")
    add_json_flag(p)
    p.set_defaults(handler=run)


def front_renderables(result: SearchResult, variants: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """The Pareto front as a table (with the variants chosen from it), and as records."""
    front = result.pareto
    if not front:
        return [
            "[red]no feasible complete trial[/]: relax the SLO / quality budget / memory, or run more trials"
        ], []
    from codesign.search.space import MICRO_BATCH

    chosen = {c.trial.number: c.label for c in result.select_variants(variants)}
    records: list[dict[str, Any]] = []
    for t in front:
        values = t.values or (0.0, 0.0, 0.0)
        records.append(
            {
                "trial": t.number,
                "latency_ms": values[0],
                "quality_loss_pct": values[1],
                "memory_mib": values[2],
                "micro_batch": t.params.get(MICRO_BATCH),
                "backend": ((t.config or {}).get("backend") or {}).get("name"),
                "passes_off": sorted(
                    k.removesuffix(".enabled")
                    for k, v in t.params.items()
                    if k.endswith(".enabled") and not v
                ),
                "chosen": chosen.get(t.number),
            }
        )
    rows = [
        (
            str(r["trial"]),
            fmt_s(r["latency_ms"] / 1e3),
            f"{r['quality_loss_pct']:.4f}",
            fmt_n(r["memory_mib"] * (1 << 20), "B"),
            str(r["micro_batch"] if r["micro_batch"] is not None else "-"),
            r["backend"] or "-",
            ", ".join(r["passes_off"]) or "-",
            r["chosen"] or "",
        )
        for r in records
    ]
    columns = (
        "trial",
        "latency",
        "quality loss (NE %)",
        "memory",
        "micro-batch",
        "backend",
        "passes off",
        "chosen",
    )
    title = f"Pareto front ({len(front)} distinct variants; latency {result.latency_source})"
    renderables = [table(title, columns, rows)]
    won = result.backends()
    if len(won) > 1:  # which backend won, and by how much over the others
        fastest = next(iter(won.values()))["latency_ms"]
        renderables.append(
            table(
                f"Backends (fastest first: {next(iter(won))} won)",
                ("backend", "feasible trials", "best latency", "vs the winner", "trial"),
                [
                    (
                        name,
                        str(b["trials"]),
                        fmt_s(b["latency_ms"] / 1e3),
                        f"{b['latency_ms'] / fastest:.2f}x",
                        str(b["trial"]),
                    )
                    for name, b in won.items()
                ],
            )
        )
    return renderables, records


def run(args: argparse.Namespace) -> int:
    from codesign.cli.models import size_kwargs
    from codesign.search import ObjectiveSettings, tune
    from codesign.search.tuner import counted_trials

    settings = ObjectiveSettings(
        candidates=args.candidates,
        requests=args.requests,
        measure=args.measure,
        repeats=args.repeats,
        latency_slo_ms=args.slo_ms,
        quality_budget_pct=args.quality_budget,
        memory_capacity_bytes=args.memory_gb * 1e9 if args.memory_gb is not None else None,
        seed=args.seed,
    )
    backends = tuple(b for b in args.backends.split(",") if b) if args.backends else None
    t0 = time.perf_counter()
    with progress_bar(
        f"search {args.model} on {args.target}", args.trials, disable=args.no_progress
    ) as update:
        try:
            result = tune(
                args.model,
                args.target,
                trials=args.trials,
                settings=settings,
                backends=backends,
                storage=args.storage,
                study_name=args.study_name,
                sampler=args.sampler,
                seed=args.seed,
                workers=args.workers,
                factory_kwargs=size_kwargs(args),
                callbacks=[lambda study, trial: update(counted_trials(study))],
            )
        except KeyboardInterrupt:
            note(
                "[yellow]interrupted[/]: finished trials are kept in the storage; "
                "run the same command again to resume the study"
            )
            return 130
    elapsed = time.perf_counter() - t0
    renderables, front = front_renderables(result, args.variants)
    counts = result.counts()
    renderables.append(
        f"{sum(counts.values())} trials ({', '.join(f'{k} {v}' for k, v in counts.items())}) in {elapsed:.1f} s; "
        f"latency {result.latency_source}; study '{result.study_name}' in {result.storage}"
    )
    saved = result.save(args.out) if args.out else None
    if saved is not None:
        renderables.append(f"result written to [bold]{saved}[/]")
    if result.storage != ":memory:":
        renderables.append(f"browse it: optuna-dashboard {result.storage}")
    summary = {
        "study_name": result.study_name,
        "storage": result.storage,
        "target": result.target,
        "latency_source": result.latency_source,
        "counts": counts,
        "seconds": elapsed,
        "front": front,
        "out": saved,
    }
    show(args, summary, *renderables)
    return 0 if result.pareto else 1
