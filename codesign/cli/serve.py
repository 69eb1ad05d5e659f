"""``codesign serve``: serve a bundle over HTTP (/v1/score, /v1/schema, /healthz, /metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codesign.cli.flags import command_parser, non_negative_float, port, positive_int
from codesign.cli.output import out
from codesign.cli.policy import add_policy_flags, bundle_renderables, policy_from_args

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "serve"
HELP = "serve a bundle over HTTP: /v1/score, /v1/schema, /healthz, /metrics"


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        p.add_argument("bundle", type=Path, help="a bundle directory (single- or multi-variant)")
        p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
        p.add_argument("--port", type=port, default=8000, help="TCP port, 1..65535, or 0 for any free one")
        p.add_argument(
            "--max-batch-requests", type=positive_int, default=16, help="requests per batch at most"
        )
        p.add_argument(
            "--max-batch-candidates", type=positive_int, default=8192, help="candidates per batch at most"
        )
        p.add_argument(
            "--max-delay-ms",
            type=non_negative_float,
            default=1.0,
            help="how long a batch waits for more requests",
        )
        p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
        add_policy_flags(p, None)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from codesign.serving.deployment import load_bundle
    from codesign.serving.http import Server
    from codesign.serving.runtime import BatchingConfig, Runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    console = out()
    for r in bundle_renderables(bundle)[0]:
        console.print(r)
    batching = BatchingConfig(
        max_requests=args.max_batch_requests,
        max_candidates=args.max_batch_candidates,
        max_delay_ms=args.max_delay_ms,
    )
    server = Server(Runtime(bundle, policy=policy_from_args(args), batching=batching), args.host, args.port)
    console.print(
        f"serving {args.bundle} at [bold]{server.url}[/] (POST /v1/score, GET /v1/schema /healthz /metrics); "
        "Ctrl-C stops",
        highlight=False,
        soft_wrap=True,  # one line, so that the address is never split
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        server.runtime.close()
    return 0
