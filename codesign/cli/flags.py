"""Flag types shared by the commands: validators that reject bad values at parse time (exit 2,
naming the flag), the help formatter that shows every default, and flags derived from knobs.

Nothing here imports torch: ``codesign --help`` builds every command's parser from this module.
"""

from __future__ import annotations

import argparse
import ast
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "DEFAULT_FP8_TARGET",
    "DEFAULT_TARGET",
    "HelpFormatter",
    "add_json_flag",
    "add_knob_flags",
    "add_model_flags",
    "add_verify_flag",
    "command_parser",
    "example_sizes",
    "fraction",
    "int_list",
    "knob_values",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
]


class Knob(Protocol):
    """What a flag needs of a pass's or backend's knob (``Pass.knobs()``)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def default(self) -> Any: ...
    @property
    def low(self) -> float | None: ...
    @property
    def high(self) -> float | None: ...
    @property
    def choices(self) -> tuple[Any, ...]: ...
    @property
    def doc(self) -> str: ...


# One default target for every command that compiles, plans or searches, so that the output of one
# command (a search result, a plan) is valid input to the next (bundle --from-search compiles it here).
DEFAULT_TARGET = "host"
# fp8 predicts the gain of FP8 matrix units; the host has none, so its default is a target that does.
DEFAULT_FP8_TARGET = "h100"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps descriptions as written and appends every flag's default, also the unset ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        if action.default is None:
            return f"{text} (default: not set)"
        return f"{text} (default: %(default)s)"


def command_parser(sub: Subparsers, name: str, help: str, description: str = "") -> argparse.ArgumentParser:
    """A command's parser, with the formatter that shows defaults."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(  # noqa: B904 (argparse shows only this message)
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ranged(
    kind: type[int] | type[float],
    low: float | None = None,
    high: float | None = None,
    *,
    open_high: bool = False,
) -> Callable[[str], Any]:
    """A ``type=`` for numbers in [low, high] (or [low, high) with ``open_high``)."""

    def check(text: str) -> Any:
        value = _number(text, kind)
        too_high = high is not None and (value >= high if open_high else value > high)
        if (low is not None and value < low) or too_high:
            if high is None:
                want = f">= {low:g}"
            elif low is None:
                want = f"{'<' if open_high else '<='} {high:g}"
            else:
                want = f"in [{low:g}, {high:g}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    check.__name__ = kind.__name__
    return check


positive_int = ranged(int, 1)
non_negative_int = ranged(int, 0)
port = ranged(int, 0, 65535)  # 0: the system picks a free port (the server prints it)
non_negative_float = ranged(float, 0.0)
fraction = ranged(float, 0.0, 1.0, open_high=True)


def positive_float(text: str) -> float:
    """A number > 0 (a time budget, a capacity)."""
    value = float(_number(text, float))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """Positive integers separated by commas (``64,1024``)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes positive integers separated by commas, got {text!r}")
    return values


def _examples_dir() -> Path:
    # the source checkout's examples/ (codesign.ir.workload.examples_dir, which imports torch)
    return Path(__file__).resolve().parent.parent.parent / "examples"


def example_sizes() -> tuple[str, ...]:
    """The sizes the example models take, read from their ``SIZES`` tables without importing them."""
    sizes: list[str] = []
    for path in sorted(_examples_dir().glob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Dict):
                continue
            if any(getattr(t, "id", "") == "SIZES" for t in node.targets):
                keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
                sizes += [k for k in keys if isinstance(k, str) and k not in sizes]
    return tuple(sizes)


def add_model_flags(p: argparse.ArgumentParser, *, positional: bool = True, what: str = "") -> None:
    """The model reference and its size."""
    if positional:
        p.add_argument(
            "model", help="path/to/file.py:factory or an example name (dlrm, dcnv2, din, multitask, useq)"
        )
    sizes = example_sizes()
    p.add_argument(
        "--size",
        choices=sizes or None,
        help=f"size passed to the model's factory{what} (default: the factory's own)",
    )


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        choices=["fresh_process", "in_process", "none"],
        default="fresh_process",
        help="prove the bundle before it appears: reload and score its reference batch in a new Python "
        "process (default), in this one, or not at all",
    )


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout (tables and notes are left out)",
    )


def add_knob_flags(
    p: argparse.ArgumentParser,
    knobs: Iterable[Knob],
    *,
    aliases: dict[str, str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """One flag per knob (``--quality-budget-pct``), typed and bounded by the knob's declaration.

    ``aliases`` keeps a short flag the CLI had before (``quality_budget_pct`` -> ``--budget``).
    """
    aliases = aliases or {}
    skipped = set(skip)
    for k in knobs:
        if k.name in skipped:
            continue
        names = [f"--{k.name.replace('_', '-')}"]
        if k.name in aliases:
            names.insert(0, aliases[k.name])
        kwargs: dict[str, Any] = {"dest": k.name, "default": k.default, "help": k.doc or k.name}
        if k.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif k.kind == "categorical":
            kwargs["choices"] = k.choices
            kwargs["type"] = type(k.default) if k.default is not None else str
        else:
            kwargs["type"] = ranged(int if k.kind == "int" else float, k.low, k.high)
        p.add_argument(*names, **kwargs)


def knob_values(args: argparse.Namespace, knobs: Iterable[Knob], skip: Iterable[str] = ()) -> dict[str, Any]:
    """The knob values the flags of ``add_knob_flags`` parsed, by knob name."""
    skipped = set(skip)
    return {k.name: getattr(args, k.name) for k in knobs if k.name not in skipped}
