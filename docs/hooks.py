"""mkdocs hook: ``{{ knobs: NAME }}`` in a page becomes the knob table of pass or backend NAME,
read from the code, so the pages cannot drift from what search and ``compile`` accept."""

from __future__ import annotations

import re
from typing import Any

_MARK = re.compile(r"\{\{\s*knobs:\s*([a-z0-9_]+)\s*\}\}")


def _owner(name: str) -> Any:
    from codesign.backends import backend_names, get_backend
    from codesign.passes import pass_by_name

    if name in backend_names():
        return type(get_backend(name))
    return pass_by_name(name)


def _domain(k: Any) -> str:
    if k.kind == "bool":
        return "true / false"
    if k.kind == "categorical":
        return " / ".join(f"`{c}`" for c in k.choices)
    rng = f"{k.low:g} … {k.high:g}"
    return rng + (" (powers of two)" if k.kind == "int" and k.log else " (log)" if k.log else "")


def knob_table(name: str) -> str:
    knobs = _owner(name).knobs()
    if not knobs:
        return "*No knobs: the pass has nothing to tune.*"
    rows = ["| knob | type | values | default | what it does |", "|---|---|---|---|---|"]
    for k in knobs:
        doc = k.doc + (f" (only when `{k.when[0]}` is {', '.join(map(str, k.when[1]))})" if k.when else "")
        rows.append(f"| `{k.name}` | {k.kind} | {_domain(k)} | `{k.default}` | {doc} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return _MARK.sub(lambda m: knob_table(m.group(1)), markdown)
