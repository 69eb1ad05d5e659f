"""``codesign bundle``: assemble a multi-variant bundle (variants + profiles + router policy)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codesign.cli.flags import add_json_flag, add_model_flags, add_verify_flag, command_parser, positive_int
from codesign.cli.output import show, steps
from codesign.cli.policy import add_policy_flags, bundle_renderables, policy_from_args
from codesign.cli.sign import add_trust_flags

if TYPE_CHECKING:
    from codesign.build.variant import Variant
    from codesign.cli.flags import Subparsers

NAME = "bundle"
HELP = "assemble a multi-variant bundle (variants + profiles + router policy)"
DESCRIPTION = (
    "From single-variant bundles (--variant NAME=DIR ...) or from a search result "
    "(--from-search result.json --model m): profile every variant and write the bundle."
)


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP, DESCRIPTION)
    if arguments:
        p.add_argument("out", type=Path, help="the bundle directory to write")
        p.add_argument("--variant", action="append", default=[], help="NAME=BUNDLE_DIR (repeat)")
        p.add_argument("--quality-reference", help="variant the others' NE change is measured against")
        p.add_argument("--from-search", type=Path, help="a result JSON written by codesign search --out")
        p.add_argument("--model", help="the searched model (with --from-search)")
        add_model_flags(p, positional=False, what=" (with --model)")
        p.add_argument("--k", type=positive_int, default=3, help="variants to take from the search's front")
        p.add_argument(
            "--history-input", help="request-level id input whose length is the history_length feature"
        )
        p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per latency-curve point")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
        add_trust_flags(p)
        add_verify_flag(p)
        p.add_argument("--no-progress", action="store_true", help="draw no progress on stderr")
        add_policy_flags(p, "load-aware")
        add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from codesign.build.bundle import load
    from codesign.cli.models import workload
    from codesign.errors import CodesignError
    from codesign.search import SearchResult
    from codesign.serving.deployment import Bundle
    from codesign.serving.router import FeatureConfig, LoadAwarePolicy

    policy = policy_from_args(args) or LoadAwarePolicy(
        default_budget_ms=args.budget_ms, headroom=args.headroom
    )
    features = FeatureConfig(history_input=args.history_input or "")
    with steps(["loading variants", "profiling", "saving"], disable=args.no_progress) as step:
        if args.from_search is not None:
            if args.variant:
                raise CodesignError("give either --variant NAME=BUNDLE or --from-search RESULT, not both")
            if args.model is None:
                raise CodesignError("--from-search needs --model (the model the search tuned)")
            step("compiling and profiling the search's variants")
            result = SearchResult.load(args.from_search)
            bundle = Bundle.from_search(result, workload(args), k=args.k, policy=policy)
            bundle.features = features
        else:
            if not args.variant:
                raise CodesignError(
                    "name the variants: --variant NAME=BUNDLE_DIR (twice or more), or --from-search"
                )
            step("loading variants")
            variants: dict[str, Variant] = {}
            for item in args.variant:
                name, sep, path = item.partition("=")
                if not sep or not name or not path:
                    raise CodesignError(f"--variant takes NAME=BUNDLE_DIR, got {item!r}")
                variants[name] = load(
                    path, trusted_keys=args.trusted_key, allow_unsigned_native=args.allow_unsigned_native
                )
            step("profiling the variants")
            bundle = Bundle.build(
                variants,
                policy=policy,
                features=features,
                quality_reference=args.quality_reference,
                repeats=args.repeats,
            )
        step("saving")
        bundle.save(args.out, overwrite=args.overwrite, verify=args.verify)
    renderables, records = bundle_renderables(bundle)
    renderables.append(f"bundle with {len(bundle.variants)} variants written to [bold]{args.out}[/]")
    show(args, {"out": args.out, "policy": bundle.router().policy_name, "variants": records}, *renderables)
    return 0
