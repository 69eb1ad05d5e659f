"""``codesign keygen``: an Ed25519 key pair for ``codesign sign`` (private key mode 0600)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codesign.cli.flags import command_parser
from codesign.cli.output import out

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "keygen"
HELP = "make an Ed25519 key pair for codesign sign (private key mode 0600)"


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        p.add_argument("private", type=Path, help="where to write the private key (must not exist)")
        p.add_argument("public", type=Path, help="where to write the public key (give it to --trusted-key)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from codesign.build.signing import generate_key

    key = generate_key(args.private, args.public)
    out().print(f"key {key}: private {args.private}, public {args.public}", highlight=False)
    return 0
