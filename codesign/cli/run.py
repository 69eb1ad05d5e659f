"""``codesign run``: load a bundle (verifying it) and score synthetic requests.

A multi-variant bundle (``Bundle.save``) scores every request batch with every variant, so that
each one is checked, timed and compared with the best-quality variant; the router's choice for
requests of that size is marked (what ``codesign serve`` would run).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import add_json_flag, command_parser, non_negative_int, positive_int
from codesign.cli.output import fmt_s, show, table
from codesign.cli.sign import add_trust_flags

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "run"
HELP = "load a bundle (single- or multi-variant, verifying it) and score synthetic requests"
DESCRIPTION = (
    "Load a bundle written by 'codesign compile' or 'codesign bundle' and score synthetic requests "
    "resampled from its reference requests. A multi-variant bundle scores each batch with every variant "
    "(each is checked against its reference outputs, timed, and compared with the best-quality variant) "
    "and marks the variant its router picks for requests of --candidates candidates."
)


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP, DESCRIPTION)
    if arguments:
        p.add_argument("bundle", type=Path, help="a bundle directory")
        p.add_argument("--requests", type=positive_int, default=4, help="requests per batch")
        p.add_argument("--candidates", type=positive_int, default=16, help="candidates per request")
        p.add_argument("--batches", type=positive_int, default=3, help="batches to score")
        add_trust_flags(p)
        p.add_argument(
            "--repeats", type=positive_int, default=5, help="timed calls per batch (the median is shown)"
        )
        p.add_argument(
            "--seed", type=non_negative_int, default=0, help="seed of the first batch's resampling"
        )
        add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from codesign.hardware.timing import median_latency
    from codesign.ir.request import resample_batch
    from codesign.numerics import output_tensors
    from codesign.serving.deployment import load_bundle
    from codesign.serving.router import RequestFeatures

    bundle = load_bundle(
        args.bundle,
        strict=True,
        trusted_keys=args.trusted_key,
        allow_unsigned_native=args.allow_unsigned_native,
    )
    router = bundle.router()
    decision = router.decide(RequestFeatures(candidates=args.candidates))
    best = next(n for n in router.by_quality if n in bundle.variants)
    checks = []
    for name, variant in bundle.variants.items():
        ok, max_abs = variant.check_reference()
        checks.append(
            {
                "variant": name,
                "backend": variant.backend.name,
                "target": variant.target.name,
                "reference_ok": ok,
                "max_abs_error": max_abs,
            }
        )
    first = next(iter(bundle.variants.values()))
    counts = [args.candidates] * args.requests
    batches: list[dict[str, Any]] = []
    for i in range(args.batches):
        batch = resample_batch(first.reference_inputs, first.spec, counts, seed=args.seed + i)
        scores = {
            name: torch.cat([t.reshape(-1).float() for t in output_tensors(v.score(batch))])
            for name, v in bundle.variants.items()
        }
        for name, variant in bundle.variants.items():
            s = scores[name]
            batches.append(
                {
                    "batch": i,
                    "variant": name,
                    "routed": name == decision.variant,
                    "requests": batch.num_requests,
                    "candidates": batch.num_candidates,
                    "median_latency_s": median_latency(partial(variant.score, batch), args.repeats),
                    "score_mean": float(s.mean()),
                    "score_min": float(s.min()),
                    "score_max": float(s.max()),
                    "max_diff_vs_best": float((s - scores[best]).abs().max()),
                }
            )
    ok = all(c["reference_ok"] for c in checks)
    result = {
        "bundle": args.bundle,
        "policy": router.policy_name,
        "best_quality": best,
        "routing": decision.to_dict(),
        "variants": checks,
        "batches": batches,
        "reference_ok": ok,
    }
    lines = [
        f"loaded {c['variant']} ({c['backend']} for {c['target']}); checksums ok; reference outputs "
        f"{'match' if c['reference_ok'] else 'DIFFER'} (max abs error {c['max_abs_error']:.3g})"
        for c in checks
    ]
    multi = len(bundle.variants) > 1
    columns = [
        "batch",
        "variant",
        "requests",
        "candidates",
        "median latency",
        "score mean",
        "score min",
        "score max",
    ]
    if multi:
        columns += ["max diff vs " + best, "routed"]
        lines.append(
            f"router ({router.policy_name}) for a request of {args.candidates} candidates: {decision.explain()}"
        )
    rows = []
    for b in batches:
        row = [
            str(b["batch"]),
            b["variant"],
            str(b["requests"]),
            str(b["candidates"]),
            fmt_s(b["median_latency_s"]),
            f"{b['score_mean']:.4f}",
            f"{b['score_min']:.4f}",
            f"{b['score_max']:.4f}",
        ]
        if multi:
            row += [f"{b['max_diff_vs_best']:.3g}", "yes" if b["routed"] else ""]
        rows.append(row)
    title = "scores on synthetic requests (resampled from the bundle's reference requests)"
    renderables: list[Any] = [*lines, table(title, columns, rows)]
    if not ok:
        renderables.append("[red]reference outputs differ beyond tolerance[/]")
    show(args, result, *renderables)
    return 0 if ok else 1
