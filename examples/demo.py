"""End-to-end demo on CPU: capture → profile → compile (AOTInductor) → bundle → reload → score.

Run with ``make demo`` (sets up .venv first). Exits non-zero if the reloaded bundle's scores do not
match eager PyTorch within tolerance.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

import codesign
from codesign.cli import main as cli_main
from codesign.pipeline import compare_outputs

# torch.export/AOTInductor emit deprecation chatter that is not about this model
warnings.filterwarnings("ignore", module=r"torch\..*")
warnings.filterwarnings("ignore", category=FutureWarning)

MODEL = "dlrm"
OUT = Path("out/demo-bundle")


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
    print(f"== done in {time.perf_counter() - t0:.0f} s: {'scores match eager' if ok_all else 'MISMATCH'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
