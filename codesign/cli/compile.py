"""``codesign compile``: capture, optimize, lower and save a single-variant bundle."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import (
    DEFAULT_TARGET,
    add_json_flag,
    add_model_flags,
    add_verify_flag,
    command_parser,
    positive_int,
)
from codesign.cli.output import cell, fmt_s, show, steps, table

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "compile"
HELP = "capture, optimize, lower and save a bundle"


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        add_model_flags(p)
        p.add_argument("--target", default=DEFAULT_TARGET, help="a target of 'codesign targets'")
        p.add_argument(
            "--backend", default="eager", help="a backend (an unknown name is refused with the list)"
        )
        p.add_argument(
            "--devices",
            type=positive_int,
            default=1,
            help="devices of the target (>1 plans embedding sharding)",
        )
        p.add_argument(
            "--passes",
            help="comma-separated pass names (default: all: request_sharing, cse, the fusion passes, cleanup)",
        )
        p.add_argument("--out", required=True, type=Path, help="the bundle directory to write")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        add_verify_flag(p)
        p.add_argument(
            "--verify-gates",
            action="store_true",
            help="time both sides of every gated pass decision here and report the wrong ones "
            "(measured more than 10%% against the decision); exit 3 if any",
        )
        p.add_argument("--no-progress", action="store_true", help="draw no progress on stderr")
        add_json_flag(p)
    p.set_defaults(handler=run)


def pass_rows(records: list[dict[str, Any]]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """A compile report's passes: one row each, and their scalar stats as (pass, stat, value) rows."""
    rows: list[tuple[str, ...]] = []
    stats: list[tuple[str, ...]] = []
    for rec in records:
        rows.append(
            (
                str(rec["name"]),
                "yes" if rec["modified"] else "no",
                str(rec["ops_before"]),
                str(rec["ops_after"]),
                f"{rec['max_abs_error']:.2g}",
            )
        )
        for key, value in rec["stats"].items():
            if key != "layers":  # selective_fp8's per-layer report is a table of its own
                stats.append((str(rec["name"]), str(key), cell(value)))
    return rows, stats


def run(args: argparse.Namespace) -> int:
    from codesign.backends import backend_names
    from codesign.build.variant import compile as compile_variant
    from codesign.cli.fp8 import fp8_renderables
    from codesign.cli.models import workload
    from codesign.cli.plan import plan_renderables
    from codesign.errors import BackendError
    from codesign.hardware.target import get_target
    from codesign.passes import pass_by_name

    if args.backend not in backend_names():
        raise BackendError(f"unknown backend {args.backend!r}", fix=f"use one of {backend_names()}")
    t0 = time.perf_counter()
    with steps(["loading the model", "compiling", "saving the bundle"], disable=args.no_progress) as step:
        step("loading the model")
        wl = workload(args)
        passes = [pass_by_name(p)() for p in args.passes.split(",") if p] if args.passes is not None else None
        target = get_target(args.target, args.devices)
        step(f"compiling {wl.name} for {target.name} with {args.backend}")
        variant = compile_variant(
            wl, target=target, backend=args.backend, passes=passes, verify_gates=args.verify_gates
        )
        step("saving the bundle")
        out = variant.save(args.out, overwrite=args.overwrite, verify=args.verify)
    elapsed = time.perf_counter() - t0
    records = (variant.report or {}).get("passes", [])
    rows, stats = pass_rows(records)
    renderables: list[Any] = [
        table(
            f"compiled {wl.name} for {variant.target.name} with {variant.backend.name}",
            ("pass", "modified", "ops before", "ops after", "max abs err"),
            rows,
        ),
        table("pass stats", ("pass", "stat", "value"), stats),
    ]
    for rec in records:
        if rec["name"] == "selective_fp8" and "layers" in rec["stats"]:
            renderables += fp8_renderables(rec["stats"])
    checks = [(r["name"], r["gate_check"]) for r in records if r.get("gate_check")]
    wrong = [name for name, c in checks if c["wrong"]]
    if args.verify_gates:
        renderables.append(
            table("gated decisions, measured", GATE_COLUMNS, [gate_row(n, c) for n, c in checks])
        )
        renderables.append(
            f"[bold red]{len(wrong)} wrong gate decision(s): {', '.join(wrong)}[/]"
            if wrong
            else f"{len(checks)} gated decision(s), none contradicted by measurement"
        )
    if variant.plan is not None:
        renderables += plan_renderables(variant.plan)
    form = variant.spec.form
    renderables.append(
        "request-level inputs: "
        + (
            f"per request ({', '.join(variant.spec.per_request_inputs)}: one row per request)"
            if form == "per_request"
            else "flat (user features repeated on every candidate row)"
        )
    )
    renderables.append(
        f"bundle written to [bold]{out}[/] in {fmt_s(elapsed)} (cache key {variant.cache_key[:12]})"
    )
    result = {
        "out": out,
        "model": wl.name,
        "target": variant.target.name,
        "backend": variant.backend.name,
        "cache_key": variant.cache_key,
        "request_form": form,
        "seconds": elapsed,
        "passes": records,
        "plan": variant.plan.to_dict() if variant.plan is not None else None,
        "wrong_gate_decisions": wrong if args.verify_gates else None,
    }
    show(args, result, *renderables)
    return 3 if wrong else 0


GATE_COLUMNS = (
    "pass",
    "decided by",
    "decision",
    "predicted after/before",
    "measured after/before",
    "verdict",
)


def gate_row(name: str, check: dict[str, Any]) -> tuple[str, ...]:
    """One gated decision as a table row."""
    return (
        name,
        str(check["decided_by"]),
        "kept" if check["kept"] else "discarded",
        f"{check['predicted_ratio']:.3f}",
        f"{check['measured_ratio']:.3f}",
        "WRONG" if check["wrong"] else "ok",
    )
