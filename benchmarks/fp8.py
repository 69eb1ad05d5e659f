"""Full precision vs selective FP8 vs all-FP8, side by side in one run: quality loss and latency.

Models (any machine). For each example, after request sharing: the full-precision program, the
``selective_fp8`` choice for the target (default H100, NE budget 0.1 %), and all-FP8 (every
eligible Linear and table, gain or not). Quality: NE change on fresh requests (labels drawn from
the full-precision model, as in ``codesign.analysis.quality``) and the largest logit error. Latency: measured
here (interleaved medians) and predicted for the target by the cost model. On a CPU FP8 is
emulated in fp32 (dequantize + fp32 GEMM): it is *slower* than fp32 there, and the measured column
says so; the target column is the prediction for the GPU.

GPU (CUDA with FP8 tensor cores only): the LLM-scale ranker's (``useq`` large) GEMMs at a serving
batch and larger LLM-scale shapes, bf16 ``F.linear`` vs ``codesign::fp8_linear`` (Triton row-wise
activation quantization + cuBLASLt ``_scaled_mm``) vs the FP8 GEMM alone; then the whole ranker in
bf16 on the GPU with its Linears swapped for ``Fp8Linear`` per the pass's choice and for all.

    .venv/bin/python benchmarks/fp8.py [--models dlrm useq] [--size tiny] [--target h100]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import codesign
from codesign.analysis.quality import join_heads, quality_loss
from codesign.hardware.costmodel import estimate
from codesign.hardware.target import get_target
from codesign.hardware.timing import interleaved_medians, median_latency
from codesign.ir.program import Program
from codesign.passes import CommonSubexpressionElimination, RequestSharing, SelectiveFp8, SelectiveFp8Config
from codesign.passes.manager import PassManager

warnings.filterwarnings("ignore", module=r"torch\..*")

MODELS = ("dlrm", "dcnv2", "din", "multitask", "useq")
RESULTS = Path(__file__).parent / "results"
ALL_FP8 = SelectiveFp8Config(enforce_budget=False, require_predicted_gain=False)


def bench_model(
    name: str, size: str, target: str, requests: int, candidates: int, rounds: int
) -> dict[str, Any]:
    workload = codesign.load_model_ref(name, size=size)
    tgt = get_target(target)
    shared, _ = PassManager([RequestSharing(), CommonSubexpressionElimination()], tgt, verify=False).run(
        codesign.capture(workload)
    )
    t0 = time.perf_counter()
    selective, report = PassManager([SelectiveFp8()], tgt).run(shared)
    pass_s = time.perf_counter() - t0
    all_fp8, all_report = PassManager([SelectiveFp8(ALL_FP8)], tgt, verify=False).run(shared)
    variants: dict[str, Program] = {"fp32": shared, "selective": selective, "all-fp8": all_fp8}
    # quality on fresh requests (not the pass's calibration set)
    evaluation = [shared.sample_batch([candidates] * requests, seed=100 + i) for i in range(2)]
    reference = join_heads([shared.run(b) for b in evaluation])
    batch = evaluation[0]
    fns = {k: (lambda p=p: p.run(batch)) for k, p in variants.items()}
    calls = max(1, int(0.05 / max(1e-6, median_latency(fns["fp32"], repeats=1))))
    measured = interleaved_medians(fns, rounds, calls, warmup=1)
    row: dict[str, Any] = {
        "model": name,
        "size": size,
        "target": target,
        "requests": requests,
        "candidates_per_request": candidates,
        "pass_s": pass_s,
        "layers": len(report.passes[0].stats.get("layers", [])),
        "eligible": sum(1 for layer in report.passes[0].stats.get("layers", []) if layer["eligible"]),
        "chosen_selective": report.passes[0].stats.get("chosen", []),
        "chosen_all": all_report.passes[0].stats.get("chosen", []),
    }
    for key, program in variants.items():
        loss = quality_loss(reference, join_heads([program.run(b) for b in evaluation]), seed=1)
        cost = estimate(program, tgt, requests * candidates, requests)
        row[key] = {
            "ne_loss_pct": loss.exact_pct,
            "max_logit_error": loss.max_abs_error,
            "measured_s": measured[key],
            "predicted_s": cost.latency_s,
            "param_bytes": cost.param_bytes,
        }
    _print_row(row)
    return row


_HEADER = (
    f"{'model':<10} {'layers':>7} {'chosen':>7} | {'NE loss %':>27} | {'measured here (ms)':>26} | "
    f"{'predicted on target (ms)':>26} | params fp32->sel->all"
)


def _print_row(r: dict[str, Any]) -> None:
    v = [r[k] for k in ("fp32", "selective", "all-fp8")]
    print(
        f"{r['model']:<10} {r['eligible']:>3}/{r['layers']:<3} {len(r['chosen_selective']):>3}/{len(r['chosen_all']):<3} | "
        f"{v[1]['ne_loss_pct']:>12.4f} {v[2]['ne_loss_pct']:>14.4f} | "
        + " ".join(f"{x['measured_s'] * 1e3:>8.2f}" for x in v)
        + " | "
        + " ".join(f"{x['predicted_s'] * 1e3:>8.4f}" for x in v)
        + " | "
        + "->".join(f"{x['param_bytes'] / 1e6:.2f}MB" for x in v),
        flush=True,
    )


# ---- GPU ---------------------------------------------------------------------------------


def _cuda_ms(fn: Callable[[], Any], graph: bool = False) -> float:
    """Median GPU milliseconds per call; ``graph``: replayed from a CUDA graph (no launch overhead,
    as AOTInductor / CUDA-graph serving runs it)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return float(do_bench_cudagraph(fn, rep=200, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def useq_large_gemms(requests: int, candidates: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of the LLM-scale ranker's Linears with request sharing: the encoder runs on
    ``requests x history`` rows, the candidate side on ``requests x candidates`` rows."""
    import importlib.util

    from codesign.ir.workload import examples_dir

    spec = importlib.util.spec_from_file_location("useq_example", examples_dir() / "useq.py")
    assert spec is not None and spec.loader is not None
    useq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(useq)
    CAND_DENSE, SIZES = useq.CAND_DENSE, useq.SIZES
    dim, history = int(SIZES["large"]["dim"]), int(SIZES["large"]["history"])
    tokens, cands = requests * history, requests * candidates
    return [
        ("encoder.qkv", tokens, dim, 3 * dim),
        ("encoder.proj", tokens, dim, dim),
        ("encoder.ffn.up", tokens, dim, 4 * dim),
        ("encoder.ffn.down", tokens, 4 * dim, dim),
        ("cand_tower.0", cands, dim + CAND_DENSE, dim),
        ("head.0", cands, 4 * dim, dim),
    ]


def bench_gemms(requests: int, candidates: int) -> list[dict[str, Any]]:
    from codesign.ops import quantize_weight
    from codesign.ops.fp8_linear_triton import quantize_rows_triton

    shapes = [
        *useq_large_gemms(requests, candidates),
        ("llm-scale.ffn.up d=2048", 8192, 2048, 8192),
        ("llm-scale.ffn.down d=2048", 8192, 8192, 2048),
        ("llm-scale.ffn.up d=4096", 8192, 4096, 16384),
        ("llm-scale.ffn.down d=4096", 8192, 16384, 4096),
    ]
    rows = []
    print(
        "\nGEMMs: GPU time per call replayed from CUDA graphs (last column: the FP8 op launched from Python)"
    )
    print(
        f"{'GEMM':<28} {'M':>6} {'K':>6} {'N':>6} {'bf16 us':>9} {'fp8 op us':>10} {'quant us':>8} "
        f"{'gemm us':>8} {'op x':>6} {'gemm x':>7} {'launched':>10}"
    )
    for name, m, k, n in shapes:
        if k % 16 or n % 16:
            print(f"{name:<28} {m:>6} {k:>6} {n:>6}   (K or N not a multiple of 16: stays bf16)")
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        wq, ws = quantize_weight(w, "row")
        xq, xs = quantize_rows_triton(x)
        fns: dict[str, Callable[[], Any]] = {
            "bf16": lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b),
            "fp8_op": lambda x=x, wq=wq, ws=ws, b=b: torch.ops.codesign.fp8_linear(
                x, wq, ws, b, "none", "row", "auto"
            ),
            "quantize": lambda x=x: quantize_rows_triton(x),
            "fp8_gemm": lambda xq=xq, xs=xs, wq=wq, ws=ws, b=b: torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1), bias=b, out_dtype=torch.bfloat16
            ),
        }
        row: dict[str, Any] = {"gemm": name, "M": m, "K": k, "N": n}
        for key, fn in fns.items():
            row[f"{key}_ms"] = _cuda_ms(fn, graph=True)
            row[f"{key}_launched_ms"] = _cuda_ms(fn)
        row["speedup_op"] = row["bf16_ms"] / row["fp8_op_ms"]
        row["speedup_gemm"] = row["bf16_ms"] / row["fp8_gemm_ms"]
        rows.append(row)
        print(
            f"{name:<28} {m:>6} {k:>6} {n:>6} {row['bf16_ms'] * 1e3:>9.1f} {row['fp8_op_ms'] * 1e3:>10.1f} "
            f"{row['quantize_ms'] * 1e3:>8.1f} {row['fp8_gemm_ms'] * 1e3:>8.1f} {row['speedup_op']:>5.2f}x "
            f"{row['speedup_gemm']:>6.2f}x {row['fp8_op_launched_ms'] * 1e3:>10.1f}",
            flush=True,
        )
    return rows


def bench_gpu_model(target: str, candidates: int) -> dict[str, Any]:
    """useq large in bf16 on the GPU (naive per-candidate scoring): bf16 vs selective vs all FP8."""
    from codesign.ops import Fp8Linear
    from codesign.passes.fp8 import SelectiveFp8Config

    workload = codesign.load_model_ref("useq", size="large")
    tgt = get_target(target)
    shared, _ = PassManager([RequestSharing(), CommonSubexpressionElimination()], tgt, verify=False).run(
        codesign.capture(workload)
    )
    cfg = SelectiveFp8Config(eligible="linear", calibration_requests=2, calibration_candidates=64)
    _, report = PassManager([SelectiveFp8(cfg)], tgt, verify=False).run(shared)
    layers = report.passes[0].stats["layers"]
    model = workload.model
    linears = {
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
    }
    modules = {
        "selective": {layer["module"] for layer in layers if layer["chosen"]} & linears,
        "all-fp8": linears,  # every Linear FP8 tensor cores can take
    }
    batch = workload.make_batch([candidates], seed=1)
    inputs = {k: v.cuda() for k, v in batch.inputs.items()}
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    reference = workload.model.float().cuda()
    with torch.no_grad():
        want = reference(**inputs).float()
    result: dict[str, Any] = {"candidates": candidates, "modules": {k: sorted(v) for k, v in modules.items()}}
    runs: dict[str, Callable[[], Any]] = {}
    for key in ("bf16", "selective", "all-fp8"):
        model = codesign.load_model_ref("useq", size="large").model.cuda().to(torch.bfloat16).eval()
        for path in modules.get(key, set()):
            parent, _, child = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, Fp8Linear.from_linear(owner.get_submodule(child)))
        runs[key] = lambda model=model: model(**low)
        with torch.no_grad():
            got = runs[key]().float()
        loss = quality_loss([want], [got], seed=1)
        result[key] = {"ne_loss_pct_vs_fp32": loss.exact_pct, "max_logit_error_vs_fp32": loss.max_abs_error}
    with torch.no_grad():
        for key, fn in runs.items():
            result[key]["ms"] = _cuda_ms(fn)
    for key in ("selective", "all-fp8"):
        result[key]["speedup_vs_bf16"] = result["bf16"]["ms"] / result[key]["ms"]
    print(
        f"\nuseq large on the GPU, {candidates} candidates (history repeated per candidate), bf16 activations:"
    )
    for key in ("bf16", "selective", "all-fp8"):
        r = result[key]
        print(
            f"  {key:<10} {r['ms']:8.3f} ms  {result['bf16']['ms'] / r['ms']:5.2f}x   NE loss vs fp32 {r['ne_loss_pct_vs_fp32']:.4f}%  "
            f"FP8 Linears: {len(modules.get(key, ()))}"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--gpu-only", action="store_true", help="skip the model table (GPU part only)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data: dict[str, Any] = {
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if not args.gpu_only:
        print(f"models at size {args.size}; FP8 chosen for {args.target}; measured on {data['device']}")
        print(_HEADER)
        print(
            f"{'':<26} | {'selective':>12} {'all-fp8':>14} | {'fp32':>8} {'select':>8} {'all':>8} | {'fp32':>8} {'select':>8} {'all':>8} |"
        )
        data["models"] = [
            bench_model(m, args.size, args.target, args.requests, args.candidates, args.rounds)
            for m in args.models
        ]
        if not torch.cuda.is_available():
            print(
                "On a CPU, FP8 is emulated in fp32 (dequantize, fp32 GEMM): measured FP8 latency is not faster "
                "here; the predicted column is for the target."
            )
    has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    if has_fp8:
        data["gemms"] = bench_gemms(requests=16, candidates=256)
        data["gpu_model"] = bench_gpu_model(args.target, candidates=64)
    suffix = "gpu" if has_fp8 else "host"
    out = args.out or RESULTS / f"fp8-{suffix}-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
