"""The ``codesign`` command: the top-level parser, dispatch to one module per command, and how
failures reach the user (one message on stderr and an exit code, never a traceback).

Parsers are built without torch: a command's module imports what it runs inside its handler, and
only the command being run gets its arguments (some derive them from pass knobs, which need torch).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

from codesign.cli import (
    bundle,
    calibrate,
    compile,
    fp8,
    keygen,
    plan,
    profile,
    report,
    run,
    search,
    serve,
    sign,
    targets,
)
from codesign.cli.flags import HelpFormatter
from codesign.cli.output import err
from codesign.errors import CodesignError
from codesign.version import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (
    profile,
    compile,
    fp8,
    plan,
    run,
    search,
    bundle,
    serve,
    sign,
    keygen,
    report,
    targets,
    calibrate,
)

DESCRIPTION = """\
Compiler-style model-hardware co-design for ranking models: profile, compile, fp8, plan, run,
search, bundle, serve, sign, keygen, report, targets, calibrate. `codesign COMMAND --help` shows a command's flags.

A model reference is path/to/file.py:factory (a function returning a codesign.Workload) or the
name of an example (dlrm, dcnv2, din, multitask, useq).

Exit codes: 0 success, 1 the command ran but its result failed a check, 2 a usage or input error,
130 interrupted."""

# Warnings raised inside libraries (torch export, optuna's experimental features ...) that a CLI
# user cannot act on; -v shows them.
_QUIET_CATEGORIES: tuple[type[Warning], ...] = (
    UserWarning,
    FutureWarning,
    DeprecationWarning,
    RuntimeWarning,
)


def _command_in(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (the first that is not a flag), to build only its arguments."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser; the arguments of ``command`` only (every command's with ``full``)."""
    parser = argparse.ArgumentParser(prog="codesign", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show library warnings")
    parser.add_argument("--version", action="version", version=f"codesign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub, arguments=full or command == module.NAME)
    return parser


def _quiet_library_warnings() -> None:
    for category in _QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("torch").setLevel(logging.ERROR)


def _error(message: str, fix: str | None = None) -> None:
    console = err()
    console.print(f"[red]error:[/] {message}", highlight=False, markup=True)
    if fix:
        console.print(f"[yellow]fix:[/] {fix}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    with warnings.catch_warnings():
        if not args.verbose:
            _quiet_library_warnings()
        try:
            return int(args.handler(args))
        except CodesignError as exc:
            _error(exc.message, exc.fix)
            return 2
        except OSError as exc:  # a path that does not exist, cannot be read or written
            where = f" {exc.filename}" if exc.filename else ""
            _error(f"{exc.strerror or exc}:{where}".rstrip(":"))
            return 2
        except KeyboardInterrupt:
            _error("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
