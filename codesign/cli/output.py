"""What the commands print: tables on stdout, progress and notes on stderr, or JSON alone on stdout.

``--json`` makes stdout machine-readable: one JSON document, nothing else. Human output uses rich;
progress is drawn on stderr so that it never mixes with a result that is piped on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported on first use: `codesign --help` prints nothing with it
    from rich.console import Console, RenderableType
    from rich.table import Table

__all__ = [
    "cell",
    "err",
    "fmt_n",
    "fmt_s",
    "kv_table",
    "note",
    "out",
    "progress_bar",
    "show",
    "steps",
    "table",
    "to_jsonable",
]


def _console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # a fixed width off a terminal, so that piped output and tests see whole tables
    return Console(stderr=stderr, width=None if stream.isatty() else 140)


class _Consoles:
    """Consoles made on use, so that they write to the streams of the moment (pytest swaps them)."""

    @property
    def out(self) -> Console:
        return _console(False)

    @property
    def err(self) -> Console:
        return _console(True)


_consoles = _Consoles()


def out() -> Console:
    return _consoles.out


def err() -> Console:
    return _consoles.err


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_n(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".strip()


def table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[str] = ()
) -> Table:
    """A rich table from plain rows (each cell rendered with ``str``)."""
    from rich.table import Table

    t = Table(title=title)
    justified = set(right)
    for col in columns:
        t.add_column(col, justify="right" if col in justified else "left")
    for row in rows:
        t.add_row(*(cell if isinstance(cell, str) else str(cell) for cell in row))
    return t


def cell(value: Any, limit: int = 80) -> str:
    """A value as a short table cell (numbers to 4 digits, lists and mappings joined)."""
    text = _cell(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(map(_cell, value)) or "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def kv_table(title: str, items: Mapping[str, Any]) -> Table:
    """A mapping (a pass's stats, a result's summary) as key/value rows, never a Python dict repr."""
    return table(title, ("key", "value"), ((k, cell(v)) for k, v in items.items()))


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: paths as strings, tuples as lists, dataclass-like objects by their ``to_dict``."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if value is None or isinstance(value, str | int | float | bool):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_jsonable(to_dict())
    return str(value)


def show(args: argparse.Namespace, result: Mapping[str, Any], *renderables: RenderableType | str) -> None:
    """The result: as JSON when ``--json`` was given, else the renderables (tables, lines) on stdout."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(to_jsonable(result), indent=2) + "\n")
        return
    console = out()
    for r in renderables:
        console.print(r, highlight=False) if isinstance(r, str) else console.print(r)


def note(text: str) -> None:
    """A remark beside the result (what was not measured, where a file went): stderr."""
    err().print(text, highlight=False)


@contextmanager
def progress_bar(description: str, total: int, *, disable: bool = False) -> Iterator[Any]:
    """A bar on stderr; yields ``update(completed)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err(),
        disable=disable,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)

        def update(completed: int) -> None:
            progress.update(task, completed=min(total, completed))

        yield update


@contextmanager
def steps(names: Sequence[str], *, disable: bool = False) -> Iterator[Any]:
    """Progress through named steps with a spinner on stderr; yields ``step(name)`` to begin the next."""
    from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err(),
        disable=disable,
        transient=True,
    ) as progress:
        task = progress.add_task(names[0] if names else "", total=len(names))
        done = [-1]

        def step(name: str) -> None:
            done[0] += 1
            progress.update(task, completed=done[0], description=name)

        yield step
        progress.update(task, completed=len(names))
