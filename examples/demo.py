"""End-to-end demo on CPU: capture → profile → compile (AOTInductor) → bundle → reload → score,
then search → routed multi-variant bundle, an FP8 plan for H100, and the HTML report of it all.

Run with ``make demo`` (sets up .venv first). Exits non-zero if the reloaded bundle's scores do not
match eager PyTorch within tolerance, or if the report lacks one of its sections.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

import codesign
from codesign.cli import main as cli_main
from codesign.hardware.target import get_target
from codesign.numerics import compare_outputs
from codesign.passes import RequestSharing, SelectiveFp8
from codesign.passes.manager import PassManager
from codesign.report import SECTIONS
from codesign.serving.router import LoadAwarePolicy

# torch.export/AOTInductor emit deprecation chatter that is not about this model
warnings.filterwarnings("ignore", module=r"torch\..*")
warnings.filterwarnings("ignore", category=FutureWarning)

MODEL = "dlrm"
OUT = Path("out/demo-bundle")
ROUTED = Path("out/demo-routed")
FP8_REPORT = Path("out/demo-fp8-h100.json")
PLAN = Path("out/demo-plan-host4.json")
REPORT = Path("out/demo-report.html")
SEARCH_TRIALS = 12


def main() -> int:
    t0 = time.perf_counter()
    workload = codesign.load_model_ref(MODEL, size="small")
    print(f"== 1. capture {workload.description}: inputs {sorted(workload.example().leaves())[:4]}...")
    program = codesign.capture(workload)
    print(f"   captured {program.op_count()} ops with a dynamic candidate dimension")

    print("== 2. profile (predicted on every target, host calibrated by a micro-benchmark)")
    cli_main(
        [
            "profile",
            MODEL,
            "--size",
            "small",
            "--candidates",
            "1024",
            "--requests",
            "8",
            "--top",
            "8",
            "--targets",
            "host",
            "h100",
            "a100",
            "tpu-v5e",
            "mtia-v2",
        ]
    )

    print(
        "== 3. compile: all passes (gated ones ask the cost model), numerics verified, lowered with AOTInductor"
    )
    variant = codesign.compile(program, target="host", backend="aoti")
    for rec in variant.report["passes"] if variant.report else []:
        print(
            f"   {rec['name']:<17} ops {rec['ops_before']:>4} -> {rec['ops_after']:<4} "
            f"max abs err {rec['max_abs_error']:.2g}  {rec['stats']}"
        )

    print(f"== 4. save bundle to {OUT}")
    shutil.rmtree(OUT, ignore_errors=True)
    variant.save(OUT)
    for f in sorted(OUT.iterdir()):
        print(f"   {f.name:<20} {f.stat().st_size:>10,d} bytes")

    print("== 5. reload (checksums + versions verified) and score fresh requests")
    loaded = codesign.load(OUT)
    ok_all = True
    for seed, counts in enumerate(([1], [5, 40, 2], [300, 17, 64, 1])):
        batch = workload.make_batch(counts, 100 + seed)
        with torch.no_grad():
            want = workload.model(**batch.inputs)
        t = time.perf_counter()
        got = loaded.score(batch)
        ms = (time.perf_counter() - t) * 1e3
        ok, max_abs, _ = compare_outputs(got, want, loaded.tolerance)
        ok_all &= ok
        print(
            f"   {len(counts)} requests / {batch.num_candidates:>3} candidates: {ms:6.2f} ms, "
            f"max |aoti - eager| = {max_abs:.2e} -> {'OK' if ok else 'MISMATCH'}"
        )

    print(f"== 6. search {SEARCH_TRIALS} trials on the host as 4 devices (eager, measured) → routed bundle")
    host4 = get_target("host", devices=4)  # 4 devices: embedding sharding is searched too
    result = codesign.tune(program, host4, trials=SEARCH_TRIALS, storage=":memory:", backends=["eager"])
    print(f"   {result.counts()}; Pareto front: {len(result.pareto)} trials")
    routed = codesign.Bundle.from_search(
        result, program, k=3, target=host4, policy=LoadAwarePolicy(default_budget_ms=20.0)
    )
    routed.save(ROUTED, overwrite=True)
    for name, prof in routed.profiles.items():
        print(f"   {name:<12} {prof.latency(256) * 1e3:7.2f} ms at 256 candidates ({prof.latency.source})")
    print(f"   saved {ROUTED}; policy: {routed.router().describe()['policy']['type']}")

    print("== 7. selective FP8 for H100 (FP8 emulated here; savings predicted by the cost model)")
    _, fp8_report = PassManager([RequestSharing(), SelectiveFp8()], get_target("h100")).run(program)
    stats = fp8_report.passes[-1].stats
    FP8_REPORT.write_text(json.dumps(stats, indent=1))
    print(f"   {len(stats['chosen'])} of {len(stats['layers'])} layers chosen; saved {FP8_REPORT}")

    print("== 8. embedding sharding plan for the host as 4 devices (whether or not the search kept sharding)")
    cli_main(["plan", MODEL, "--size", "small", "--target", "host", "--devices", "4", "--out", str(PLAN)])

    print(f"== 9. report → {REPORT}")
    report_args = [str(OUT), str(ROUTED), str(FP8_REPORT), str(PLAN), "--out", str(REPORT)]
    cli_main(["report", *report_args, "--measure", "--model", MODEL, "--size", "small"])  # + timed here
    page = REPORT.read_text()
    missing = [title for key, title in SECTIONS.items() if f'<section id="{key}">' not in page]
    if missing:
        print(f"   report lacks sections: {missing}")
    print(f"== done in {time.perf_counter() - t0:.0f} s: {'scores match eager' if ok_all else 'MISMATCH'}")
    return 0 if ok_all and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
