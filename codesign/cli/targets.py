"""``codesign targets``: the target catalogue with its peak rates and sources."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import add_json_flag, command_parser
from codesign.cli.output import fmt_n, show, table

NAME = "targets"
HELP = "list the target catalogue"


if TYPE_CHECKING:
    from codesign.cli.flags import Subparsers


def register(sub: Subparsers, *, arguments: bool) -> None:
    p = command_parser(sub, NAME, HELP)
    if arguments:
        add_json_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from codesign.hardware.target import CATALOGUE, get_target, target_names

    records: list[dict[str, Any]] = []
    for name in target_names():
        hw = get_target(name).hardware if name == "host" else CATALOGUE[name]
        records.append(
            {
                "name": name,
                "matmul_flops_per_s": dict(hw.matmul_flops_per_s),
                "memory_bandwidth_bytes_per_s": hw.memory_bandwidth_bytes_per_s,
                "memory_bytes": hw.memory_bytes,
                "interconnect_bandwidth_bytes_per_s": hw.interconnect_bandwidth_bytes_per_s,
                "source": hw.source,
            }
        )
    rows = []
    for r in records:
        rates = r["matmul_flops_per_s"]
        rows.append(
            (
                r["name"],
                fmt_n(rates.get("bf16", 0), "FLOP/s"),
                fmt_n(rates["fp8"], "FLOP/s") if "fp8" in rates else "-",
                fmt_n(rates.get("fp32", 0), "FLOP/s"),
                fmt_n(r["memory_bandwidth_bytes_per_s"], "B/s"),
                fmt_n(r["memory_bytes"], "B"),
                fmt_n(r["interconnect_bandwidth_bytes_per_s"], "B/s"),
                r["source"],
            )
        )
    columns = ("target", "bf16", "fp8", "fp32", "HBM BW", "memory", "link", "source")
    show(args, {"targets": records}, table("target catalogue (dense peaks)", columns, rows))
    return 0
