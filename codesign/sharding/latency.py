"""One request's latency on a sharded deployment, on paper: lookup, all-to-all, dense, queueing.

A plan prices a *step* of ``batch_per_device`` candidates on every device. Serving scores one request
of N candidates spread over the K devices (N/K each, rounded up), so the same per-device traffic
scales down to that batch: lookups and all-to-all bytes grow linearly with the candidates a device
holds (``codesign.sharding.cost``), as does the dense part (``PlanWorkload.dense_s``). What does not
scale down are fixed costs, which dominate small requests: one kernel launch for the device's
lookups (a fused, TorchRec-style lookup of all its pieces) and per dense layer, and the latency of
the collectives: one all-to-all of ids out and one of pooled rows back. Requests queue in front of
the slowest device: at utilization ``rho`` an M/D/1 queue waits ``rho / (2 (1 - rho))`` service times.

The collective latencies are assumptions (order of magnitude of small-message all-to-all latency on
NVLink within a host and on an RDMA network across hosts), not measurements; every figure here is a
model to compare plans and deployments with, to be checked on the devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from codesign.errors import ShardingError
from codesign.sharding.types import Plan

__all__ = ["INTER_HOST_LATENCY_S", "INTRA_HOST_LATENCY_S", "RequestLatency", "request_latency"]

# assumed latency of one small-message all-to-all (see the module docstring)
INTRA_HOST_LATENCY_S = 10e-6
INTER_HOST_LATENCY_S = 25e-6
ALL_TO_ALLS = 2  # ids to the owners, pooled rows back


@dataclasses.dataclass(frozen=True)
class RequestLatency:
    """One request's latency on the slowest device (seconds), by part."""

    candidates: int
    per_device: int
    lookup_s: float
    all_to_all_s: float
    dense_s: float
    queueing_s: float
    utilization: float

    @property
    def service_s(self) -> float:
        return self.lookup_s + self.all_to_all_s + self.dense_s

    @property
    def total_s(self) -> float:
        return self.service_s + self.queueing_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "service_s": self.service_s,
            "total_s": self.total_s,
        }

    def describe(self) -> str:
        ms = 1e3
        return (
            f"{self.candidates} candidates ({self.per_device} per device): lookup {self.lookup_s * ms:.3f} ms + "
            f"all-to-all {self.all_to_all_s * ms:.3f} ms + dense {self.dense_s * ms:.3f} ms + queueing "
            f"{self.queueing_s * ms:.3f} ms (at {self.utilization:.0%} utilization) = {self.total_s * ms:.3f} ms"
        )


def request_latency(
    plan: Plan,
    candidates: int = 1000,
    *,
    utilization: float = 0.7,
    dense_flops_per_candidate: float | None = None,
    dense_dtype: str = "bf16",
    dense_layers: int = 8,
    intra_host_latency_s: float = INTRA_HOST_LATENCY_S,
    inter_host_latency_s: float = INTER_HOST_LATENCY_S,
) -> RequestLatency:
    """The latency of one request of ``candidates`` on ``plan``'s devices (see the module docstring).

    The dense part is ``dense_flops_per_candidate`` at the devices' ``dense_dtype`` matmul peak times
    their compute efficiency, or else the plan's own ``PlanWorkload.dense_s`` scaled to the request
    (a cost-model figure that already holds launches at the plan's batch: scaled down, they are
    under-counted, which the ``dense_layers`` launches added here make up for in part);
    ``dense_layers``: its kernels, each paying the device's launch overhead.

    >>> request_latency(plan, 1000).describe()
    """
    if candidates < 1:
        raise ShardingError(f"candidates must be >= 1, got {candidates}")
    if not 0.0 <= utilization < 1.0:
        raise ShardingError(f"utilization must be in [0, 1), got {utilization}")
    topo = plan.topology
    k = topo.size
    per_device = math.ceil(candidates / k)
    scale = per_device / plan.workload.batch_per_device
    launch = max(hw.launch_overhead_s for hw in topo.devices)
    hosts = len(set(topo.hosts))
    collective = intra_host_latency_s if hosts == 1 else inter_host_latency_s
    sends = any(s.kind != "data_parallel" for s in plan.shards)
    holds = {s.device for s in plan.shards}
    per_device_parts = [
        (
            plan.device_lookup_s[d] * scale + (launch if d in holds else 0.0),
            plan.device_comm_s[d] * scale + (ALL_TO_ALLS * collective if sends else 0.0),
        )
        for d in range(k)
    ]
    lookup, comm = max(per_device_parts, key=sum)  # the slowest device
    if dense_flops_per_candidate is None:
        dense = plan.workload.dense_s * scale
    else:
        rate = min(hw.matmul_flops_per_s.get(dense_dtype, 0.0) * hw.compute_efficiency for hw in topo.devices)
        if rate <= 0:
            raise ShardingError(
                f"a device of the plan has no {dense_dtype} matmul rate", fix="pick another dense_dtype"
            )
        dense = dense_flops_per_candidate * per_device / rate
    dense += dense_layers * launch
    service = lookup + comm + dense
    queueing = utilization / (2.0 * (1.0 - utilization)) * service
    return RequestLatency(candidates, per_device, lookup, comm, dense, queueing, utilization)
