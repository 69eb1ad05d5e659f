"""``codesign fp8``: the selective FP8 pass's analysis (per-layer NE cost, predicted gain, the choice).

Its flags are the pass's knobs (``SelectiveFp8.knobs()``), so a knob added to the pass is a flag here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import (
    DEFAULT_FP8_TARGET,
    add_json_flag,
    add_knob_flags,
    add_model_flags,
    command_parser,
    knob_values,
)
from codesign.cli.output import fmt_n, show, table

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "fp8"
HELP = "selective FP8 analysis: per-layer NE cost and predicted gain on a target, and the choice"
# the short flag the budget knob had before flags were derived from the knobs
ALIASES = {"quality_budget_pct": "--budget"}


def _knobs() -> tuple[Any, ...]:
    from codesign.passes import SelectiveFp8  # torch: only when this command runs or shows its help

    return tuple(SelectiveFp8.knobs())


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        add_model_flags(p)
        p.add_argument(
            "--target",
            default=DEFAULT_FP8_TARGET,
            help="a target with FP8 matrix units (the predictions are for it; the host has none)",
        )
        add_knob_flags(p, _knobs(), aliases=ALIASES)
        p.add_argument("--out", type=Path, help="write the report as JSON")
        add_json_flag(p)
    p.set_defaults(handler=run)


def fp8_renderables(stats: dict[str, Any]) -> list[Any]:
    """The pass's report: a row per layer (every one the pass considered), then the choice."""
    rows = []
    for layer in stats.get("layers", []):
        cost = layer["ne_loss_pct"]
        rows.append(
            (
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
        )
    columns = (
        "layer",
        "module",
        "kind",
        "shape",
        "NE cost %",
        "max logit err",
        "SQNR dB",
        "saving µs",
        "chosen",
    )
    title = f"selective FP8 for {stats.get('target', '?')}: NE budget {stats.get('budget_pct')}%"
    combined = stats.get("combined_loss_pct")
    backed_off = ", ".join(stats.get("backed_off", [])) or "none"
    summary = (
        f"chosen {len(stats.get('chosen', []))} of {len(stats.get('layers', []))}; combined NE change "
        + ("-" if combined is None else f"{combined:.4f}%")
        + f"; backed off: {backed_off}; predicted latency "
        f"{stats.get('predicted_latency_before_s', 0) * 1e3:.4f} -> "
        f"{stats.get('predicted_latency_after_s', 0) * 1e3:.4f} ms; parameters "
        f"{fmt_n(stats.get('param_bytes_before', 0), 'B')} -> {fmt_n(stats.get('param_bytes_after', 0), 'B')}"
    )
    return [table(title, columns, rows), summary]


def run(args: argparse.Namespace) -> int:
    from codesign.cli.models import workload
    from codesign.errors import PassError
    from codesign.hardware.target import get_target
    from codesign.ir.capture import capture
    from codesign.passes import (
        CommonSubexpressionElimination,
        RequestSharing,
        SelectiveFp8,
        SelectiveFp8Config,
    )
    from codesign.passes.manager import Pass, PassManager

    cfg = SelectiveFp8Config(**knob_values(args, SelectiveFp8.knobs()))
    target = get_target(args.target)
    why = SelectiveFp8.unavailable(target)
    if why is not None:  # the manager would skip the pass, leaving no report to print
        raise PassError(
            f"selective_fp8 cannot plan for this target: {why}", fix="pass --target h100 (or h200, l4)"
        )
    program = capture(workload(args))
    passes: list[Pass] = [RequestSharing(), CommonSubexpressionElimination(), SelectiveFp8(cfg)]
    _, report = PassManager(passes, target).run(program)
    stats = report.passes[-1].stats
    renderables = fp8_renderables(stats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stats, indent=2) + "\n")
        renderables.append(f"report written to {args.out}")
    show(args, stats, *renderables)
    return 0
