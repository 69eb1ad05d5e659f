"""Render ReportData as one self-contained HTML page: inline CSS, charts as SVG data URIs, no script.

Sections (each only when its data exists): overview, profile, passes, scaling, fp8, sharding,
search, router. Every section is a ``<section id=...>`` so tests and links can find it.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from codesign.report import charts
from codesign.report.sources import ReportData, VariantRecord
from codesign.sharding.latency import request_latency
from codesign.sharding.types import Plan
from codesign.version import __version__

__all__ = ["SECTIONS", "render", "sections_for"]

SECTIONS = {
    "overview": "Overview",
    "profile": "Model profile",
    "passes": "Compile report",
    "scaling": "Request scaling",
    "fp8": "FP8 sensitivity",
    "sharding": "Embedding sharding",
    "search": "Search",
    "router": "Router",
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 24px 48px; color: #1f2328; }
header { border-bottom: 1px solid #d0d7de; margin-bottom: 12px; }
nav a { margin-right: 14px; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 36px; }
h3 { margin: 20px 0 6px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 12.5px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption, .note { color: #57606a; font-size: 12.5px; }
code { background: #f6f8fa; padding: 0 3px; }
.yes { color: #1a7f37; } .no { color: #57606a; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, int | float):
        v = float(value)
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.3g} {prefix}{unit}"
        return f"{v:.3g} {unit}".rstrip()
    return str(value)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _variant_title(v: VariantRecord) -> str:
    target = v.target
    where = (
        f"{target.name} × {target.devices}"
        if target and target.devices > 1
        else (target.name if target else "?")
    )
    return f"<h3>{_e(v.name)} <span class='note'>({_e(v.backend)} backend, target {_e(where)}, from {_e(v.source)})</span></h3>"


# ---- sections ----------------------------------------------------------------------------


def _overview(data: ReportData) -> str:
    rows = []
    for v in data.variants:
        target = v.target
        est = (v.cost.get("estimates") or [{}])[-1]
        prof = v.profile
        rows.append(
            (
                v.name,
                v.backend,
                f"{target.name} × {target.devices}" if target else "?",
                len([p for p in v.passes if p.get("modified")]),
                _ms(est["latency_s"]) + f" @ {est['candidates']}" if "latency_s" in est else "-",
                f"{prof.quality_loss_pct:.3g} %" if prof else "-",
                _fmt(prof.memory_bytes if prof else est.get("memory_bytes"), "B"),
            )
        )
    parts = ["<p>Inputs: " + ", ".join(f"<code>{_e(i)}</code>" for i in data.inputs) + "</p>"]
    if rows:
        parts.append(
            _table(
                (
                    "variant",
                    "backend",
                    "target",
                    "passes that changed it",
                    "predicted latency",
                    "NE change",
                    "memory",
                ),
                rows,
                numeric=(3, 4, 5, 6),
            )
        )
    return "".join(parts)


def _each_variant(
    data: ReportData, has: Callable[[VariantRecord], bool], body: Callable[[VariantRecord], str]
) -> str:
    """One subsection per variant that has the section's data: its title, then ``body``."""
    return "".join(_variant_title(v) + body(v) for v in data.variants if has(v))


def _has_profile(v: VariantRecord) -> bool:
    return bool(v.cost.get("profile")) and v.target is not None


def _has_passes(v: VariantRecord) -> bool:
    return bool(v.passes)


def _has_scaling(v: VariantRecord) -> bool:
    return bool(v.cost.get("scaling"))


def _profile(data: ReportData) -> str:
    return _each_variant(data, _has_profile, _profile_of)


def _profile_of(v: VariantRecord) -> str:
    target = v.target
    assert target is not None
    orig, comp = v.cost["profile"]["original"], v.cost["profile"]["compiled"]
    roles = ", ".join(f"{_e(k)} {_fmt(n)}" for k, n in comp["flops_by_role"].items())
    summary = (
        f"<p>At {comp['candidates']} candidates over {comp['requests']} requests on {_e(comp['target'])}: "
        f"original {_ms(orig['latency_s'])} in {orig['kernels']} kernels, {_fmt(orig['flops'], 'FLOP')}; "
        f"compiled {_ms(comp['latency_s'])} in {comp['kernels']} kernels, {_fmt(comp['flops'], 'FLOP')} "
        f"(FLOPs by role: {roles}). Predicted by the roofline cost model.</p>"
    )
    chart = _figure(
        charts.roofline_chart(target.hardware, orig["top"], comp["top"]),
        f"roofline of {v.name}",
        f"the {len(orig['top'])} slowest ops of each program placed on {target.name}'s rooflines "
        "(ops that do no arithmetic are left out)",
    )
    rows = (
        (
            o["name"],
            o["op"],
            o["module"] or "-",
            o["role"],
            _fmt(o["flops"]),
            _fmt(o["bytes"], "B"),
            o["bound"],
            _ms(o["time_s"]),
        )
        for o in comp["top"][:12]
    )
    head = ("op (compiled)", "kind", "module", "role", "FLOPs", "bytes", "bound", "predicted time")
    return summary + chart + _table(head, rows, numeric=(4, 5, 7))


def _stats_summary(stats: Mapping[str, Any]) -> str:
    simple = [(k, v) for k, v in stats.items() if isinstance(v, str | int | float | bool) and k != "layers"]
    return "; ".join(f"{k}={_fmt(v)}" for k, v in simple[:8]) or "-"


def _passes(data: ReportData) -> str:
    return _each_variant(data, _has_passes, _passes_of)


def _passes_of(v: VariantRecord) -> str:
    rows = (
        (
            p["name"],
            _fmt(p["modified"]),
            f"{p['ops_before']} → {p['ops_after']}",
            f"{float(p['max_abs_error']):.2g}",
            f"{float(p['max_rel_error']):.2g}",
            f"{float(p['seconds']):.2f} s",
            _stats_summary(p.get("stats") or {}),
        )
        for p in v.passes
    )
    head = ("pass", "changed", "ops", "max abs err", "max rel err", "time", "stats")
    caption = "ops in the graph after each pass, and the largest error of each pass's output against the captured model"
    return _figure(charts.passes_chart(v.passes), f"passes of {v.name}", caption) + _table(
        head, rows, numeric=(2, 3, 4, 5)
    )


def _scaling(data: ReportData) -> str:
    return _each_variant(data, _has_scaling, _scaling_of)


def _scaling_of(v: VariantRecord) -> str:
    sc = v.cost["scaling"]
    target = v.target.name if v.target else "?"
    cands = sc["candidates"]
    series = {
        "original (predicted)": (cands, sc["original_s"]),
        "compiled (predicted)": (cands, sc["compiled_s"]),
    }
    caption = f"one request's latency as its candidate count grows, predicted by the cost model on {target}"
    measured = ""
    if v.measured:
        m = v.measured
        if m.get("original_s"):
            series["original (measured, eager)"] = (m["candidates"], m["original_s"])
        series["compiled (measured)"] = (m["candidates"], m["compiled_s"])
        caption += f"; dashed: {m['source']}"
        measured = "<p>Measured:</p>" + _scaling_table(m["candidates"], m.get("original_s"), m["compiled_s"])
    chart = _figure(charts.scaling_chart(series, target), f"request scaling of {v.name}", caption)
    return chart + "<p>Predicted:</p>" + _scaling_table(cands, sc["original_s"], sc["compiled_s"]) + measured


def _scaling_table(cands: Sequence[int], original: Sequence[float] | None, compiled: Sequence[float]) -> str:
    firsts: Sequence[float | None] = original if original else [None] * len(cands)
    rows = (
        (n, _ms(a) if a else "-", _ms(b), f"{a / b:.2f}×" if a and b else "-", _ms(b / n))
        for n, a, b in zip(cands, firsts, compiled, strict=True)
    )
    head = ("candidates", "original", "compiled", "speed-up", "compiled per candidate")
    return _table(head, rows, numeric=(0, 1, 2, 3, 4))


def _fp8(data: ReportData) -> str:
    parts = []
    for label, stats in data.fp8_reports():
        parts.append(f"<h3>{_e(label)}</h3>")
        before, after = stats.get("predicted_latency_before_s"), stats.get("predicted_latency_after_s")
        loss = stats.get("combined_loss_pct")
        parts.append(
            f"<p>Budget {_e(stats.get('budget_pct'))} % NE ({_e(stats.get('selection'))} selection); "
            f"{len(stats.get('chosen', []))} layers chosen; combined NE change "
            f"{'-' if loss is None else f'{loss:.3g} %'}; predicted latency "
            f"{_ms(before) if before else '-'} → {_ms(after) if after else '-'}; parameters "
            f"{_fmt(stats.get('param_bytes_before'), 'B')} → {_fmt(stats.get('param_bytes_after'), 'B')}"
            + (f"; backed off: {_e(', '.join(stats['backed_off']))}" if stats.get("backed_off") else "")
            + ".</p>"
        )
        parts.append(
            _figure(
                charts.fp8_chart(stats),
                f"FP8 sensitivity ({label})",
                "each eligible layer put in FP8 alone on calibration requests",
            )
        )
        layers = sorted(
            stats.get("layers", []), key=lambda lay: (not lay.get("chosen"), -float(lay.get("saving_s", 0.0)))
        )
        parts.append(
            _table(
                ("layer", "kind", "shape", "chosen", "|NE change|", "SQNR", "predicted saving", "why not"),
                (
                    (
                        lay["node"],
                        lay["kind"],
                        "×".join(map(str, lay.get("shape", ()))),
                        _fmt(lay.get("chosen")),
                        "-" if lay.get("ne_loss_pct") is None else f"{lay['ne_loss_pct']:.3g} %",
                        "-" if lay.get("sqnr_db") is None else f"{lay['sqnr_db']:.1f} dB",
                        _ms(float(lay.get("saving_s", 0.0))) if lay.get("eligible") else "-",
                        lay.get("reason") or "",
                    )
                    for lay in layers[:30]
                ),
                numeric=(4, 5, 6),
            )
        )
    return "".join(parts)


def _plan_section(label: str, plan: Plan) -> str:
    s = plan.summary()
    kinds = ", ".join(f"{k} {n}" for k, n in s["kinds"].items())
    return (
        f"<h3>{_e(label)}</h3><p>{s['tables']} tables ({_fmt(s['params'])} parameters) on {_e(s['topology'])}: "
        f"{_e(kinds)}. Slowest device {_ms(s['max_cost_s'])} per step, lower bound {_ms(s['lower_bound_s'])} "
        f"(gap {s['gap']:.3f}×); planned in {s['planning_s']:.2f} s. On paper, one request of "
        f"{_e(request_latency(plan, 1000).describe())}.</p>"
        + _figure(
            charts.sharding_chart(plan),
            f"sharding plan {label}",
            "per-device cost per step against the bound no placement can beat; memory used against capacity",
        )
        + _table(
            ("device", "host", "shards", "kinds", "memory", "capacity", "lookup", "all-to-all", "total"),
            (
                (
                    r["device"],
                    r["host"],
                    r["shards"],
                    ", ".join(f"{k} {n}" for k, n in r["by_kind"].items()),
                    _fmt(r["bytes"], "B"),
                    _fmt(r["capacity_bytes"], "B"),
                    _ms(r["lookup_s"]),
                    _ms(r["comm_s"]),
                    _ms(r["cost_s"]),
                )
                for r in plan.per_device()[:32]
            ),
            numeric=(0, 2, 4, 5, 6, 7, 8),
        )
    )


def _sharding(data: ReportData) -> str:
    return "".join(_plan_section(label, plan) for label, plan in data.sharding_plans())


def _search(data: ReportData) -> str:
    s = data.search
    assert s is not None
    trials = s.get("trials", [])
    complete = [t for t in trials if t.get("values") is not None]
    front = [t for t in complete if t.get("pareto")]
    objectives = list(s.get("objectives", ["latency", "quality", "memory"]))
    parts = [
        f"<p>Study <code>{_e(s.get('study_name'))}</code> on {_e(s.get('target'))}: {len(trials)} trials, "
        f"{len(complete)} complete, {sum(1 for t in complete if t.get('feasible'))} feasible, "
        f"{len(front)} on the Pareto front. Latency {_e(s.get('latency_source'))}.</p>"
    ]
    if complete:
        parts.append(
            _figure(
                charts.pareto_chart(s),
                "search Pareto front",
                "every complete trial; ringed: the Pareto front; stars: the variants chosen for deployment",
            )
        )
    chosen_by_trial = {c["trial"]: name for name, c in (s.get("chosen") or {}).items()}
    parts.append(
        _table(
            ("trial", *(charts.objective_label(o) for o in objectives), "chosen as"),
            (
                (t["number"], *(f"{x:.4g}" for x in t["values"]), chosen_by_trial.get(t["number"], ""))
                for t in sorted(front, key=lambda t: t["values"][0])
            ),
            numeric=tuple(range(len(objectives) + 1)),
        )
    )
    return "".join(parts)


def _router(data: ReportData) -> str:
    r = data.router
    assert r is not None
    desc = r["describe"]
    policy = desc["policy"]
    fields = policy.get("fields", {})
    kind = str(policy.get("type", "?"))
    budget = fields.get("default_budget_ms")
    allowed = budget * (1 - fields.get("headroom", 0.0)) if isinstance(budget, int | float) else None
    settings = ", ".join(f"{k}={_e(v)}" for k, v in fields.items() if k != "rules")
    parts = [
        f"<p>Policy <b>{_e(kind)}</b> ({settings or 'no settings'}). Quality order (best first): "
        + ", ".join(f"<code>{_e(n)}</code>" for n in desc["quality_order"])
        + ".</p>"
    ]
    rules = fields.get("rules") or []
    if rules:
        parts.append(
            _table(
                ("rule", "name", "conditions (all must hold)", "variant"),
                (
                    (
                        i + 1,
                        r.get("name") or "-",
                        " and ".join(f"{k} {op} {v!r}" for k, (op, v) in r.get("when", {}).items())
                        or "always",
                        r.get("variant"),
                    )
                    for i, r in enumerate(rule.get("fields", rule) for rule in rules)
                ),
            )
        )
    profiles = r["profiles"]
    parts.append(
        _figure(
            charts.router_chart(profiles, allowed),
            "router latency curves",
            "latency curves from the bundle's profiles; the dashed line is what the policy allows a fresh request at its default budget",
        )
    )
    parts.append(
        _table(
            (
                "variant",
                "labels",
                "NE change",
                "quality source",
                "memory",
                "latency source",
                "1 × 256 candidates",
            ),
            (
                (
                    n,
                    ", ".join(p.labels),
                    f"{p.quality_loss_pct:.3g} %",
                    p.quality_source,
                    _fmt(p.memory_bytes, "B"),
                    p.latency.source,
                    _ms(p.latency(256, 1)),
                )
                for n, p in profiles.items()
            ),
            numeric=(2, 4, 6),
        )
    )
    return "".join(parts)


def sections_for(data: ReportData) -> dict[str, Callable[[ReportData], str]]:
    """The sections ``data`` has data for, in page order, each with its renderer."""
    out: dict[str, Callable[[ReportData], str]] = {"overview": _overview}
    for key, has, fn in (
        ("profile", _has_profile, _profile),
        ("passes", _has_passes, _passes),
        ("scaling", _has_scaling, _scaling),
    ):
        if any(has(v) for v in data.variants):
            out[key] = fn
    if data.fp8_reports():
        out["fp8"] = _fp8
    if data.sharding_plans():
        out["sharding"] = _sharding
    if data.search is not None:
        out["search"] = _search
    if data.router is not None:
        out["router"] = _router
    return out


def render(data: ReportData, *, title: str | None = None) -> str:
    """The whole page. Only sections with data appear; the navigation lists exactly those."""
    sections = sections_for(data)
    title = title or "codesign report: " + ", ".join(
        sorted({v.manifest.get("name", v.name) for v in data.variants}) or data.inputs
    )
    nav = "".join(f'<a href="#{k}">{_e(SECTIONS[k])}</a>' for k in sections)
    body = "".join(
        f'<section id="{k}"><h2>{_e(SECTIONS[k])}</h2>{fn(data)}</section>' for k, fn in sections.items()
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p class='note'>codesign {_e(__version__)}, written {stamp}. "
        "Predicted figures come from the roofline cost model; measured ones say so.</p>"
        f"<nav>{nav}</nav></header>{body}</body></html>\n"
    )
