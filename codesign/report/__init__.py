"""``codesign report``: one self-contained HTML page from bundles, search results, FP8 reports and plans.

>>> from codesign.report import write_report
>>> write_report(["out/demo-bundle", "out/demo-routed"], "out/demo-report.html")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from codesign.ir.workload import Workload
from codesign.report.html import SECTIONS, render, sections_for
from codesign.report.measure import MEASURE_CANDIDATES, measure_scaling
from codesign.report.sources import ReportData, VariantRecord, load_sources

__all__ = [
    "MEASURE_CANDIDATES",
    "SECTIONS",
    "ReportData",
    "VariantRecord",
    "build_report",
    "collect",
    "load_sources",
    "measure_scaling",
    "render",
    "save_page",
    "sections_for",
    "write_report",
]


def collect(
    inputs: Sequence[str | Path],
    *,
    study: str | None = None,
    measure: bool = False,
    original: Workload | None = None,
) -> ReportData:
    """Read ``inputs`` (see ``load_sources``); with ``measure=True`` also time each variant that runs
    on this machine (and ``original``, the model it was compiled from, eagerly) at one request of
    1 … 1024 candidates (``measure_scaling``; variants not measured are listed in ``not_measured``)."""
    data = load_sources(inputs, study=study)
    if measure:
        measure_scaling(data, original=original)
    return data


def save_page(page: str, out: str | Path) -> Path:
    """Write a rendered page to ``out``, creating its folder."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def build_report(
    inputs: Sequence[str | Path],
    *,
    study: str | None = None,
    title: str | None = None,
    measure: bool = False,
    original: Workload | None = None,
) -> str:
    """The report's HTML for ``inputs`` (see ``collect``)."""
    return render(collect(inputs, study=study, measure=measure, original=original), title=title)


def write_report(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    study: str | None = None,
    title: str | None = None,
    measure: bool = False,
    original: Workload | None = None,
) -> Path:
    """Write the report to ``out`` (one HTML file; charts embedded, nothing fetched when opened)."""
    return save_page(build_report(inputs, study=study, title=title, measure=measure, original=original), out)
