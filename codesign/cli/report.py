"""``codesign report``: one self-contained HTML report from bundles, search results, FP8 reports, plans."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codesign.cli.flags import add_json_flag, add_model_flags, command_parser
from codesign.cli.output import show, steps

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "report"
HELP = "write one self-contained HTML report from bundles, search results, FP8 reports, plans"
DESCRIPTION = (
    "Inputs: bundle directories (single- or multi-variant), JSON written by codesign search/fp8/plan "
    "--out, or an Optuna storage URL with --study-name. Sections appear only where the inputs hold their data."
)


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP, DESCRIPTION)
    if arguments:
        p.add_argument("inputs", nargs="+", help="bundle directories, result/report/plan JSON, storage URLs")
        p.add_argument("--out", "-o", type=Path, default=Path("codesign-report.html"), help="the HTML file")
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
        add_model_flags(p, positional=False, what=" (with --model)")
        p.add_argument("--no-progress", action="store_true", help="draw no progress on stderr")
        add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from codesign.cli.models import workload
    from codesign.errors import CodesignError
    from codesign.report import SECTIONS, collect, render, save_page, sections_for

    if args.model is not None and not args.measure:
        raise CodesignError("--model is timed beside the bundle: it needs --measure")
    reading = "reading inputs and timing variants at 1..1024 candidates" if args.measure else "reading inputs"
    with steps([reading, "rendering", "writing"], disable=args.no_progress) as step:
        step(reading)
        original = workload(args) if args.model is not None else None
        data = collect(args.inputs, study=args.study_name, measure=args.measure, original=original)
        step("rendering")
        page = render(data, title=args.title)
        step("writing")
        save_page(page, args.out)
    shown = [SECTIONS[k] for k in sections_for(data)]
    lines = [f"[yellow]not measured:[/] {why}" for why in data.not_measured]
    lines.append(f"report written to [bold]{args.out}[/] ({len(page) / 1e3:.0f} kB): {', '.join(shown)}")
    result = {"out": args.out, "bytes": len(page), "sections": shown, "not_measured": data.not_measured}
    show(args, result, *lines)
    return 0
