"""The report's charts: matplotlib figures written as SVG and embedded as data URIs.

Each chart is its own SVG document inside an ``<img>``, so the HTML needs no file beside it and
no network, and the ids matplotlib writes inside one SVG cannot collide with another's.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so no global backend is touched.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from codesign.build.profiling import VariantProfile
from codesign.errors import ReportError
from codesign.hardware.target import HardwareSpec
from codesign.sharding.types import Plan

__all__ = [
    "fp8_chart",
    "pareto_chart",
    "passes_chart",
    "roofline_chart",
    "router_chart",
    "scaling_chart",
    "sharding_chart",
]

COLORS = {"original": "#9aa5b1", "compiled": "#1f6feb", "chosen": "#d1242f", "other": "#57606a"}
BOUND_MARKERS = {"compute": "o", "memory": "s", "launch": "^"}


def _figure(width: float = 7.0, height: float = 3.6) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(
            "codesign report draws its charts with matplotlib, which is not installed",
            fix="pip install 'codesign[report]'",
        ) from exc
    return Figure(figsize=(width, height), layout="constrained")


def _svg_uri(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "codesign-report"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue().encode()).decode()


def roofline_chart(
    hardware: HardwareSpec, original: Sequence[Mapping[str, Any]], compiled: Sequence[Mapping[str, Any]]
) -> str:
    """Ops at (FLOP/byte, achieved FLOP/s) under the target's rooflines; original hollow, compiled filled."""
    fig = _figure()
    ax = fig.add_subplot()
    points = [
        (label, op)
        for label, ops in (("original", original), ("compiled", compiled))
        for op in ops
        if op["flops"] > 0 and op["bytes"] > 0 and op["time_s"] > 0
    ]
    intensities = [op["flops"] / op["bytes"] for _, op in points] or [1.0]
    lo = 10 ** math.floor(math.log10(min(intensities) / 2))
    hi = 10 ** math.ceil(math.log10(max(intensities) * 2))
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    bandwidth = hardware.memory_bandwidth_bytes_per_s * hardware.memory_efficiency
    peaks = {f"matmul {d}": r * hardware.compute_efficiency for d, r in hardware.matmul_flops_per_s.items()}
    peaks["vector"] = hardware.vector_flops_per_s * hardware.compute_efficiency
    for i, (name, peak) in enumerate(sorted(peaks.items(), key=lambda kv: -kv[1])):
        ax.plot(xs, [min(peak, bandwidth * x) for x in xs], lw=1, color=f"C{i}", label=f"roof: {name}")
    for label in ("original", "compiled"):
        for bound, marker in BOUND_MARKERS.items():
            sel = [op for lab, op in points if lab == label and op["bound"] == bound]
            if not sel:
                continue
            ax.scatter(
                [op["flops"] / op["bytes"] for op in sel],
                [op["flops"] / op["time_s"] for op in sel],
                marker=marker,
                s=28,
                facecolors="none" if label == "original" else COLORS["compiled"],
                edgecolors=COLORS[label],
                label=f"{label} ops ({bound}-bound)",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("predicted FLOP/s")
    ax.set_title(f"roofline on {hardware.name}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _svg_uri(fig)


def passes_chart(passes: Sequence[Mapping[str, Any]]) -> str:
    """Op count after each pass (bars, darker where the pass changed the program) and its max error."""
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    names = ["captured", *(str(p["name"]) for p in passes)]
    counts = [passes[0]["ops_before"] if passes else 0, *(int(p["ops_after"]) for p in passes)]
    colors = [COLORS["original"], *(COLORS["compiled"] if p["modified"] else "#c9d1d9" for p in passes)]
    ax.bar(range(len(names)), counts, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ops in the graph")
    errs = [float(p.get("max_abs_error") or 0.0) for p in passes]
    if any(e > 0 for e in errs):  # a log axis cannot show 0: exact passes get no point
        ax2 = ax.twinx()
        xs = [i + 1 for i, e in enumerate(errs) if e > 0]
        ax2.plot(xs, [e for e in errs if e > 0], "o--", color=COLORS["chosen"], ms=4)
        ax2.set_yscale("log")
        ax2.set_ylabel("max abs error vs captured", color=COLORS["chosen"])
        note = "red: largest error vs the captured model (passes without a point are exact)"
    else:
        note = "every pass exact: max abs error 0 against the captured model"
    ax.set_title(f"the pipeline, pass by pass (dark: the pass changed the program)\n{note}", fontsize=9)
    return _svg_uri(fig)


def scaling_chart(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], target: str) -> str:
    """Latency of one request vs its candidate count, log-log: label -> (candidate counts, seconds).

    Predicted series are solid, measured ones dashed; original and compiled keep one colour each.
    """
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    for label, (candidates, secs) in series.items():
        style = "-" if "predicted" in label else "--"
        color = "C0" if label.startswith("original") else "C1"
        ax.plot(candidates, [s * 1e3 for s in secs], style, marker="o", ms=4, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("candidates in the request")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"request scaling on {target}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg_uri(fig)


def fp8_chart(stats: Mapping[str, Any]) -> str:
    """Each eligible layer: NE cost alone in FP8 vs predicted saving; chosen ones red; the budget line."""
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    layers = [
        lay for lay in stats.get("layers", []) if lay.get("eligible") and lay.get("ne_loss_pct") is not None
    ]
    for chosen in (False, True):
        sel = [lay for lay in layers if bool(lay.get("chosen")) == chosen]
        ax.scatter(
            [max(float(lay["ne_loss_pct"]), 1e-6) for lay in sel],
            [float(lay["saving_s"]) * 1e6 for lay in sel],
            color=COLORS["chosen"] if chosen else COLORS["other"],
            s=30,
            label="chosen for FP8" if chosen else "kept in full precision",
        )
    budget = float(stats.get("budget_pct", 0.0))
    if budget > 0:
        ax.axvline(budget, color=COLORS["chosen"], ls=":", lw=1, label=f"NE budget {budget:g} %")
    ax.axhline(0.0, color="#8c959f", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("|NE change| of the layer alone in FP8 (%)")
    ax.set_ylabel("predicted saving (µs)")
    ax.set_title(f"FP8 sensitivity on {stats.get('target', '?')}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _svg_uri(fig)


def sharding_chart(plan: Plan) -> str:
    """Per-device step cost (lookup + communication + rest) against the plan's lower bound, and memory."""
    fig = _figure(7.0, 3.6)
    ax, mem = fig.subplots(1, 2, width_ratios=(3, 2))
    rows = plan.per_device()
    dev = [r["device"] for r in rows]
    lookup = [r["lookup_s"] * 1e6 for r in rows]
    comm = [r["comm_s"] * 1e6 for r in rows]
    rest = [max(r["cost_s"] * 1e6 - a - b, 0.0) for r, a, b in zip(rows, lookup, comm, strict=True)]
    ax.bar(dev, lookup, label="lookup", color="C0")
    ax.bar(dev, comm, bottom=lookup, label="all-to-all", color="C1")
    ax.bar(dev, rest, bottom=[a + b for a, b in zip(lookup, comm, strict=True)], label="other", color="C7")
    ax.axhline(plan.lower_bound_s * 1e6, color=COLORS["chosen"], ls="--", lw=1.2, label="lower bound")
    ax.set_xlabel("device")
    ax.set_ylabel("cost per step (µs)")
    ax.set_title(f"balance: max {plan.max_cost_s * 1e6:.3g} µs = {plan.gap:.3f}× bound", fontsize=9)
    ax.legend(fontsize=7)
    gib = 2.0**30
    mem.bar(dev, [r["bytes"] / gib for r in rows], color="C2", label="used")
    mem.plot(dev, [r["capacity_bytes"] / gib for r in rows], "_", ms=14, color="k", label="capacity")
    mem.set_xlabel("device")
    mem.set_ylabel("GiB")
    mem.set_title("memory", fontsize=9)
    mem.legend(fontsize=7)
    return _svg_uri(fig)


# Objective field names as a reader says them (chart labels are words, not record keys).
OBJECTIVE_WORDS = {
    "latency_ms": "latency (ms)",
    "quality_loss_pct": "NE change vs the reference (%)",
    "memory_mb": "memory (MB)",
}


def objective_label(name: str) -> str:
    """``latency_ms`` -> ``latency (ms)``; an unknown objective with its underscores as spaces."""
    return OBJECTIVE_WORDS.get(name, name.replace("_", " "))


def pareto_chart(search: Mapping[str, Any]) -> str:
    """Every complete trial (latency vs quality loss, colour = memory); front ringed; chosen named."""
    objectives = list(search.get("objectives", ["latency_ms", "quality_loss_pct", "memory_mb"]))
    trials = [t for t in search.get("trials", []) if t.get("values") is not None]
    if not trials:
        raise ReportError("the search has no completed trial to plot")
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    lat = [t["values"][0] for t in trials]
    qual = [t["values"][1] for t in trials]
    memory = [t["values"][2] for t in trials]
    sc = ax.scatter(
        lat, qual, c=memory, cmap="viridis", s=[14 if t["feasible"] else 8 for t in trials], alpha=0.8
    )
    fig.colorbar(sc, ax=ax, label=objective_label(objectives[2]) if len(objectives) > 2 else "memory (MB)")
    front = sorted((t for t in trials if t.get("pareto")), key=lambda t: t["values"][0])
    ax.plot(
        [t["values"][0] for t in front],
        [t["values"][1] for t in front],
        "o-",
        mfc="none",
        color="k",
        ms=9,
        lw=0.8,
        label="Pareto front",
    )
    by_number = {t["number"]: t for t in trials}
    for name, chosen in (search.get("chosen") or {}).items():
        if chosen["trial"] in by_number:
            v = by_number[chosen["trial"]]["values"]
            ax.scatter([v[0]], [v[1]], marker="*", s=160, color=COLORS["chosen"], zorder=5)
            ax.annotate(name, (v[0], v[1]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(objective_label(objectives[0]))
    ax.set_ylabel(objective_label(objectives[1]))
    ax.set_title(f"search on {search.get('target', '?')} ({search.get('latency_source', '')})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _svg_uri(fig)


def router_chart(profiles: Mapping[str, VariantProfile], budget_ms: float | None) -> str:
    """Each variant's latency curve at one request per call, with the policy's latency allowance."""
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    for i, (name, prof) in enumerate(profiles.items()):
        curve = prof.latency
        xs = list(curve.candidates)
        ax.plot(
            xs,
            [curve(c, 1) * 1e3 for c in xs],
            "o-",
            ms=4,
            color=f"C{i}",
            label=f"{name} (NE +{prof.quality_loss_pct:.3g} %)",
        )
    if budget_ms is not None:
        ax.axhline(
            budget_ms,
            color=COLORS["chosen"],
            ls="--",
            lw=1,
            label=f"allowed at the default budget: {budget_ms:.3g} ms",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("candidates (one request per call)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("variants' latency curves, as the router predicts them")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg_uri(fig)
