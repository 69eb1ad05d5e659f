"""``codesign profile``: capture a model and print its cost profile, op by op and per target."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import add_json_flag, add_model_flags, command_parser, positive_int
from codesign.cli.output import fmt_n, fmt_s, show, table

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "profile"
HELP = "capture a model and print its cost profile per target"


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        add_model_flags(p)
        p.add_argument("--candidates", type=positive_int, default=1024, help="candidates per request")
        p.add_argument("--requests", type=positive_int, default=1, help="requests per call")
        p.add_argument("--targets", nargs="*", help="targets to predict (default: all of 'codesign targets')")
        p.add_argument("--top", type=positive_int, default=15, help="ops listed, slowest first")
        add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from codesign.analysis import analyze
    from codesign.cli.models import workload
    from codesign.hardware.costmodel import estimate_analysis
    from codesign.hardware.target import get_target, target_names
    from codesign.ir.capture import capture

    wl = workload(args)
    analysis = analyze(capture(wl), args.candidates, args.requests)
    host = get_target("host")
    by_name = {o.name: o for o in estimate_analysis(analysis, host).ops}
    ranked = sorted(analysis.kernels, key=lambda n: by_name[n.name].time_s, reverse=True)[: args.top]
    ops: list[dict[str, Any]] = [
        {
            "node": n.name,
            "op": n.op,
            "module": n.module,
            "role": n.role.value,
            "flops": n.flops,
            "bytes": n.bytes,
            "bound": by_name[n.name].bound,
            "host_time_s": by_name[n.name].time_s,
        }
        for n in ranked
    ]
    per_target: list[dict[str, Any]] = []
    for name in args.targets or target_names():
        tgt = get_target(name)
        e = estimate_analysis(analysis, tgt)
        per_target.append(
            {
                "target": tgt.name,
                "latency_s": e.latency_s,
                "compute_s": e.compute_s,
                "memory_s": e.memory_s,
                "launch_s": e.launch_s,
                "footprint_bytes": e.memory_bytes,
                "fits": e.fits_in_memory,
                "runs_here": tgt.runs_here,
            }
        )
    roles = {r.value: v for r, v in analysis.flops_by_role().items()}
    result = {
        "model": wl.name,
        "description": wl.description,
        "kernels": len(analysis.kernels),
        "param_bytes": analysis.param_bytes,
        "total_flops": analysis.total_flops,
        "candidates": analysis.candidates,
        "requests": analysis.requests,
        "flops_per_candidate": analysis.flops_per_candidate(),
        "flops_by_role": roles,
        "top_ops": ops,
        "targets": per_target,
    }
    summary = (
        f"[bold]{wl.name}[/]: {wl.description} — {len(analysis.kernels)} kernels, "
        f"params {fmt_n(analysis.param_bytes, 'B')}, {fmt_n(analysis.total_flops, 'FLOP')} at "
        f"{analysis.candidates} candidates / {analysis.requests} requests "
        f"({fmt_n(analysis.flops_per_candidate(), 'FLOP')} per candidate)"
    )
    op_table = table(
        f"top ops by predicted time on host ({host.hardware.source})",
        ("node", "op", "module", "role", "FLOPs", "bytes", "bound", "host time"),
        (
            (
                o["node"],
                o["op"],
                o["module"] or "-",
                o["role"],
                fmt_n(o["flops"]),
                fmt_n(o["bytes"], "B"),
                o["bound"],
                fmt_s(o["host_time_s"]),
            )
            for o in ops
        ),
        right=("FLOPs", "bytes", "host time"),
    )
    target_table = table(
        "predicted latency per target (roofline model; 'codesign targets' cites sources)",
        ("target", "latency", "compute", "memory", "launch", "footprint", "fits", "runs here"),
        (
            (
                t["target"],
                fmt_s(t["latency_s"]),
                fmt_s(t["compute_s"]),
                fmt_s(t["memory_s"]),
                fmt_s(t["launch_s"]),
                fmt_n(t["footprint_bytes"], "B"),
                "yes" if t["fits"] else "NO",
                "yes" if t["runs_here"] else "no (predicted)",
            )
            for t in per_target
        ),
    )
    roles_line = "FLOPs by role: " + ", ".join(f"{r} {fmt_n(v)}" for r, v in roles.items())
    show(args, result, summary, roles_line, op_table, target_table)
    return 0
