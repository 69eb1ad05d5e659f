"""``codesign plan``: plan embedding sharding across devices; print and save the plan.

The memory margin and table format flags are the sharding pass's knobs (``ShardEmbeddings.knobs()``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import (
    DEFAULT_TARGET,
    add_json_flag,
    add_knob_flags,
    add_model_flags,
    command_parser,
    knob_values,
    positive_int,
)
from codesign.cli.output import fmt_n, fmt_s, show, table

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers
    from codesign.sharding import Plan

NAME = "plan"
HELP = "plan embedding sharding across devices; print and save the plan"
ALIASES = {"memory_margin": "--margin"}
# --types takes the knob's presets or an explicit comma list, so it is a flag of its own
SKIP = ("sharding_types",)


def _knobs() -> tuple[Any, ...]:
    from codesign.passes.sharding import ShardEmbeddings  # torch: only when this command runs

    return tuple(ShardEmbeddings.knobs())


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        add_model_flags(p)
        p.add_argument("--target", default=DEFAULT_TARGET, help="a target of 'codesign targets'")
        p.add_argument("--devices", type=positive_int, default=8, help="devices to shard across")
        p.add_argument(
            "--types",
            default="all",
            help="a preset of the planner's (all, no_replication, ...) or a comma list of sharding types",
        )
        add_knob_flags(p, _knobs(), aliases=ALIASES, skip=SKIP)
        p.add_argument(
            "--batch-per-device", type=positive_int, default=8192, help="candidates per device per step"
        )
        p.add_argument("--force", nargs="*", help="table=type pairs that fix a table's sharding type")
        p.add_argument(
            "--request-candidates",
            type=positive_int,
            default=1000,
            help="price one request of this many candidates on the plan (lookup, all-to-all, dense, queueing)",
        )
        p.add_argument("--out", type=Path, help="plan JSON (default: <model>-<target>-<devices>.plan.json)")
        add_json_flag(p)
    p.set_defaults(handler=run)


def plan_renderables(plan: Plan, request: int = 1000) -> list[Any]:
    """A sharding plan as a per-device table, with the bound it is measured against and one request of
    ``request`` candidates priced on paper (``codesign.sharding.latency``)."""
    from codesign.sharding.latency import request_latency

    rows = [
        (
            str(row["device"]),
            str(row["host"]),
            str(row["shards"]),
            ", ".join(f"{k} {v}" for k, v in sorted(row["by_kind"].items())),
            fmt_n(row["bytes"], "B"),
            f"{row['bytes'] / max(row['capacity_bytes'], 1):.0%}",
            fmt_s(row["lookup_s"]),
            fmt_s(row["comm_s"]),
            fmt_s(row["cost_s"]),
        )
        for row in plan.per_device()
    ]
    columns = ("device", "host", "shards", "by kind", "memory", "of capacity", "lookup", "comm", "total")
    kinds: dict[str, int] = {}
    for kind in plan.kinds.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = (
        f"slowest device {fmt_s(plan.max_cost_s)} per step of {plan.workload.batch_per_device} candidates "
        f"per device; lower bound {fmt_s(plan.lower_bound_s)} (simple bound {fmt_s(plan.simple_lower_bound_s)}): "
        f"[bold]{plan.gap:.3f}x[/] the bound; tables by type: "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        + f"; planned in {plan.planning_s:.2f} s"
    )
    title = f"embedding sharding: {len(plan.tables)} tables on {plan.topology.describe()}"
    return [table(title, columns, rows), summary, f"on paper, {request_latency(plan, request).describe()}"]


def run(args: argparse.Namespace) -> int:
    from codesign.cli.models import workload
    from codesign.errors import CodesignError
    from codesign.hardware.target import get_target
    from codesign.ir.capture import capture
    from codesign.passes.sharding import (
        SHARDING_PRESETS,
        ShardEmbeddings,
        ShardingConfig,
        parse_sharding_types,
    )
    from codesign.sharding import Plan
    from codesign.sharding.latency import request_latency

    pairs = [c.split("=", 1) for c in args.force or ()]
    if any(len(c) != 2 for c in pairs):
        raise CodesignError(
            f"--force takes table=type pairs, got {args.force}", fix="e.g. --force tables.0.weight=row_wise"
        )
    constraints = tuple((table, kind) for table, kind in pairs)
    wl = workload(args)
    program = capture(wl)
    target = get_target(args.target, args.devices)
    kinds = parse_sharding_types(args.types)
    preset = args.types in SHARDING_PRESETS
    config = ShardingConfig(
        devices=args.devices,
        sharding_types=args.types if preset else "all",
        allowed_types=() if preset else kinds,
        batch_per_device=args.batch_per_device,
        constraints=constraints,
        **knob_values(args, ShardEmbeddings.knobs(), skip=SKIP),
    )
    result = ShardEmbeddings(config).apply(program, target)
    if "sharding_plan" not in program.metadata:
        raise CodesignError(f"nothing to plan for {wl.name}: {result.stats.get('skipped')}")
    plan = Plan.from_dict(program.metadata["sharding_plan"])
    out = args.out or Path(f"{wl.name}-{target.name}-{args.devices}.plan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(plan.to_json())
    show(
        args,
        {
            "out": out,
            "plan": plan.to_dict(),
            "request_latency": request_latency(plan, args.request_candidates).to_dict(),
        },
        *plan_renderables(plan, args.request_candidates),
        f"plan written to [bold]{out}[/]",
    )
    return 0
