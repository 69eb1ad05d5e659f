"""Roofline latency and memory estimate of a Program on a Target.

Per kernel: time = max(FLOPs / achievable rate for its dtype, bytes / achievable bandwidth)
+ launch overhead. On the calibrated host the overhead and bandwidth are fitted per op class
(``target.op_class``: gemm, lookup, movement, norm, vector) and a program call's own cost is added;
datasheet targets use one figure each. FLOPs, bytes, the engine (matmul, fp8 or vector) and the launches per call all
come from ``codesign.analysis`` (each op's registered cost); this module only prices them: matmul
ops at the tensor (matrix) rate of their dtype, fp8 ones at the FP8 rate, others at the vector
rate. Views launch nothing on accelerators; where the target says views cost a dispatch (the host
CPU running the graph op by op), each view adds ``view_overhead_s``. Sums over kernels assume one kernel at a time, as eager and most
serving paths run them; fusion passes show up as fewer, larger kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from codesign.analysis import NodeCost, ProgramAnalysis, analyze
from codesign.hardware.target import Target, get_target, op_class, rate_dtype
from codesign.ir.program import Program

__all__ = [
    "CostEstimate",
    "OpEstimate",
    "estimate",
    "estimate_analysis",
    "op_profile",
    "scaling_curve",
]


@dataclasses.dataclass(frozen=True)
class OpEstimate:
    name: str
    op: str
    module: str
    flops: int
    bytes: int
    compute_s: float
    memory_s: float
    launch_s: float
    rate_dtype: str

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.launch_s

    @property
    def bound(self) -> str:
        if self.launch_s > max(self.compute_s, self.memory_s):
            return "launch"
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    """Predicted cost of one call at ``candidates`` rows over ``requests`` requests."""

    target: str
    candidates: int
    requests: int
    ops: tuple[OpEstimate, ...]
    param_bytes: int
    activation_bytes: int
    memory_capacity_bytes: float
    call_s: float = 0.0  # the program call's own cost (input flattening, guards) on the host

    @property
    def latency_s(self) -> float:
        return self.call_s + sum(o.time_s for o in self.ops)

    @property
    def compute_s(self) -> float:
        return sum(o.compute_s for o in self.ops)

    @property
    def memory_s(self) -> float:
        return sum(o.memory_s for o in self.ops)

    @property
    def launch_s(self) -> float:
        return sum(o.launch_s for o in self.ops)

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.ops)

    @property
    def memory_bytes(self) -> int:
        """Parameters plus an upper bound on live activations (every intermediate kept)."""
        return self.param_bytes + self.activation_bytes

    @property
    def fits_in_memory(self) -> bool:
        return self.memory_bytes <= self.memory_capacity_bytes

    def summary(self) -> dict[str, float | int | str | bool]:
        return {
            "target": self.target,
            "candidates": self.candidates,
            "requests": self.requests,
            "latency_s": self.latency_s,
            "compute_s": self.compute_s,
            "memory_s": self.memory_s,
            "launch_s": self.launch_s,
            "flops": self.flops,
            "bytes": self.bytes,
            "param_bytes": self.param_bytes,
            "memory_bytes": self.memory_bytes,
            "fits_in_memory": self.fits_in_memory,
        }


def kernel_time_s(target: Target, flops: float, nbytes: float, rate: str | None, launches: int = 1) -> float:
    """Roofline time of kernels doing ``flops`` at the ``rate`` matmul dtype (None: vector) over ``nbytes``."""
    hw = target.hardware
    speed = hw.matmul_rate(rate)[0] if rate else hw.vector_flops_per_s * hw.compute_efficiency
    bandwidth = hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency
    return max(flops / speed if speed else 0.0, nbytes / bandwidth) + launches * hw.launch_overhead_s


def _op_estimate(node: NodeCost, target: Target) -> OpEstimate:
    hw = target.hardware
    if node.engine == "fp8":
        rate, used = hw.matmul_rate("fp8")
    elif node.engine == "matmul":
        rate, used = hw.matmul_rate(rate_dtype(node.dtype))
    else:
        rate, used = hw.vector_flops_per_s * hw.compute_efficiency, "vector"
    kind = op_class(node.op, node.engine)  # the host's fitted fixed cost and bandwidth per op class
    bandwidth = hw.bandwidth_bytes_per_s(kind)
    return OpEstimate(
        name=node.name,
        op=node.op,
        module=node.module,
        flops=node.flops,
        bytes=node.bytes,
        compute_s=node.flops / rate if rate else 0.0,
        memory_s=node.bytes / bandwidth,
        launch_s=hw.overhead_s(kind) * node.kernels,
        rate_dtype=used,
    )


def estimate_analysis(analysis: ProgramAnalysis, target: Target | str) -> CostEstimate:
    """Roofline estimate from an existing analysis (reuse one analysis for many targets)."""
    tgt = get_target(target)
    ops = tuple(_op_estimate(n, tgt) for n in analysis.kernels)
    if tgt.hardware.view_overhead_s:
        views = [n for n in analysis.nodes if n.is_view and n.op != "getitem"]  # getitem: Python indexing
        ops += tuple(
            OpEstimate(
                name=n.name,
                op=n.op,
                module=n.module,
                flops=0,
                bytes=0,
                compute_s=0.0,
                memory_s=0.0,
                launch_s=tgt.hardware.view_overhead_s,
                rate_dtype="-",
            )
            for n in views
        )
    activation = (
        sum(n.bytes for n in analysis.kernels if n.flops or n.bytes) // 2
    )  # outputs ~ half of traffic
    return CostEstimate(
        target=tgt.name,
        candidates=analysis.candidates,
        requests=analysis.requests,
        ops=ops,
        param_bytes=analysis.param_bytes,
        activation_bytes=activation,
        memory_capacity_bytes=tgt.hardware.memory_bytes * tgt.devices,
        call_s=tgt.hardware.call_overhead_s + tgt.hardware.call_overhead_per_input_s * analysis.inputs,
    )


def estimate(program: Program, target: Target | str, candidates: int = 64, requests: int = 1) -> CostEstimate:
    """Predicted latency and memory of ``program`` on ``target`` for one batch of that size.

    >>> estimate(program, "h100", candidates=1024).latency_s
    """
    return estimate_analysis(analyze(program, candidates, requests), target)


def op_profile(
    program: Program, target: Target | str, candidates: int, requests: int, top: int = 40
) -> dict[str, Any]:
    """JSON-ready profile at one batch size: totals, FLOPs by role, and the ``top`` kernels by time.

    Each kernel row carries its roofline coordinates (FLOPs, bytes, predicted time, the dtype rate it
    runs at, its bound), so a report can place it on the target's roofline without the program.
    """
    tgt = get_target(target)
    analysis = analyze(program, candidates, requests)
    est = estimate_analysis(analysis, tgt)
    by_name = {n.name: n for n in analysis.kernels}
    kernels = sorted((o for o in est.ops if o.name in by_name), key=lambda o: o.time_s, reverse=True)
    return {
        "target": tgt.name,
        "candidates": analysis.candidates,
        "requests": analysis.requests,
        "latency_s": est.latency_s,
        "flops": est.flops,
        "bytes": est.bytes,
        "param_bytes": est.param_bytes,
        "kernels": len(analysis.kernels),
        "flops_by_role": {r.value: v for r, v in analysis.flops_by_role().items()},
        "top": [
            {
                "name": o.name,
                "op": o.op,
                "module": o.module,
                "role": by_name[o.name].role.value,
                "flops": o.flops,
                "bytes": o.bytes,
                "rate_dtype": o.rate_dtype,
                "time_s": o.time_s,
                "bound": o.bound,
            }
            for o in kernels[:top]
        ],
    }


def scaling_curve(
    program: Program, target: Target | str, candidates: Sequence[int], requests: int = 1
) -> list[float]:
    """Predicted latency (s) of one call at each candidate count, spread over ``requests`` requests."""
    return [estimate(program, target, n, requests).latency_s for n in candidates]
