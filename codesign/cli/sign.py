"""``codesign sign``: sign a bundle with an Ed25519 key (``codesign keygen`` makes one).

A bundle that carries native code (AOTInductor, TensorRT) is served only when a trusted key signed
it (``codesign serve --trusted-key PUB``) or the operator passes ``--allow-unsigned-native``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codesign.cli.flags import command_parser
from codesign.cli.output import out

if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers

NAME = "sign"
HELP = "sign a bundle's manifest with an Ed25519 key (needed to serve native code: aoti, tensorrt)"


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        p.add_argument("bundle", type=Path, help="a bundle directory (single- or multi-variant)")
        p.add_argument("--key", type=Path, required=True, help="the private key (PEM) from codesign keygen")
    p.set_defaults(handler=run_sign)


def run_sign(args: argparse.Namespace) -> int:
    from codesign.build.signing import sign_bundle

    key = sign_bundle(args.bundle, args.key)
    out().print(f"signed {args.bundle} with key {key} ({args.bundle / 'signature.json'})", highlight=False)
    return 0


def add_trust_flags(p: argparse.ArgumentParser) -> None:
    """``--trusted-key`` and ``--allow-unsigned-native``, for commands that load bundles."""
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        help="public key (PEM) whose signature lets a bundle's native code load; repeatable",
    )
    p.add_argument(
        "--allow-unsigned-native",
        action="store_true",
        help="load native code (aoti, tensorrt) from unsigned bundles: a resealed bundle's shared library "
        "runs its code when opened",
    )
