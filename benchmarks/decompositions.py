"""codesign's ops in aten form vs as extern kernels, on Inductor and AOTInductor, side by side in one run.

Each model is compiled with every gated pass forced on (so that the rewrites put codesign ops in the
graph whatever the gates would measure), then lowered twice per backend: ``decompose_ops`` on (Inductor
generates the ops' code and fuses through them) and off (each op is an extern kernel). Medians of
interleaved rounds at one request of 1024 candidates and 16 requests of 64; every variant's scores
are checked against the eager model. Prints a table; writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/decompositions.py [--models dlrm useq] [--backends inductor aoti] [--rounds 15]
"""

from __future__ import annotations

import argparse
import collections
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import host_meta, workloads

import codesign
from codesign.backends import get_backend
from codesign.hardware.timing import interleaved_medians
from codesign.numerics import Tolerance, compare_outputs
from codesign.passes import default_passes

warnings.filterwarnings("ignore", module=r"torch\..*")

RESULTS = Path(__file__).parent / "results"
LAYOUTS = (("1x1024", (1024,)), ("16x64", (64,) * 16))
AGREE = Tolerance(rtol=1e-3, atol=1e-4)


def bench(name: str, backends: list[str], rounds: int) -> dict[str, Any]:
    workload = workloads([name], "small")[0]
    program = codesign.compile(
        codesign.capture(workload), backend="eager", passes=[p.ungated() for p in default_passes()]
    ).program
    assert program is not None
    ops = collections.Counter(
        str(n.target)
        for n in program.graph_module.graph.nodes
        if getattr(n.target, "namespace", "") == "codesign"
    )
    fns, agree = {}, {}
    for backend in backends:
        for decompose in (True, False):
            cls = type(get_backend(backend))
            variant = codesign.compile(
                program, backend=cls(cls.config_class(decompose_ops=decompose)), passes=[]
            )
            label = f"{backend} {'aten' if decompose else 'kernel'}"
            for layout, counts in LAYOUTS:
                batch = workload.make_batch(list(counts), seed=len(counts))
                inputs = program.call_inputs(batch)
                with torch.no_grad():
                    ok, _, _ = compare_outputs(variant(**inputs), workload.model(**batch.inputs), AGREE)
                agree[label] = agree.get(label, True) and ok
                fns[f"{layout}|{label}"] = lambda v=variant, i=inputs: v(**i)
    times = interleaved_medians(fns, rounds=rounds, warmup=2)
    rows = []
    for layout, _ in LAYOUTS:
        for backend in backends:
            aten, kernel = times[f"{layout}|{backend} aten"], times[f"{layout}|{backend} kernel"]
            rows.append(
                {
                    "model": name,
                    "layout": layout,
                    "backend": backend,
                    "aten_s": aten,
                    "kernel_s": kernel,
                    "speedup": kernel / aten,
                    "agree": agree[f"{backend} aten"] and agree[f"{backend} kernel"],
                }
            )
    return {"model": name, "ops": dict(ops), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dlrm", "multitask", "useq"])
    ap.add_argument("--backends", nargs="+", default=["inductor", "aoti"])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    results = [bench(m, args.backends, args.rounds) for m in args.models]
    print(
        f"{'model':10s} {'layout':7s} {'backend':9s} {'aten ms':>8s} {'kernel ms':>10s} {'aten/kernel':>12s}  ops in graph"
    )
    for r in results:
        for row in r["rows"]:
            print(
                f"{row['model']:10s} {row['layout']:7s} {row['backend']:9s} {row['aten_s'] * 1e3:8.3f} "
                f"{row['kernel_s'] * 1e3:10.3f} {row['speedup']:11.2f}x  {r['ops']}"
                + ("" if row["agree"] else "  DISAGREES")
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "decompositions-host-small.json"
    out.write_text(json.dumps({"benchmark": "decompositions", **host_meta(), "models": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
