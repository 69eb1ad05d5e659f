"""The router-policy flags that ``bundle`` and ``serve`` share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.cli.flags import fraction, positive_float
from codesign.cli.output import fmt_n, fmt_s, table

if TYPE_CHECKING:
    from codesign.serving.deployment import Bundle
    from codesign.serving.router import Policy

__all__ = ["add_policy_flags", "bundle_renderables", "policy_from_args"]


def add_policy_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--policy",
        default=default,
        help="budgeted | load-aware | fixed:<variant> | rules:<file.json>"
        + ("" if default else " (default: the bundle's router.json)"),
    )
    p.add_argument(
        "--budget-ms", type=positive_float, default=100.0, help="latency budget of requests that send none"
    )
    p.add_argument(
        "--headroom", type=fraction, default=0.2, help="fraction of the budget kept free, in [0, 1)"
    )


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    """The router policy the flags describe (None: keep the bundle's)."""
    from codesign.errors import CodesignError
    from codesign.serving.router import BudgetedPolicy, LoadAwarePolicy, Rule, RulesPolicy

    if args.policy is None:
        return None
    if args.policy == "budgeted":
        return BudgetedPolicy(default_budget_ms=args.budget_ms, headroom=args.headroom)
    if args.policy == "load-aware":
        return LoadAwarePolicy(default_budget_ms=args.budget_ms, headroom=args.headroom)
    if args.policy.startswith("fixed:"):
        return RulesPolicy((), args.policy.removeprefix("fixed:"))
    if args.policy.startswith("rules:"):
        path = Path(args.policy.removeprefix("rules:"))
        try:
            data = json.loads(path.read_text())
            rules = tuple(Rule(r["variant"], r.get("when", {}), r.get("name", "")) for r in data["rules"])
            return RulesPolicy(rules, data["default"])
        except OSError as exc:
            raise CodesignError(f"cannot read rules file {path}: {exc.strerror}") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CodesignError(
                f"rules file {path} is malformed ({exc!r})",
                fix='write {"rules": [{"variant": "short", "when": {"history_length": ["<", 32]}}], "default": "full"}',
            ) from exc
    raise CodesignError(
        f"unknown policy {args.policy!r}",
        fix="use budgeted, load-aware, fixed:<variant> or rules:<file.json>",
    )


def bundle_renderables(bundle: Bundle) -> tuple[list[Any], list[dict[str, Any]]]:
    """A multi-variant bundle's variants as a table, and as records."""
    records: list[dict[str, Any]] = [
        {
            "variant": name,
            "quality_loss_pct": p.quality_loss_pct,
            "quality_source": p.quality_source,
            "latency_64_s": p.latency(64),
            "latency_1024_s": p.latency(1024),
            "latency_source": p.latency.source,
            "memory_bytes": p.memory_bytes,
            "up": name in bundle.variants,
            "failed": bundle.failed.get(name),
        }
        for name, p in bundle.profiles.items()
    ]
    rows = [
        (
            r["variant"],
            f"{r['quality_loss_pct']:.4f}",
            r["quality_source"],
            fmt_s(r["latency_64_s"]),
            fmt_s(r["latency_1024_s"]),
            r["latency_source"],
            fmt_n(r["memory_bytes"], "B"),
            "up" if r["up"] else f"[red]failed: {r['failed'] or ''}[/]",
        )
        for r in records
    ]
    columns = (
        "variant",
        "quality loss %",
        "quality source",
        "L(64)",
        "L(1024)",
        "latency source",
        "memory",
        "status",
    )
    return [table(f"variants ({bundle.router().policy_name} policy)", columns, rows)], records
