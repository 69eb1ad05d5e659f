"""Light imports: ``import codesign`` and the serving runtime leave the heavy optional modules unloaded.

A server that loads bundles should not pay seconds for torch._inductor, Optuna, matplotlib or
networkx it never uses (``benchmarks/imports.py`` times it). Wall-clock limits would be flaky on
a shared machine, so these tests check which modules a fresh interpreter has loaded after the
import instead; and that every lazily exported name still resolves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch._inductor", "torch._dynamo", "optuna", "matplotlib", "networkx")


def loaded_after(statement: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "module",
    [
        "codesign",
        "codesign.serving.runtime",
        "codesign.serving.http",
        "codesign.backends",
        # each backend module imports its compiler when it lowers or loads, not when imported
        "codesign.backends.aoti",
        "codesign.backends.inductor",
        "codesign.backends.tensorrt",
        "codesign.search.tuner",  # Optuna only when a search runs
        "codesign.report",  # matplotlib only when a chart is drawn
    ],
)
def test_import_leaves_heavy_modules_unloaded(module: str) -> None:
    assert loaded_after(f"import {module}") == []


def test_import_codesign_does_not_import_torch() -> None:
    # the public names load on first use; the root module itself needs only errors and version
    assert loaded_after("import codesign", ("torch", "codesign.build", "codesign.ir")) == []


@pytest.mark.parametrize("module", ["codesign.serving.runtime", "codesign.serving.http"])
def test_serving_imports_no_passes_capture_or_analysis(module: str) -> None:
    # serving a loaded bundle needs none of them; the custom ops, the target catalogue and the
    # analysis layer behind them (with sympy) load with the first bundle
    modules = ("codesign.passes", "codesign.ir.capture", "codesign.analysis", "codesign.search", "sympy")
    assert loaded_after(f"import {module}", modules) == []


def test_every_public_name_resolves() -> None:
    # in a fresh interpreter, so a lazy table entry naming the wrong module fails here
    code = (
        "import codesign, codesign.backends, codesign.search\n"
        "for mod in (codesign, codesign.backends, codesign.search):\n"
        "    missing = [n for n in mod.__all__ if getattr(mod, n, None) is None]\n"
        "    assert not missing, (mod.__name__, missing)\n"
        "    assert set(mod.__all__) <= set(dir(mod)), mod.__name__"
    )
    assert loaded_after(code, ()) == []


def test_unknown_attribute_is_an_attribute_error() -> None:
    import codesign

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        codesign.nope  # noqa: B018


def test_backend_table_matches_the_backend_classes() -> None:
    from codesign.backends import backend_class, backend_names

    for name in backend_names():
        assert backend_class(name).name == name
