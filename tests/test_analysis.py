"""Analysis and cost-model figures checked against hand-computed numbers."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.analysis import Role, analyze, propagate_roles, to_networkx
from codesign.errors import TargetError
from codesign.hardware.costmodel import estimate, estimate_analysis
from codesign.hardware.target import (
    CATALOGUE,
    OP_CLASSES,
    HardwareSpec,
    Target,
    calibrate_host,
    get_target,
    op_class,
)
from tests.conftest import tiny_program, tiny_workload


def _linear_flops(m: int, sizes: list[int], bias: bool = True) -> int:
    return sum(2 * m * a * b + (m * b if bias else 0) for a, b in itertools.pairwise(sizes))


def test_dcnv2_dense_forward_is_32_mflop_per_sample_at_mlperf_shape() -> None:
    w = codesign.load_model_ref("dcnv2", size="large")
    program = codesign.capture(w, w.make_batch([2, 2], 0))
    a = analyze(program, 8, 2)
    per_sample = sum(n.flops for n in a.nodes if n.op == "linear.default") / 8
    width = 128 * 27
    expected = (
        _linear_flops(1, [13, 512, 256, 128])
        + 3 * (_linear_flops(1, [width, 512], bias=False) + _linear_flops(1, [512, width]))
        + _linear_flops(1, [width, 1024, 1024, 512, 256, 1])
    )
    assert per_sample == expected  # 32,075,009: 16.03 M multiply-adds + biases
    assert 31.9e6 < a.total_flops / 8 < 32.5e6  # plus elementwise work (cross products, relus)


def test_dlrm_interaction_and_embedding_costs_by_hand() -> None:
    program = tiny_program("dlrm")
    batch = tiny_workload("dlrm").make_batch([10, 6], 1)
    a = analyze(program, batch)
    by_op = {n.op: n for n in a.nodes}
    n, dim = 16, 8
    assert by_op["bmm.default"].flops == 2 * n * 27 * 27 * dim
    bags = [c for c in a.nodes if c.op == "embedding_bag.padding_idx"]
    total_ids = sum(batch.leaves()[f"indices.{k}"].numel() for k in range(26))
    assert sum(b.flops for b in bags) == total_ids * dim  # one add per looked-up element
    model = tiny_workload("dlrm").model
    tensors = [*model.parameters(), *model.buffers()]  # buffers: the tril index pairs of the interaction
    assert a.param_bytes == sum(t.numel() * t.element_size() for t in tensors)


def test_roles_follow_the_spec() -> None:
    roles = propagate_roles(tiny_program("useq"))
    a = analyze(tiny_program("useq"), 64, 2)
    by_role = a.flops_by_role()
    assert by_role[Role.REQUEST] > 5 * by_role[Role.CANDIDATE]  # the history encoder is user-only work
    assert roles["layer_norm"] == Role.REQUEST
    mt = tiny_program("multitask")
    mt_roles = propagate_roles(mt)
    assert mt_roles["slice_1"] == Role.REQUEST and mt_roles["embedding"] == Role.REQUEST  # user columns
    assert mt_roles["embedding_1"] == Role.CANDIDATE  # ad category column
    dl_roles = propagate_roles(tiny_program("dlrm"))
    assert dl_roles["embedding_bag"] == Role.REQUEST and dl_roles["embedding_bag_13"] == Role.CANDIDATE


def test_networkx_view_mirrors_the_graph() -> None:
    program = tiny_program("din")
    g = to_networkx(program, analyze(program, 16))
    assert g.number_of_nodes() == len(program.graph.nodes)
    assert all(g.has_edge(i.name, n.name) for n in program.graph.nodes for i in n.all_input_nodes)
    assert sum(d.get("flops", 0) for _, d in g.nodes(data=True)) == analyze(program, 16).total_flops


def test_catalogue_numbers_and_fp8_support() -> None:
    h100 = CATALOGUE["h100"]
    assert h100.matmul_flops_per_s["bf16"] == pytest.approx(989.4e12)
    assert h100.memory_bandwidth_bytes_per_s == pytest.approx(3.35e12)
    assert CATALOGUE["h200"].memory_bytes == pytest.approx(141e9)
    fp8 = {name for name, hw in CATALOGUE.items() if hw.has_fp8}
    assert fp8 == {"h100", "h200", "l4", "mi300x"}
    assert all(hw.source for hw in CATALOGUE.values())
    with pytest.raises(TargetError, match="unknown target 'b200'"):
        get_target("b200")


def test_host_calibration_is_positive_and_cached() -> None:
    first = calibrate_host()
    assert first.matmul_flops_per_s["fp32"] > 1e8 and first.memory_bandwidth_bytes_per_s > 1e8
    assert 1e-8 < first.launch_overhead_s < 1e-3
    assert set(first.op_overhead_s) == set(OP_CLASSES)  # a fixed cost fitted for every op class
    assert all(1e-8 < s < 1e-3 for s in first.op_overhead_s.values())
    assert set(first.op_bandwidth_bytes_per_s) == set(OP_CLASSES) - {"gemm"}
    assert all(b > 1e8 for b in first.op_bandwidth_bytes_per_s.values())
    # an exported program's call costs input flattening and guards before any op: fixed + per input
    assert 0 < first.call_overhead_s < 1e-2 and 0 <= first.call_overhead_per_input_s < 1e-3
    assert calibrate_host() == first  # second call reads the cache


def test_fitted_op_classes_price_each_kernel_by_its_class() -> None:
    """A host with per-class figures charges a Linear the GEMM's fixed cost and a ReLU the vector ops'
    fixed cost and bandwidth; a class without a fitted figure falls back to the generic one."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
    batch = RequestBatch({"input": torch.randn(4, 64)}, offsets_from_counts([4]))
    program = codesign.capture(model, batch, RequestSpec())
    hw = HardwareSpec(
        name="toy-host",
        vendor="-",
        kind="cpu",
        matmul_flops_per_s={"fp32": 1e11},
        vector_flops_per_s=1e12,
        memory_bandwidth_bytes_per_s=1e10,
        memory_bytes=1e9,
        interconnect_bandwidth_bytes_per_s=1e10,
        devices_per_host=1,
        launch_overhead_s=3e-6,
        source="test",
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        op_overhead_s={"gemm": 20e-6, "vector": 1e-6},
        op_bandwidth_bytes_per_s={"vector": 1e8},
    )
    ops = {o.op: o for o in estimate(program, Target(hw), candidates=1024).ops}
    assert op_class("linear.default", "matmul") == "gemm" and op_class("relu.default", "vector") == "vector"
    assert op_class("embedding_bag.padding_idx", "vector") == "lookup"
    assert (
        op_class("cat.default", "vector") == "movement" and op_class("_softmax.default", "vector") == "norm"
    )
    assert ops["linear.default"].launch_s == pytest.approx(20e-6)
    assert ops["linear.default"].memory_s == pytest.approx(ops["linear.default"].bytes / 1e10)
    assert ops["relu.default"].launch_s == pytest.approx(1e-6)
    assert ops["relu.default"].memory_s == pytest.approx(ops["relu.default"].bytes / 1e8)
    plain = {o.op: o for o in estimate(program, Target(dataclasses.replace(hw, op_overhead_s={})), 1024).ops}
    assert plain["relu.default"].launch_s == pytest.approx(3e-6)
    # the call's own cost: fixed plus one share per input tensor (this program takes one)
    calls = dataclasses.replace(hw, call_overhead_s=50e-6, call_overhead_per_input_s=5e-6)
    with_call = estimate(program, Target(calls), candidates=1024)
    assert with_call.call_s == pytest.approx(55e-6)
    assert with_call.latency_s == pytest.approx(55e-6 + sum(o.time_s for o in with_call.ops))


def test_roofline_by_hand_on_a_round_number_target() -> None:
    lin = torch.nn.Linear(256, 512)
    batch = RequestBatch({"input": torch.randn(4, 256)}, offsets_from_counts([4]))
    program = codesign.capture(lin, batch, RequestSpec())
    hw = HardwareSpec(
        name="toy",
        vendor="-",
        kind="gpu",
        matmul_flops_per_s={"fp32": 1e12},
        vector_flops_per_s=1e11,
        memory_bandwidth_bytes_per_s=1e11,
        memory_bytes=1e9,
        interconnect_bandwidth_bytes_per_s=1e10,
        devices_per_host=1,
        launch_overhead_s=2e-6,
        source="test",
        compute_efficiency=1.0,
        memory_efficiency=1.0,
    )
    est = estimate(program, Target(hw), candidates=1024)
    (op,) = est.ops
    flops = 2 * 1024 * 256 * 512 + 1024 * 512
    nbytes = 4 * (1024 * 256 + 512 * 256 + 512 + 1024 * 512)
    assert op.flops == flops and op.bytes == nbytes
    assert op.compute_s == pytest.approx(flops / 1e12)
    assert op.memory_s == pytest.approx(nbytes / 1e11)
    assert est.latency_s == pytest.approx(max(flops / 1e12, nbytes / 1e11) + 2e-6)
    assert op.bound == "compute"  # 269 µs of math vs 37 µs of traffic


def test_costs_scale_with_candidates_and_rank_targets() -> None:
    program = tiny_program("dcnv2")
    a64, a1024 = analyze(program, 64, 4), analyze(program, 1024, 4)
    assert a1024.total_flops == pytest.approx(16 * a64.total_flops, rel=0.02)
    h100 = estimate_analysis(a1024, "h100")
    l4 = estimate_analysis(a1024, "l4")
    assert h100.latency_s < l4.latency_s  # faster HBM and tensor cores
    assert not math.isinf(h100.latency_s) and h100.fits_in_memory
