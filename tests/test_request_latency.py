"""One request's latency on a sharded plan, on paper (codesign.sharding.latency)."""

from __future__ import annotations

import dataclasses

import pytest

from codesign.errors import ShardingError
from codesign.hardware.target import HardwareSpec, get_target
from codesign.sharding import Plan, PlannerConfig, TableSpec, Topology, plan_sharding
from codesign.sharding.latency import INTER_HOST_LATENCY_S, INTRA_HOST_LATENCY_S, request_latency

H100 = get_target("h100").hardware
TABLES = [TableSpec(f"t{i}", 2_000_000 * (i + 1), 128, ids) for i, ids in enumerate((40, 20, 10, 5))]
SHARDED = PlannerConfig(sharding_types=("table_wise", "row_wise", "column_wise"))


def plan(devices: int, hardware: HardwareSpec = H100, config: PlannerConfig = SHARDED) -> Plan:
    return plan_sharding(TABLES, Topology.uniform(hardware, devices), config=config)


def test_traffic_scales_with_the_candidates_each_device_holds_and_fixed_costs_do_not() -> None:
    p = plan(4)
    small, large = request_latency(p, 4000), request_latency(p, 8000)
    assert (small.per_device, large.per_device) == (1000, 2000)
    launch = H100.launch_overhead_s
    # lookups: one launch + bytes that double with the batch
    assert large.lookup_s - launch == pytest.approx(2 * (small.lookup_s - launch), rel=1e-12)
    collectives = 2 * INTRA_HOST_LATENCY_S  # 4 devices: one host
    assert large.all_to_all_s - collectives == pytest.approx(
        2 * (small.all_to_all_s - collectives), rel=1e-12
    )
    assert small.all_to_all_s > collectives  # sharded tables send ids and pooled rows
    # the slowest device of the plan's step, at 1,000 of its 8,192 candidates per device
    step = max(lk + cm for lk, cm in zip(p.device_lookup_s, p.device_comm_s, strict=True))
    scale = 1000 / p.workload.batch_per_device
    assert small.lookup_s + small.all_to_all_s == pytest.approx(
        step * scale + launch + collectives, rel=1e-12
    )
    # 1,000 candidates on 4 devices: 250 each, rounded up where they do not divide
    assert request_latency(p, 1001).per_device == 251


def test_dense_part_is_flops_at_the_devices_rate_plus_a_launch_per_layer() -> None:
    p = plan(4)
    got = request_latency(p, 1000, dense_flops_per_candidate=1e9, dense_layers=5)
    rate = H100.matmul_flops_per_s["bf16"] * H100.compute_efficiency
    assert got.dense_s == pytest.approx(1e9 * 250 / rate + 5 * H100.launch_overhead_s, rel=1e-12)
    with pytest.raises(ShardingError, match="no int4 matmul rate"):
        request_latency(p, 1000, dense_flops_per_candidate=1e9, dense_dtype="int4")


def test_queueing_is_the_md1_wait_at_the_utilization() -> None:
    p = plan(4)
    idle = request_latency(p, 1000, utilization=0.0)
    busy = request_latency(p, 1000, utilization=0.8)
    assert idle.queueing_s == 0.0 and idle.total_s == idle.service_s
    assert busy.queueing_s == pytest.approx(0.8 / (2 * 0.2) * busy.service_s, rel=1e-12)
    for bad in ({"utilization": 1.0}, {"utilization": -0.1}):
        with pytest.raises(ShardingError, match="utilization"):
            request_latency(p, 1000, **bad)  # type: ignore[arg-type]
    with pytest.raises(ShardingError, match="candidates"):
        request_latency(p, 0)


def test_collectives_cost_more_across_hosts_and_nothing_without_sharded_tables() -> None:
    one_host = plan(2, dataclasses.replace(H100, devices_per_host=2))
    two_hosts = plan(2, dataclasses.replace(H100, devices_per_host=1))
    fixed_one = request_latency(one_host, 2_000_000).all_to_all_s - request_latency(one_host, 1).all_to_all_s
    assert fixed_one > 0  # traffic grows with the batch
    tiny_one, tiny_two = request_latency(one_host, 1), request_latency(two_hosts, 1)
    assert 2 * INTRA_HOST_LATENCY_S <= tiny_one.all_to_all_s < 2 * INTER_HOST_LATENCY_S
    assert tiny_two.all_to_all_s >= 2 * INTER_HOST_LATENCY_S
    replicated = plan(2, config=PlannerConfig(sharding_types=("data_parallel",)))
    assert request_latency(replicated, 1000).all_to_all_s == 0.0
