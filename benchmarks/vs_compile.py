"""codesign against torch.compile, per model, side by side in one run.

For each model (the examples and the test zoo, tests/zoo) and layout (one request of 64 and of 1024
candidates, 16 requests of 64), medians of interleaved rounds of:

* ``eager``: the user's ``nn.Module`` called as it is;
* ``compile``: ``torch.compile(model, dynamic=True)``;
* ``compile-mA``: the same with ``mode="max-autotune-no-cudagraphs"`` (``--modes default`` skips it);
* ``cs-eager``: ``codesign.compile(model)`` with its default passes on the ``eager`` backend;
* ``cs-inductor``: the same passes on the ``inductor`` backend (its default options);
* ``cs-aoti``: the same passes on the ``aoti`` backend (AOTInductor: compiled C++ and a C++ runner);
* ``cs-aoti-mA``: the same with the backend's knob ``mode="max-autotune-no-cudagraphs"``, as
  ``compile-mA`` is to ``compile``.

``best`` is the faster codesign variant; the ratios are taken against plain eager (``cs-eager``
must not lose to it) and against the faster torch.compile mode. Each compiled variant wraps its own
copy of the module, so no two share a dynamo cache. Prints a table; writes JSON and a PNG to
benchmarks/results/.

    .venv/bin/python benchmarks/vs_compile.py [--models dlrm useq zoo] [--rounds 9] [--modes default]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import host_meta, pyplot, workloads

import codesign
from codesign.hardware.timing import interleaved_medians
from codesign.ir.workload import Workload
from codesign.numerics import Tolerance, compare_outputs

warnings.filterwarnings("ignore", module=r"torch\..*")

EXAMPLES = ("dlrm", "dcnv2", "din", "multitask", "useq")
LAYOUTS = (("1x64", (64,)), ("1x1024", (1024,)), ("16x64", (64,) * 16))
RESULTS = Path(__file__).parent / "results"
# compiled kernels reorder fp32 sums
AGREE = Tolerance(rtol=1e-3, atol=1e-4)
TORCH_MODES = {"compile": "default", "compile-mA": "max-autotune-no-cudagraphs"}
CS_BACKENDS = ("eager", "inductor", "aoti", "aoti-mA")


def _backend(label: str) -> Any:
    """A codesign backend by the label the table uses (``aoti-mA``: aoti in max-autotune mode)."""
    if label == "aoti-mA":
        from codesign.backends.aoti import AotiBackend, AotiConfig

        return AotiBackend(AotiConfig(mode="max-autotune-no-cudagraphs"))
    return label


def variants(
    workload: Workload, modes: list[str], target: str = "host", backends: tuple[str, ...] = CS_BACKENDS
) -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
    """name -> callable(batch); plus what codesign decided (passes applied, compile seconds)."""
    model = workload.model.eval()
    fns: dict[str, Callable[..., Any]] = {"eager": lambda b: model(**b.inputs)}
    for label, mode in TORCH_MODES.items():
        if mode in modes:
            compiled = torch.compile(
                copy.deepcopy(model), dynamic=True, mode=None if mode == "default" else mode
            )
            fns[label] = lambda b, c=compiled: c(**b.inputs)
    program = codesign.capture(workload)
    info: dict[str, Any] = {}
    for backend in backends:
        t0 = time.perf_counter()
        variant = codesign.compile(program, target=target, backend=_backend(backend))
        info[f"cs-{backend}_compile_s"] = time.perf_counter() - t0
        assert variant.program is not None
        info.setdefault("passes_applied", [r["name"] for r in variant.passes if r.get("modified")])
        fns[f"cs-{backend}"] = lambda b, v=variant, p=variant.program: v(**p.call_inputs(b))
    return fns, info


def bench(
    workload: Workload,
    modes: list[str],
    rounds: int,
    *,
    target: str = "host",
    synchronize: Callable[[], None] | None = None,
    backends: tuple[str, ...] = CS_BACKENDS,
) -> list[dict[str, Any]]:
    """Rows per layout. On a GPU, ``synchronize`` (``torch.cuda.synchronize``) ends every timed call."""
    fns, info = variants(workload, modes, target, backends)
    if synchronize is not None:
        fns = {k: (lambda b, f=f: (f(b), synchronize())[0]) for k, f in fns.items()}
    rows = []
    for label, counts in LAYOUTS:
        batch = workload.make_batch(list(counts), seed=sum(counts) + len(counts))
        with torch.no_grad():
            want = fns["eager"](batch)
            first_call = {}
            for name, fn in fns.items():  # first calls compile (and check numerics)
                t0 = time.perf_counter()
                ok, diff, _ = compare_outputs(fn(batch), want, AGREE)
                first_call[name] = time.perf_counter() - t0
                if not ok:
                    raise SystemExit(f"{workload.name} {label}: {name} differs from eager by {diff:.2e}")
            once = interleaved_medians({k: partial(f, batch) for k, f in fns.items()}, rounds=1)
            calls = max(1, int(0.02 / max(1e-6, min(once.values()))))  # ~20 ms of work per sample
            t = interleaved_medians(
                {k: partial(f, batch) for k, f in fns.items()}, rounds=rounds, calls=calls
            )
        torch_best = min((v for k, v in t.items() if k in TORCH_MODES), default=None)
        cs_best_name = min((f"cs-{b}" for b in backends), key=t.__getitem__)
        row = {
            "model": workload.name,
            "layout": label,
            **{f"{k}_s": v for k, v in t.items()},
            "best": cs_best_name,
            "best_vs_compile": torch_best / t[cs_best_name] if torch_best is not None else None,
            "cs_eager_vs_eager": t["eager"] / t["cs-eager"] if "cs-eager" in t else None,
            "cs_inductor_vs_compile": t["compile"] / t["cs-inductor"] if "compile" in t else None,
            "first_call_s": first_call,
            **info,
        }
        rows.append(row)
        print(
            f"{workload.name:<14} {label:>7} "
            + " ".join(f"{t[k] * 1e3:>9.3f}" for k in fns)
            + f" {row['best']:>12} {_ratio(row['best_vs_compile'])} {_ratio(row['cs_eager_vs_eager'])}",
            flush=True,
        )
    return rows


def _ratio(x: float | None) -> str:
    return f"{x:>8.2f}x" if x is not None else f"{'-':>9}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=[*EXAMPLES, "zoo"])
    parser.add_argument("--size", default="small", help="size of the example models (the zoo has one size)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--modes", nargs="*", default=list(TORCH_MODES.values()), choices=list(TORCH_MODES.values())
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=list(CS_BACKENDS),
        help="codesign backends (--backends eager --modes: eager only)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/vs-compile-host-<size>.json)"
    )
    args = parser.parse_args()
    names = [
        "eager",
        *(k for k, m in TORCH_MODES.items() if m in args.modes),
        *(f"cs-{b}" for b in args.backends),
    ]
    print(
        f"{'model':<14} {'layout':>7} "
        + " ".join(f"{n:>9}" for n in names)
        + "  (ms)    best  vs compile  cs-eager/eager"
    )
    rows: list[dict[str, Any]] = []
    for name in args.models:  # "group" tells the zoo's din from the example din
        for workload in workloads([name], args.size):
            rows += [
                {**r, "group": "zoo" if name == "zoo" else "example"}
                for r in bench(workload, args.modes, args.rounds, backends=tuple(args.backends))
            ]
    for key, what in (("best_vs_compile", "best vs compile"), ("cs_eager_vs_eager", "cs-eager vs eager")):
        measured = [r for r in rows if r[key] is not None]
        if measured:
            worst = min(measured, key=lambda r: r[key])
            print(f"worst {what} {worst[key]:.2f}x ({worst['model']} {worst['layout']})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"vs-compile-host-{args.size}.json"
    meta = host_meta()
    out.write_text(
        json.dumps({"benchmark": "vs_compile", **meta, "rounds": args.rounds, "rows": rows}, indent=2)
    )
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def _label(row: dict[str, Any]) -> str:
    """The model's name, marked when it comes from the zoo (the zoo has a din, as the examples do)."""
    return f"zoo/{row['model']}" if row.get("group") == "zoo" else str(row["model"])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None or all(r["best_vs_compile"] is None for r in rows):
        return
    layouts = [label for label, _ in LAYOUTS]
    models = list(dict.fromkeys(_label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(models) * len(layouts)), 4))
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        mine = {_label(r): r["best_vs_compile"] for r in rows if r["layout"] == layout}
        ax.bar(
            [m + i * width for m in range(len(models))], [mine.get(m, 0) for m in models], width, label=layout
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(
        [m + 0.4 - width / 2 for m in range(len(models))], models, rotation=60, ha="right", fontsize=8
    )
    ax.set_ylabel("codesign best / best torch.compile (speedup)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
