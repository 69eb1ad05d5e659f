"""Embedding sharding: planner (bound, memory, errors, JSON), the pass, bundles, CLI, and the
multi-process runtime on gloo against the single-device run."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from pathlib import Path

import pytest
import torch

import codesign
from codesign.cli import main
from codesign.errors import ShardingError
from codesign.hardware.target import Target, get_target
from codesign.ir.workload import load_model_ref
from codesign.passes.manager import PassManager, SkipKind
from codesign.passes.sharding import ShardEmbeddings, ShardingConfig, program_tables
from codesign.sharding import Plan, PlannerConfig, TableSpec, Topology, plan_sharding
from codesign.sharding.runtime import ShardedProgram, launch
from codesign.sharding.tablesets import mlperf_dlrmv2_tables

H100 = get_target("h100").hardware
A100_40 = get_target("a100-40gb").hardware
# Row-wise partial sums add the same fp32 values in another order than one embedding_bag does.
SHARDED_ATOL = 1e-5
GOAL_GAP = 1.05  # issue #6: slowest device within 5% of the lower bound


def test_mlperf_dlrmv2_on_8_h100_is_within_5_percent_of_the_bound() -> None:
    plan = plan_sharding(mlperf_dlrmv2_tables(), Topology.uniform(H100, 8))
    assert plan.lower_bound_s <= plan.max_cost_s <= GOAL_GAP * plan.lower_bound_s
    assert plan.simple_lower_bound_s <= plan.lower_bound_s * (1 + 1e-9)
    assert all(b <= c for b, c in zip(plan.device_bytes, plan.device_capacity_bytes, strict=True))
    assert {s.table for s in plan.shards} == {f"cat_{i}" for i in range(26)}
    again = Plan.from_json(plan.to_json())
    assert again == plan


def test_memory_bound_set_on_a100_40gb_fits_and_respects_the_bound() -> None:
    plan = plan_sharding(mlperf_dlrmv2_tables(), Topology.uniform(A100_40, 16))
    assert plan.topology.hosts == tuple(i // 8 for i in range(16))
    assert max(plan.device_bytes) <= min(plan.device_capacity_bytes)
    assert plan.max_cost_s >= plan.lower_bound_s
    # a 40M x 128 fp32 table is 20.5 GB: at most one replica of those fits in 36 GB
    replicated = [t for t, kind in plan.kinds.items() if kind == "data_parallel"]
    assert sum(plan.table(t).rows >= 40_000_000 for t in replicated) <= 1


def _brute_force_table_wise(tables: list[TableSpec], devices: int) -> float:
    plan = plan_sharding(
        tables, Topology.uniform(H100, devices), config=PlannerConfig(sharding_types=("table_wise",))
    )
    cost = {s.table: s.cost_s for s in plan.shards}
    best = float("inf")
    for assign in itertools.product(range(devices), repeat=len(tables)):
        loads = [0.0] * devices
        for t, d in zip(tables, assign, strict=True):
            loads[d] += cost[t.name]
        best = min(best, max(loads))
    return best


def test_table_wise_plan_matches_brute_force_and_the_bound_is_below_it() -> None:
    tables = [TableSpec(f"t{i}", 1000 * (i + 1), 64, ids) for i, ids in enumerate((9, 7, 6, 5, 4, 3, 2))]
    optimum = _brute_force_table_wise(tables, 3)
    plan = plan_sharding(
        tables, Topology.uniform(H100, 3), config=PlannerConfig(sharding_types=("table_wise",))
    )
    assert plan.lower_bound_s <= optimum * (1 + 1e-9)
    assert plan.max_cost_s == pytest.approx(optimum, rel=1e-9)


def test_fp8_storage_shrinks_every_device() -> None:
    fp32 = plan_sharding(
        mlperf_dlrmv2_tables(),
        Topology.uniform(H100, 8),
        config=PlannerConfig(sharding_types=("table_wise", "row_wise")),
    )
    fp8 = plan_sharding(
        mlperf_dlrmv2_tables(storage="fp8"),
        Topology.uniform(H100, 8),
        config=PlannerConfig(sharding_types=("table_wise", "row_wise")),
    )
    assert sum(fp8.device_bytes) < sum(fp32.device_bytes) / 3.5  # 132 bytes per row instead of 512


def test_heterogeneous_topology_plans_within_each_devices_memory() -> None:
    topo = Topology.from_groups([(H100, 4), (A100_40, 4)])
    plan = plan_sharding(mlperf_dlrmv2_tables(), topo)
    assert plan.topology.hosts == (0, 0, 0, 0, 1, 1, 1, 1)
    assert all(b <= c for b, c in zip(plan.device_bytes, plan.device_capacity_bytes, strict=True))
    assert plan.device_capacity_bytes[4] < plan.device_capacity_bytes[0]
    assert Plan.from_json(plan.to_json()).topology == topo


def test_infeasible_inputs_say_what_would_fit() -> None:
    huge = [TableSpec("users", 2_000_000_000, 128)]  # 1 TB in fp32
    with pytest.raises(ShardingError, match=r"need .* GiB.*hold") as err:
        plan_sharding(huge, Topology.uniform(H100, 8))
    assert err.value.fix is not None and "devices" in err.value.fix and "fp8" in err.value.fix
    with pytest.raises(ShardingError, match="smallest piece"):
        plan_sharding(
            [TableSpec("big", 400_000_000, 128)],
            Topology.uniform(H100, 8),
            config=PlannerConfig(sharding_types=("table_wise",)),
        )
    with pytest.raises(ShardingError, match=r"zero devices|cannot plan for 0"):
        Topology.uniform(H100, 0)
    with pytest.raises(ShardingError, match="unknown or no sharding types"):
        PlannerConfig(sharding_types=("diagonal",))
    with pytest.raises(ShardingError, match="unknown tables"):
        plan_sharding(
            [TableSpec("a", 10, 8)],
            Topology.uniform(H100, 2),
            config=PlannerConfig(constraints={"b": "row_wise"}),
        )
    with pytest.raises(ShardingError, match="rows"):
        TableSpec("bad", 0, 8)


def test_tampered_plan_json_is_refused() -> None:
    plan = plan_sharding(
        [TableSpec("a", 100, 8, 2.0), TableSpec("b", 50, 8)],
        Topology.uniform(H100, 2),
        config=PlannerConfig(constraints={"a": "row_wise"}),
    )
    data = plan.to_dict()
    data["shards"] = [s for s in data["shards"] if not (s["table"] == "a" and s["index"] == 1)]
    with pytest.raises(ShardingError, match="do not cover"):
        Plan.from_dict(data)
    with pytest.raises(ShardingError, match="schema"):
        Plan.from_dict({**plan.to_dict(), "schema": 99})


# ---- the pass, bundles, CLI -----------------------------------------------------------------------


# plans, measures and saves a sharded bundle (13 s): `make test-slow`
@pytest.mark.slow
def test_pass_measures_request_level_tables_and_bundle_carries_the_plan(tmp_path: Path) -> None:
    workload = load_model_ref("dlrm", size="tiny")
    program = codesign.capture(workload)
    tables, _, refused = program_tables(program)
    assert len(tables) == 26 and not refused
    assert all(t.bags_per_sample == pytest.approx(1.0) for t in tables)  # flat: one bag per candidate
    variant = codesign.compile(workload, target=get_target("host", 4), backend="eager")
    assert variant.plan is not None and variant.plan.topology.size == 4
    grouping = next(p for p in variant.report["passes"] if p["name"] == "group_embedding_bags")  # type: ignore[index]
    assert not grouping["modified"] and grouping["skip"]["kind"] == "not_applicable"
    assert "sharded across devices" in grouping["skip"]["message"]
    loaded = codesign.load(variant.save(tmp_path / "b", verify="in_process"))
    assert loaded.plan == variant.plan
    (tmp_path / "b" / "plan.json").write_text("{}")
    with pytest.raises(codesign.errors.BundleError):
        codesign.load(tmp_path / "b")


def test_pass_is_left_out_on_one_device() -> None:
    assert ShardEmbeddings.unavailable(get_target("h100")) is not None
    program = codesign.capture(load_model_ref("dcnv2", size="tiny"))
    result = ShardEmbeddings().apply(program, get_target("h100"))
    assert not result.modified and "sharding_plan" not in program.metadata
    assert result.skip is not None and result.skip.kind is SkipKind.UNAVAILABLE
    # through the manager the pass is skipped before its rewrite runs, with the reason and a fix
    out, report = PassManager([ShardEmbeddings()], get_target("h100")).run(program)
    (rec,) = report.passes
    assert rec.skip is not None and rec.skip.kind is SkipKind.UNAVAILABLE
    assert (
        rec.skip.message == ShardEmbeddings.unavailable(get_target("h100"))
        and "--devices 2" in rec.skip.message
    )
    assert "sharding_plan" not in out.metadata


def test_cli_plan_prints_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert (
        main(["plan", "dcnv2", "--size", "tiny", "--target", "h100", "--devices", "8", "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "lower bound" in text and "device" in text
    assert "on paper, 1000 candidates (125 per device): lookup" in " ".join(text.split())
    plan = Plan.from_json(out.read_text())
    assert plan.topology.size == 8 and len(plan.tables) == 26
    assert main(["plan", "dcnv2", "--size", "tiny", "--devices", "0"]) == 2
    capsys.readouterr()
    assert main(["plan", "dcnv2", "--size", "tiny", "--types", "diagonal"]) == 2
    err = capsys.readouterr().err  # errors go to stderr, with the fix
    assert "unknown ['diagonal']" in err and "table_row_wise" in err
    assert main(["plan", "dcnv2", "--size", "tiny", "--types", "table_wise,row_wise", "--out", str(out)]) == 0
    assert set(Plan.from_json(out.read_text()).kinds.values()) <= {"table_wise", "row_wise"}


# ---- multi-process execution ---------------------------------------------------------------------

_KINDS = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


def _forced_plan(name: str, world: int) -> str:
    """A plan that uses every sharding type (round robin over the tables), two devices per host."""
    program = codesign.capture(load_model_ref(name, size="tiny"))
    tables, _, _ = program_tables(program)
    kinds = _KINDS if world >= 4 else tuple(k for k in _KINDS if k != "table_row_wise")
    constraints = tuple((t.name, kinds[i % len(kinds)]) for i, t in enumerate(tables))
    hw = dataclasses.replace(H100, devices_per_host=2)
    result = ShardEmbeddings(ShardingConfig(devices=world, constraints=constraints)).apply(
        program, Target(hw, world)
    )
    return json.dumps(program.metadata["sharding_plan"]) if result.modified else ""


def _score_on_rank(rank: int, world: int, name: str, plan_json: str, out: str) -> None:
    program = codesign.capture(load_model_ref(name, size="tiny"))
    sharded = ShardedProgram(program.graph_module, Plan.from_json(plan_json))
    errors = []
    for step in range(2):  # each rank scores its own requests; sizes differ across ranks
        batch = program.sample_batch([5, 1, 3 + rank, 2][: 1 + (rank + step) % 4], seed=100 * step + rank)
        got, want = sharded(**batch.inputs), program.run(batch)
        errors.append(float((got - want).abs().max()))
    Path(out, f"{rank}.json").write_text(json.dumps({"errors": errors, "local_shards": len(sharded.local)}))


@pytest.mark.parametrize(
    ("name", "world"),
    [
        # 15-40 s each, `make test-slow`; test_sharded_nn_embedding_run_on_gloo_equals_single_device runs on gloo
        # in the fast suite
        pytest.param("dlrm", 2, marks=pytest.mark.slow),
        pytest.param("dlrm", 4, marks=pytest.mark.slow),
        pytest.param("dcnv2", 2, marks=pytest.mark.slow),
        pytest.param("dcnv2", 4, marks=pytest.mark.slow),
    ],
)
def test_sharded_run_on_gloo_equals_single_device(name: str, world: int) -> None:
    plan_json = _forced_plan(name, world)
    plan = Plan.from_json(plan_json)
    used = set(plan.kinds.values())
    assert used == set(_KINDS if world >= 4 else _KINDS[:3] + _KINDS[4:])
    with tempfile.TemporaryDirectory() as out:
        launch(_score_on_rank, world, name, plan_json, out, backend="gloo")
        results = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    assert all(max(r["errors"]) <= SHARDED_ATOL for r in results), results
    # every rank holds only its own shards
    assert sum(r["local_shards"] for r in results) == len(plan.shards)


@pytest.mark.slow  # spawns a gloo process group (~8 s)
def test_sharded_program_refuses_a_plan_for_another_world_size() -> None:
    plan_json = _forced_plan("dlrm", 2)
    with (
        tempfile.TemporaryDirectory() as out,
        pytest.raises(Exception, match="plan is for 2 devices but the process group has 1"),
    ):
        launch(_refuse_on_rank, 1, plan_json, out, backend="gloo")


def _refuse_on_rank(rank: int, world: int, plan_json: str, out: str) -> None:
    program = codesign.capture(load_model_ref("dlrm", size="tiny"))
    ShardedProgram(program.graph_module, Plan.from_json(plan_json))


def test_sharded_program_needs_a_process_group() -> None:
    program = codesign.capture(load_model_ref("dlrm", size="tiny"))
    plan = Plan.from_json(_forced_plan("dlrm", 2))
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(ShardingError, match="not initialized"):
        ShardedProgram(program.graph_module, plan)


# ---- nn.Embedding tables ------------------------------------------------------------------------


def _embedding_program(world: int) -> tuple[codesign.ir.program.Program, str]:
    """zoo wide_deep (5 per-field nn.Embedding tables and a wide one read with [N, 5] ids), planned
    over ``world`` devices with a row-wise and a column-wise table among them."""
    from tests.zoo import ZOO

    program = codesign.capture(ZOO["wide_deep"]())
    hw = dataclasses.replace(H100, devices_per_host=2)
    forced = (("embeds.0.weight", "row_wise"), ("embeds.1.weight", "column_wise"))
    config = ShardingConfig(devices=world, constraints=forced)
    out, report = PassManager([ShardEmbeddings(config)], Target(hw, world)).run(program)
    assert report.passes[0].modified, report.passes[0].skip
    return out, json.dumps(out.metadata["sharding_plan"])


def test_nn_embedding_tables_are_planned_like_embedding_bags() -> None:
    _, plan_json = _embedding_program(2)
    plan = Plan.from_json(plan_json)
    assert sorted(t.name for t in plan.tables) == sorted(
        [f"embeds.{i}.weight" for i in range(5)] + ["wide.weight"]
    )
    wide = next(t for t in plan.tables if t.name == "wide.weight")
    assert wide.bags_per_sample == pytest.approx(5.0)  # [N, 5] ids: five one-id bags per candidate
    assert plan.kinds["embeds.0.weight"] == "row_wise" and plan.kinds["embeds.1.weight"] == "column_wise"


def _score_embedding_rank(rank: int, world: int, out: str) -> None:
    program, plan_json = _embedding_program(world)
    sharded = ShardedProgram(program.graph_module, Plan.from_json(plan_json))
    batch = program.sample_batch([3, 1 + rank, 2], seed=7 + rank)
    err = float((sharded(**batch.inputs) - program.run(batch)).abs().max())
    Path(out, f"{rank}.json").write_text(json.dumps({"error": err}))


def test_sharded_nn_embedding_run_on_gloo_equals_single_device() -> None:
    with tempfile.TemporaryDirectory() as out:
        launch(_score_embedding_rank, 2, out, backend="gloo")
        errors = [json.loads(Path(out, f"{r}.json").read_text())["error"] for r in range(2)]
    assert max(errors) <= SHARDED_ATOL, errors
