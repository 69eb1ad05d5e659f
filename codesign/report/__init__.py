"""``codesign report``: one self-contained HTML page from bundles, search results, FP8 reports and plans.

>>> from codesign.report import write_report
>>> write_report(["out/demo-bundle", "out/demo-routed"], "out/demo-report.html")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from codesign.report.html import SECTIONS, render, sections_for
from codesign.report.sources import ReportData, VariantRecord, load_sources

__all__ = [
    "SECTIONS",
    "ReportData",
    "VariantRecord",
    "build_report",
    "load_sources",
    "render",
    "sections_for",
    "write_report",
]


def build_report(inputs: Sequence[str | Path], *, study: str | None = None, title: str | None = None) -> str:
    """The report's HTML for ``inputs`` (see ``load_sources`` for what each may be)."""
    return render(load_sources(inputs, study=study), title=title)


def write_report(
    inputs: Sequence[str | Path], out: str | Path, *, study: str | None = None, title: str | None = None
) -> Path:
    """Write the report to ``out`` (one HTML file; charts embedded, nothing fetched when opened)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(inputs, study=study, title=title), encoding="utf-8")
    return path
