"""``codesign calibrate``: measure this machine for the host cost model, or show the cached figures."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import add_json_flag, command_parser
from codesign.cli.output import fmt_n, fmt_s, show, table

NAME = "calibrate"
HELP = "measure this machine for the host cost model (cached per CPU, threads and torch)"


if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        p.add_argument(
            "--force", action="store_true", help="measure again even where a cached calibration exists"
        )
        add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from codesign.hardware.target import calibrate_host, host_calibration_path

    path = host_calibration_path()
    measured = bool(args.force) or not path.is_file()
    hw = calibrate_host(force=bool(args.force))
    record: dict[str, Any] = {
        "cache": str(path),
        "measured": measured,
        "matmul_flops_per_s": dict(hw.matmul_flops_per_s),
        "vector_flops_per_s": hw.vector_flops_per_s,
        "memory_bandwidth_bytes_per_s": hw.memory_bandwidth_bytes_per_s,
        "launch_overhead_s": hw.launch_overhead_s,
        "view_overhead_s": hw.view_overhead_s,
        "op_overhead_s": dict(hw.op_overhead_s),
        "op_bandwidth_bytes_per_s": dict(hw.op_bandwidth_bytes_per_s),
        "source": hw.source,
    }
    rows = [
        *((f"{dtype} GEMM rate", fmt_n(rate, "FLOP/s")) for dtype, rate in hw.matmul_flops_per_s.items()),
        ("elementwise rate", fmt_n(hw.vector_flops_per_s, "FLOP/s")),
        ("memory bandwidth", fmt_n(hw.memory_bandwidth_bytes_per_s, "B/s")),
        ("per-op dispatch", fmt_s(hw.launch_overhead_s)),
        ("per-view dispatch", fmt_s(hw.view_overhead_s)),
        *(
            (f"{kind} ops", f"{fmt_s(fixed)} fixed, {fmt_n(hw.bandwidth_bytes_per_s(kind), 'B/s')}")
            for kind, fixed in hw.op_overhead_s.items()
        ),
    ]
    title = f"host calibration ({'measured now' if measured else 'cached'}: {path})"
    show(args, record, table(title, ("figure", "value"), rows))
    return 0
