"""The ``codesign`` command: profile, compile, fp8, plan, run, search, bundle, serve, report, targets.

A model reference is ``path/to/file.py:factory`` (a function returning a ``codesign.Workload``) or
the name of an example (``dlrm``, ``dcnv2``, ``din``, ``multitask``, ``useq``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from codesign.analysis import analyze
from codesign.backends import backend_names
from codesign.build.bundle import load
from codesign.build.variant import Variant, compile
from codesign.errors import CodesignError
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import CATALOGUE, get_target, target_names
from codesign.hardware.timing import median_latency
from codesign.ir.capture import capture
from codesign.ir.request import resample_batch
from codesign.ir.workload import Workload, load_model_ref
from codesign.numerics import output_tensors
from codesign.passes import (
    CommonSubexpressionElimination,
    RequestSharing,
    SelectiveFp8,
    SelectiveFp8Config,
    pass_by_name,
)
from codesign.passes.manager import PassManager
from codesign.passes.sharding import SHARDING_PRESETS, ShardEmbeddings, ShardingConfig, parse_sharding_types
from codesign.search import ObjectiveSettings, SearchResult, tune
from codesign.search.space import MICRO_BATCH
from codesign.search.tuner import DEFAULT_STORAGE, SAMPLERS, counted_trials
from codesign.serving.deployment import Bundle, load_bundle
from codesign.serving.router import BudgetedPolicy, FeatureConfig, LoadAwarePolicy, Policy, Rule, RulesPolicy
from codesign.sharding import TABLE_FORMATS, Plan

__all__ = ["main"]

console = Console(width=None if sys.stdout.isatty() else 140)


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _fmt_n(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".strip()


def _workload(args: argparse.Namespace) -> Workload:
    kwargs: dict[str, Any] = {}
    if getattr(args, "size", None):
        kwargs["size"] = args.size
    return load_model_ref(args.model, **kwargs)


def cmd_profile(args: argparse.Namespace) -> int:
    workload = _workload(args)
    program = capture(workload)
    analysis = analyze(program, args.candidates, args.requests)
    host = get_target("host")
    est_host = estimate_analysis(analysis, host)
    by_name = {o.name: o for o in est_host.ops}
    console.print(
        f"[bold]{workload.name}[/]: {workload.description} — {len(analysis.kernels)} kernels, "
        f"params {_fmt_n(analysis.param_bytes, 'B')}, {_fmt_n(analysis.total_flops, 'FLOP')} at "
        f"{analysis.candidates} candidates / {analysis.requests} requests "
        f"({_fmt_n(analysis.flops_per_candidate(), 'FLOP')} per candidate)"
    )
    roles = analysis.flops_by_role()
    console.print("FLOPs by role: " + ", ".join(f"{r.value} {_fmt_n(v)}" for r, v in roles.items()))
    table = Table(title=f"top ops by predicted time on host ({host.hardware.source})")
    for col in ("node", "op", "module", "role", "FLOPs", "bytes", "bound", "host time"):
        table.add_column(col, justify="right" if col in ("FLOPs", "bytes", "host time") else "left")
    ranked = sorted(analysis.kernels, key=lambda n: by_name[n.name].time_s, reverse=True)[: args.top]
    for n in ranked:
        o = by_name[n.name]
        table.add_row(
            n.name,
            n.op,
            n.module or "-",
            n.role.value,
            _fmt_n(n.flops),
            _fmt_n(n.bytes, "B"),
            o.bound,
            _fmt_s(o.time_s),
        )
    console.print(table)
    per_target = Table(
        title="predicted latency per target (roofline model; 'codesign targets' cites sources)"
    )
    for col in ("target", "latency", "compute", "memory", "launch", "footprint", "fits", "runs here"):
        per_target.add_column(col)
    for name in args.targets or target_names():
        tgt = get_target(name)
        e = estimate_analysis(analysis, tgt)
        per_target.add_row(
            tgt.name,
            _fmt_s(e.latency_s),
            _fmt_s(e.compute_s),
            _fmt_s(e.memory_s),
            _fmt_s(e.launch_s),
            _fmt_n(e.memory_bytes, "B"),
            "yes" if e.fits_in_memory else "NO",
            "yes" if tgt.runs_here else "no (predicted)",
        )
    console.print(per_target)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    workload = _workload(args)
    passes = [pass_by_name(p)() for p in args.passes.split(",") if p] if args.passes is not None else None
    t0 = time.perf_counter()
    target = get_target(args.target, args.devices)
    variant = compile(workload, target=target, backend=args.backend, passes=passes)
    out = variant.save(args.out, overwrite=args.overwrite)
    table = Table(title=f"compiled {workload.name} for {variant.target.name} with {variant.backend.name}")
    for col in ("pass", "modified", "ops before", "ops after", "max abs err", "stats"):
        table.add_column(col)
    for rec in (variant.report or {}).get("passes", []):
        table.add_row(
            rec["name"],
            str(rec["modified"]),
            str(rec["ops_before"]),
            str(rec["ops_after"]),
            f"{rec['max_abs_error']:.2g}",
            ", ".join(f"{k}={v}" for k, v in rec["stats"].items() if not isinstance(v, list | dict)),
        )
    console.print(table)
    for rec in (variant.report or {}).get("passes", []):
        if rec["name"] == "selective_fp8" and "layers" in rec["stats"]:
            print_fp8_report(rec["stats"])
    if variant.plan is not None:
        print_plan(variant.plan)
    console.print(
        f"bundle written to [bold]{out}[/] in {time.perf_counter() - t0:.1f} s "
        f"(cache key {variant.cache_key[:12]})"
    )
    return 0


def print_plan(plan: Plan) -> None:
    """A sharding plan as a per-device table, with the bound it is measured against."""
    table = Table(title=f"embedding sharding: {len(plan.tables)} tables on {plan.topology.describe()}")
    for col in ("device", "host", "shards", "by kind", "memory", "of capacity", "lookup", "comm", "total"):
        table.add_column(col)
    for row in plan.per_device():
        table.add_row(
            str(row["device"]),
            str(row["host"]),
            str(row["shards"]),
            ", ".join(f"{k} {v}" for k, v in sorted(row["by_kind"].items())),
            _fmt_n(row["bytes"], "B"),
            f"{row['bytes'] / max(row['capacity_bytes'], 1):.0%}",
            _fmt_s(row["lookup_s"]),
            _fmt_s(row["comm_s"]),
            _fmt_s(row["cost_s"]),
        )
    console.print(table)
    kinds: dict[str, int] = {}
    for kind in plan.kinds.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    console.print(
        f"slowest device {_fmt_s(plan.max_cost_s)} per step of {plan.workload.batch_per_device} candidates "
        f"per device; lower bound {_fmt_s(plan.lower_bound_s)} (simple bound {_fmt_s(plan.simple_lower_bound_s)}): "
        f"[bold]{plan.gap:.3f}x[/] the bound; tables by type {kinds}; planned in {plan.planning_s:.2f} s"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    workload = _workload(args)
    program = capture(workload)
    if args.devices < 1:
        raise CodesignError(f"--devices must be >= 1, got {args.devices}", fix="plan for 1 or more devices")
    target = get_target(args.target, args.devices)
    constraints = tuple(tuple(c.split("=", 1)) for c in args.force or ())
    if any(len(c) != 2 for c in constraints):
        raise CodesignError(
            f"--force takes table=type pairs, got {args.force}", fix="e.g. --force tables.0.weight=row_wise"
        )
    kinds = parse_sharding_types(args.types)
    config = ShardingConfig(
        devices=args.devices,
        sharding_types=args.types if args.types in SHARDING_PRESETS else "all",
        allowed_types=() if args.types in SHARDING_PRESETS else kinds,
        memory_margin=args.margin,
        table_format=args.table_format,
        batch_per_device=args.batch_per_device,
        constraints=constraints,  # type: ignore[arg-type]
    )
    result = ShardEmbeddings(config).apply(program, target)
    if "sharding_plan" not in program.metadata:
        raise CodesignError(f"nothing to plan for {workload.name}: {result.stats.get('skipped')}")
    plan = Plan.from_dict(program.metadata["sharding_plan"])
    print_plan(plan)
    out = args.out or Path(f"{workload.name}-{target.name}-{args.devices}.plan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(plan.to_json())
    console.print(f"plan written to [bold]{out}[/]")
    return 0


def print_fp8_report(stats: dict[str, Any]) -> None:
    """The selective_fp8 pass's report: every layer's sensitivity and predicted gain, the choice."""
    table = Table(title=f"selective FP8 for {stats.get('target', '?')}: NE budget {stats.get('budget_pct')}%")
    for col in (
        "layer",
        "module",
        "kind",
        "shape",
        "NE cost %",
        "max logit err",
        "SQNR dB",
        "saving µs",
        "chosen",
    ):
        table.add_column(col)
    for layer in stats.get("layers", []):
        cost = layer["ne_loss_pct"]
        table.add_row(
            layer["node"],
            layer["module"],
            layer["kind"],
            "×".join(map(str, layer["shape"])),
            "-" if cost is None else f"{cost:.4f}",
            "-" if layer["max_logit_error"] is None else f"{layer['max_logit_error']:.2g}",
            "-" if layer["sqnr_db"] is None else f"{layer['sqnr_db']:.1f}",
            f"{layer['saving_s'] * 1e6:.2f}",
            "yes" if layer["chosen"] else f"no: {layer['reason']}",
        )
    console.print(table)
    combined = stats.get("combined_loss_pct")
    console.print(
        f"chosen {len(stats.get('chosen', []))} of {len(stats.get('layers', []))}; combined NE change "
        + ("-" if combined is None else f"{combined:.4f}%")
        + f"; backed off {stats.get('backed_off', [])}; predicted latency "
        f"{stats.get('predicted_latency_before_s', 0) * 1e3:.4f} -> {stats.get('predicted_latency_after_s', 0) * 1e3:.4f} ms"
        f"; parameters {_fmt_n(stats.get('param_bytes_before', 0), 'B')} -> {_fmt_n(stats.get('param_bytes_after', 0), 'B')}"
    )


def cmd_fp8(args: argparse.Namespace) -> int:
    cfg = SelectiveFp8Config(
        quality_budget_pct=args.budget,
        granularity=args.granularity,
        eligible=args.eligible,
        table_format=args.table_format,
        selection=args.selection,
    )
    target = get_target(args.target)
    program = capture(_workload(args))
    passes = [RequestSharing(), CommonSubexpressionElimination(), SelectiveFp8(cfg)]
    _, report = PassManager(passes, target).run(program)
    stats = report.passes[-1].stats
    print_fp8_report(stats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stats, indent=2) + "\n")
        console.print(f"report written to {args.out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    variant = load(args.bundle)
    ok, max_abs = variant.check_reference()
    console.print(
        f"loaded {variant.name} ({variant.backend.name} for {variant.target.name}); checksums ok; "
        f"reference outputs {'match' if ok else 'DIFFER'} (max abs error {max_abs:.3g})"
    )
    counts = [args.candidates] * args.requests
    table = Table(title="scores on synthetic requests (resampled from the bundle's reference requests)")
    for col in ("batch", "requests", "candidates", "median latency", "score mean", "score min", "score max"):
        table.add_column(col)
    for i in range(args.batches):
        batch = resample_batch(variant.reference_inputs, variant.spec, counts, seed=args.seed + i)
        latency = median_latency(partial(variant.score, batch), args.repeats)
        scores = torch.cat([t.reshape(-1).float() for t in output_tensors(variant.score(batch))])
        table.add_row(
            str(i),
            str(batch.num_requests),
            str(batch.num_candidates),
            _fmt_s(latency),
            f"{scores.mean():.4f}",
            f"{scores.min():.4f}",
            f"{scores.max():.4f}",
        )
    console.print(table)
    if not ok:
        console.print("[red]reference outputs differ beyond tolerance[/]")
        return 1
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise CodesignError(f"{flag} takes positive integers separated by commas, got {text!r}")
    return values


def cmd_search(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    settings = ObjectiveSettings(
        candidates=_ints(args.candidates, "--candidates"),
        requests=args.requests,
        measure=args.measure,
        repeats=args.repeats,
        latency_slo_ms=args.slo_ms,
        quality_budget_pct=args.quality_budget,
        memory_capacity_bytes=args.memory_gb * 1e9 if args.memory_gb is not None else None,
        seed=args.seed,
    )
    backends = tuple(b for b in args.backends.split(",") if b) if args.backends else None
    factory_kwargs = {"size": args.size} if args.size else {}
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]search[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    ) as progress:
        task = progress.add_task(f"{args.model} on {args.target}", total=args.trials)

        def advance(study: Any, trial: Any) -> None:
            progress.update(task, completed=min(args.trials, counted_trials(study)))

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
                factory_kwargs=factory_kwargs,
                callbacks=[advance],
            )
        except KeyboardInterrupt:
            progress.stop()
            console.print(
                "[yellow]interrupted[/]: finished trials are kept in the storage; "
                "run the same command again to resume the study"
            )
            return 130
    _print_search(result, args.variants)
    console.print(
        f"{sum(result.counts().values())} trials {result.counts()} in {time.perf_counter() - t0:.1f} s; "
        f"latency {result.latency_source}; study '{result.study_name}' in {result.storage}"
    )
    if args.out:
        console.print(f"result written to [bold]{result.save(args.out)}[/]")
    if result.storage != ":memory:":
        console.print(f"browse it: optuna-dashboard {result.storage}")
    return 0 if result.pareto else 1


def _print_search(result: SearchResult, variants: int) -> None:
    front = result.pareto
    if not front:
        console.print(
            "[red]no feasible complete trial[/]: relax the SLO / quality budget / memory, or run more trials"
        )
        return
    chosen = {c.trial.number: c.label for c in result.select_variants(variants)}
    table = Table(title=f"Pareto front ({len(front)} distinct variants; latency {result.latency_source})")
    for col in (
        "trial",
        "latency",
        "quality loss (NE %)",
        "memory",
        "micro-batch",
        "backend",
        "passes off",
        "chosen",
    ):
        table.add_column(col)
    for t in front:
        values = t.values or (0.0, 0.0, 0.0)
        off = sorted(
            k.removesuffix(".enabled") for k, v in t.params.items() if k.endswith(".enabled") and not v
        )
        backend = ((t.config or {}).get("backend") or {}).get("name", "-")
        table.add_row(
            str(t.number),
            _fmt_s(values[0] / 1e3),
            f"{values[1]:.4f}",
            _fmt_n(values[2] * (1 << 20), "B"),
            str(t.params.get(MICRO_BATCH, "-")),
            backend,
            ", ".join(off) or "-",
            chosen.get(t.number, ""),
        )
    console.print(table)


def cmd_report(args: argparse.Namespace) -> int:
    from codesign.report import SECTIONS, collect, render, save_page, sections_for  # matplotlib only here

    if args.model is not None and not args.measure:
        raise CodesignError("--model is timed beside the bundle: it needs --measure")
    original = _workload(args) if args.model is not None else None
    data = collect(args.inputs, study=args.study_name, measure=args.measure, original=original)
    for why in data.not_measured:
        console.print(f"[yellow]not measured:[/] {why}", highlight=False)
    page = render(data, title=args.title)
    save_page(page, args.out)
    shown = [SECTIONS[k] for k in sections_for(data)]
    console.print(f"report written to [bold]{args.out}[/] ({len(page) / 1e3:.0f} kB): {', '.join(shown)}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    table = Table(title="target catalogue (dense peaks)")
    for col in ("target", "bf16", "fp8", "fp32", "HBM BW", "memory", "link", "source"):
        table.add_column(col)
    for name in target_names():
        hw = get_target(name).hardware if name == "host" else CATALOGUE[name]
        rates = hw.matmul_flops_per_s
        table.add_row(
            name,
            _fmt_n(rates.get("bf16", 0), "FLOP/s"),
            _fmt_n(rates["fp8"], "FLOP/s") if "fp8" in rates else "-",
            _fmt_n(rates.get("fp32", 0), "FLOP/s"),
            _fmt_n(hw.memory_bandwidth_bytes_per_s, "B/s"),
            _fmt_n(hw.memory_bytes, "B"),
            _fmt_n(hw.interconnect_bandwidth_bytes_per_s, "B/s"),
            hw.source,
        )
    console.print(table)
    return 0


def _policy(args: argparse.Namespace) -> Policy | None:
    """The router policy the flags describe (None: keep the bundle's)."""
    if args.policy is None:
        return None
    if args.policy == "budgeted":
        return BudgetedPolicy(default_budget_ms=args.budget_ms, headroom=args.headroom)
    if args.policy == "load-aware":
        return LoadAwarePolicy(default_budget_ms=args.budget_ms, headroom=args.headroom)
    if args.policy.startswith("fixed:"):
        return RulesPolicy((), args.policy.removeprefix("fixed:"))
    if args.policy.startswith("rules:"):
        path = Path(args.policy.removeprefix("rules:"))
        try:
            data = json.loads(path.read_text())
            rules = tuple(Rule(r["variant"], r.get("when", {}), r.get("name", "")) for r in data["rules"])
            return RulesPolicy(rules, data["default"])
        except OSError as exc:
            raise CodesignError(f"cannot read rules file {path}: {exc.strerror}") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CodesignError(
                f"rules file {path} is malformed ({exc!r})",
                fix='write {"rules": [{"variant": "short", "when": {"history_length": ["<", 32]}}], "default": "full"}',
            ) from exc
    raise CodesignError(
        f"unknown policy {args.policy!r}",
        fix="use budgeted, load-aware, fixed:<variant> or rules:<file.json>",
    )


def _add_policy_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--policy",
        default=default,
        help="budgeted | load-aware | fixed:<variant> | rules:<file.json>"
        + ("" if default else " (default: the bundle's router.json)"),
    )
    p.add_argument("--budget-ms", type=float, default=100.0, help="latency budget of requests that send none")
    p.add_argument("--headroom", type=float, default=0.2, help="fraction of the budget kept free")


def print_bundle(bundle: Bundle) -> None:
    table = Table(title=f"variants ({bundle.router().policy_name} policy)")
    for col in (
        "variant",
        "quality loss %",
        "quality source",
        "L(64)",
        "L(1024)",
        "latency source",
        "memory",
        "status",
    ):
        table.add_column(col)
    for name, p in bundle.profiles.items():
        table.add_row(
            name,
            f"{p.quality_loss_pct:.4f}",
            p.quality_source,
            _fmt_s(p.latency(64)),
            _fmt_s(p.latency(1024)),
            p.latency.source,
            _fmt_n(p.memory_bytes, "B"),
            "up" if name in bundle.variants else f"[red]failed: {bundle.failed.get(name, '')}[/]",
        )
    console.print(table)


def cmd_bundle(args: argparse.Namespace) -> int:
    policy = _policy(args) or LoadAwarePolicy(default_budget_ms=args.budget_ms, headroom=args.headroom)
    features = FeatureConfig(history_input=args.history_input or "")
    if args.from_search is not None:
        if args.variant:
            raise CodesignError("give either --variant NAME=BUNDLE or --from-search RESULT, not both")
        if args.model is None:
            raise CodesignError("--from-search needs --model (the model the search tuned)")
        result = SearchResult.load(args.from_search)
        kwargs = {"size": args.size} if args.size else {}
        bundle = Bundle.from_search(result, load_model_ref(args.model, **kwargs), k=args.k, policy=policy)
        bundle.features = features
    else:
        if not args.variant:
            raise CodesignError(
                "name the variants: --variant NAME=BUNDLE_DIR (twice or more), or --from-search"
            )
        variants: dict[str, Variant] = {}
        for item in args.variant:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise CodesignError(f"--variant takes NAME=BUNDLE_DIR, got {item!r}")
            variants[name] = load(path)
        bundle = Bundle.build(
            variants,
            policy=policy,
            features=features,
            quality_reference=args.quality_reference,
            repeats=args.repeats,
        )
    bundle.save(args.out, overwrite=args.overwrite)
    print_bundle(bundle)
    console.print(f"bundle with {len(bundle.variants)} variants written to [bold]{args.out}[/]")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from codesign.serving.server import BatchingConfig, Runtime, Server

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    print_bundle(bundle)
    batching = BatchingConfig(
        max_requests=args.max_batch_requests,
        max_candidates=args.max_batch_candidates,
        max_delay_ms=args.max_delay_ms,
    )
    server = Server(Runtime(bundle, policy=_policy(args), batching=batching), args.host, args.port)
    console.print(
        f"serving {args.bundle} at [bold]{server.url}[/] (POST /v1/score, GET /v1/schema /healthz /metrics); Ctrl-C stops"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        server.runtime.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codesign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="capture a model and print its cost profile per target")
    p.add_argument("model", help="path/to/file.py:factory or an example name")
    p.add_argument("--size", help="example size passed to the factory (tiny, small, large)")
    p.add_argument("--candidates", type=int, default=1024)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--targets", nargs="*", help=f"targets to predict (default all: {target_names()})")
    p.add_argument("--top", type=int, default=15)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("compile", help="capture, optimize, lower and save a bundle")
    p.add_argument("model")
    p.add_argument("--size")
    p.add_argument("--target", default="host", help=f"one of {target_names()}")
    p.add_argument("--backend", default="eager", choices=backend_names())
    p.add_argument(
        "--devices", type=int, default=1, help="devices of the target (>1 plans embedding sharding)"
    )
    p.add_argument(
        "--passes",
        help="comma-separated pass names (default: all: request_sharing, cse, the fusion passes, cleanup)",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "fp8", help="selective FP8 analysis: per-layer NE cost and predicted gain on a target, and the choice"
    )
    p.add_argument("model")
    p.add_argument("--size")
    p.add_argument("--target", default="h100", help="a target with FP8 (predictions are for it)")
    p.add_argument("--budget", type=float, default=0.1, help="NE budget in percent")
    p.add_argument("--granularity", default="row", choices=("row", "tensor"))
    p.add_argument(
        "--eligible", default="linear+embedding", choices=("linear", "embedding", "linear+embedding")
    )
    p.add_argument("--table-format", default="fp8", choices=("fp8", "int8"))
    p.add_argument("--selection", default="greedy", choices=("greedy", "knapsack"))
    p.add_argument("--out", type=Path, help="write the report as JSON")
    p.set_defaults(func=cmd_fp8)

    p = sub.add_parser("plan", help="plan embedding sharding across devices; print and save the plan")
    p.add_argument("model")
    p.add_argument("--size")
    p.add_argument("--target", default="h100", help=f"one of {target_names()}")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument(
        "--types", default="all", help=f"preset {sorted(SHARDING_PRESETS)} or a comma list of types"
    )
    p.add_argument("--margin", type=float, default=0.1, help="fraction of device memory kept free")
    p.add_argument("--table-format", default="model", choices=("model", *TABLE_FORMATS))
    p.add_argument("--batch-per-device", type=int, default=8192)
    p.add_argument("--force", nargs="*", help="table=type pairs that fix a table's sharding type")
    p.add_argument("--out", type=Path, help="plan JSON (default <model>-<target>-<devices>.plan.json)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="load a bundle (verifying it) and score synthetic requests")
    p.add_argument("bundle", type=Path)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "search",
        help="tune pass knobs, backend and micro-batch with Optuna; print the Pareto front",
        description="Multi-objective search (latency, NE quality loss, memory). Several processes "
        "with the same --storage and --study-name share one study; a rerun resumes it.",
    )
    p.add_argument("model")
    p.add_argument("--size")
    p.add_argument("--target", default="h100", help=f"one of {target_names()}")
    p.add_argument("--trials", type=int, default=100, help="finished trials the study should hold")
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="sqlite:///file.db (default), postgresql://..., journal:file.log or :memory:",
    )
    p.add_argument("--study-name", help="default: <model>-<target>-<measured|predicted>")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS)
    p.add_argument("--candidates", default="64,1024", help="candidates per request at which latency is taken")
    p.add_argument("--requests", type=int, default=1, help="requests per call")
    p.add_argument(
        "--measure",
        default="auto",
        choices=("auto", "predicted", "measured"),
        help="auto: measured for target host, cost model otherwise",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per candidate count (measured)")
    p.add_argument("--slo-ms", type=float, help="latency SLO (constraint on the worst candidate count)")
    p.add_argument("--quality-budget", type=float, default=0.1, help="largest NE change in percent")
    p.add_argument("--memory-gb", type=float, help="memory capacity (default: the target's)")
    p.add_argument("--backends", help="comma-separated backends to search (measured searches)")
    p.add_argument("--variants", type=int, default=3, help="variants to pick from the front")
    p.add_argument("--out", type=Path, help="write the result (all trials, front) as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "bundle",
        help="assemble a multi-variant bundle (variants + profiles + router policy)",
        description="From single-variant bundles (--variant NAME=DIR ...) or from a search result "
        "(--from-search result.json --model m): profile every variant and write the bundle.",
    )
    p.add_argument("out", type=Path)
    p.add_argument("--variant", action="append", default=[], help="NAME=BUNDLE_DIR (repeat)")
    p.add_argument("--quality-reference", help="variant the others' NE change is measured against")
    p.add_argument("--from-search", type=Path, help="a result JSON written by codesign search --out")
    p.add_argument("--model", help="the searched model (with --from-search)")
    p.add_argument("--size")
    p.add_argument("--k", type=int, default=3, help="variants to take from the search's front")
    p.add_argument(
        "--history-input", help="request-level id input whose length is the history_length feature"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per latency-curve point")
    p.add_argument("--overwrite", action="store_true")
    _add_policy_flags(p, "load-aware")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("serve", help="serve a bundle over HTTP: /v1/score, /v1/schema, /healthz, /metrics")
    p.add_argument("bundle", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-requests", type=int, default=16)
    p.add_argument("--max-batch-candidates", type=int, default=8192)
    p.add_argument("--max-delay-ms", type=float, default=1.0, help="how long a batch waits for more requests")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    _add_policy_flags(p, None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report from bundles, search results, FP8 reports, plans",
        description="Inputs: bundle directories (single- or multi-variant), JSON written by codesign "
        "search/fp8/plan --out, or an Optuna storage URL with --study. Sections appear only where "
        "the inputs hold their data.",
    )
    p.add_argument("inputs", nargs="+", help="bundle directories, result/report/plan JSON, storage URLs")
    p.add_argument("--out", "-o", type=Path, default=Path("codesign-report.html"))
    p.add_argument("--study-name", help="the study to read from a storage URL input")
    p.add_argument("--title", help="page title (default: the model names)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also time each variant that runs here at one request of 1..1024 candidates",
    )
    p.add_argument(
        "--model", help="with --measure: the model the bundles came from, timed eagerly beside them"
    )
    p.add_argument("--size", help="the model's size (with --model)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("targets", help="list the target catalogue")
    p.set_defaults(func=cmd_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.func(args))
    except CodesignError as exc:
        console.print(f"[red]error:[/] {exc.message}", highlight=False)
        if exc.fix:
            console.print(f"[yellow]fix:[/] {exc.fix}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
