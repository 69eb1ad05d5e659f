"""Fusion passes: each pattern fires on a graph made for it, leaves other graphs alone, keeps numerics."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.analysis import count_kernels
from codesign.hardware.target import get_target
from codesign.ir.program import Program
from codesign.passes import (
    CommonSubexpressionElimination,
    RequestSharing,
    RequestSharingConfig,
    all_passes,
    default_passes,
    generic_passes,
    pass_names,
)
from codesign.passes.fusion import (
    REORDERED,
    EmbeddingGrouping,
    EmbeddingGroupingConfig,
    LinearEpilogueConfig,
    LinearEpilogueFusion,
    ParallelLinearConfig,
    ParallelLinearFusion,
    SharedInputLinearFusion,
    fusion_passes,
)
from codesign.passes.manager import Pass, PassManager, SkipKind
from codesign.passes.testing import assert_outputs_close
from tests.conftest import EXAMPLES, FIXED_CPU, resolve_target, tiny_program, tiny_workload

HOST = get_target("host")
# The mechanisms are tested with their gates open: the host cost model decides per machine.
FORCED: dict[str, Pass] = {
    "group_embedding_bags": EmbeddingGrouping(EmbeddingGroupingConfig(require_predicted_gain=False)),
    "fuse_shared_input_linears": SharedInputLinearFusion(),
    "fuse_parallel_linears": ParallelLinearFusion(ParallelLinearConfig(require_predicted_gain=False)),
    "fuse_linear_epilogue": LinearEpilogueFusion(LinearEpilogueConfig(when="always")),
}


def _ops(program: Program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def _run(program: Program, p: Pass) -> tuple[Program, dict[str, object], bool]:
    out, report = PassManager([p], HOST).run(program)
    return out, report.passes[0].stats, report.passes[0].modified


def _capture(model: torch.nn.Module, make: object) -> Program:
    return codesign.capture(model.eval(), make([3, 2], 0), RequestSpec(), make_batch=make)  # type: ignore[operator]


def _batch_of(**widths: int) -> object:
    def make(counts: list[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        n = sum(counts)
        return RequestBatch(
            {k: torch.randn(n, w, generator=g) for k, w in widths.items()}, offsets_from_counts(counts)
        )

    return make


# ---- shared-input Linears ---------------------------------------------------------------------


class _Heads(torch.nn.Module):
    """Three task heads on the same features (one without bias) and one on other features."""

    def __init__(self) -> None:
        super().__init__()
        self.ctr = torch.nn.Linear(8, 4)
        self.cvr = torch.nn.Linear(8, 3)
        self.dwell = torch.nn.Linear(8, 5, bias=False)
        self.other = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(self.ctr(x)), self.cvr(x).sigmoid(), self.dwell(x), self.other(y)], -1)


def test_linears_on_one_input_become_one_gemm() -> None:
    make = _batch_of(x=8, y=6)
    program = _capture(_Heads(), make)
    out, stats, modified = _run(program, SharedInputLinearFusion())
    assert modified and stats["linears_fused"] == 3 and stats["groups"] == 1
    assert _ops(out).count("aten.linear.default") == 2  # the fused GEMM and the head on y
    batch = make([4, 1], 3)  # type: ignore[operator]
    assert_outputs_close(out.run(batch), program.run(batch), REORDERED)


def test_linears_on_different_inputs_are_left_alone() -> None:
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    program = _capture(TwoInputs(), _batch_of(x=8, y=6))
    out, report = PassManager([SharedInputLinearFusion()], HOST).run(program)
    rec = report.passes[0]
    assert not rec.modified and out.graph_module.code == program.graph_module.code
    assert rec.skip is not None and rec.skip.kind is SkipKind.NOT_APPLICABLE
    assert rec.skip.message == "no two Linears read the same input"


# ---- parallel towers --------------------------------------------------------------------------


class _Towers(torch.nn.Module):
    """One two-layer tower per task, each on its own input: the grouped-GEMM pattern."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.towers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            for _ in range(tasks)
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        outs = [tower(x) for tower, x in zip(self.towers, (a, b, c), strict=True)]
        return torch.sigmoid(torch.cat(outs, -1))


def test_parallel_towers_become_one_batched_chain() -> None:
    make = _batch_of(a=8, b=8, c=8)
    program = _capture(_Towers(), make)
    out, stats, modified = _run(program, FORCED["fuse_parallel_linears"])
    assert modified and stats["linears_batched"] == 6 and stats["activations_batched"] == 1
    assert stats["stacks_removed"] == 1  # layer 2 reads layer 1's batch directly
    ops = _ops(out)
    assert "aten.linear.default" not in ops and ops.count("aten.baddbmm.default") == 2
    assert ops.count("aten.relu.default") == 1
    assert stats["kernels_after"] < stats["kernels_before"]  # type: ignore[operator]
    batch = make([1, 6, 2], 9)  # type: ignore[operator]
    assert_outputs_close(out.run(batch), program.run(batch), REORDERED)


def test_dependent_linears_of_equal_shape_are_not_batched() -> None:
    class Deep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(8, 8),
                torch.nn.ReLU(),
                torch.nn.Linear(8, 8),
                torch.nn.ReLU(),
                torch.nn.Linear(8, 8),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)

    program = _capture(Deep(), _batch_of(x=8))
    out, _, modified = _run(program, FORCED["fuse_parallel_linears"])
    assert not modified and out.graph_module.code == program.graph_module.code


def test_the_cost_model_gates_decide_per_target() -> None:
    """The same rewrite is kept where the target's numbers predict a gain and discarded where not.

    Both targets are fixed numbers (a datasheet GPU, a fixed CPU spec), so the decisions do not depend on
    this machine: on the GPU one batched GEMM instead of six launches pays; on the CPU the stacking
    copies cost more than the launches they save.
    """
    towers = _capture(_Towers(), _batch_of(a=8, b=8, c=8))
    cases = [(ParallelLinearFusion(), towers), (EmbeddingGrouping(), tiny_program("dlrm"))]
    for p, program in cases:
        decisions = {}
        for target in (get_target("h100"), resolve_target(FIXED_CPU.name)):
            out, report = PassManager([p], target).run(program)
            rec = report.passes[0]
            before, after = rec.predicted_latency_before_s, rec.predicted_latency_after_s
            assert before is not None and after is not None, (p.name, target.name)
            assert rec.modified == (after < before), (p.name, target.name, before, after)
            assert rec.modified or (rec.skip is not None and rec.skip.kind is SkipKind.NO_PREDICTED_GAIN)
            assert (out.graph_module.code == program.graph_module.code) != rec.modified
            decisions[target.name] = rec.modified
        assert decisions == {"h100": True, FIXED_CPU.name: False}, (p.name, decisions)


# ---- grouped embedding lookup -----------------------------------------------------------------


class _Bags(torch.nn.Module):
    """Four sum tables of width 4 (two user, two ad), one mean table, one table of width 6."""

    def __init__(self) -> None:
        super().__init__()
        self.sums = torch.nn.ModuleList(torch.nn.EmbeddingBag(r, 4, mode="sum") for r in (11, 7, 5, 9))
        self.mean = torch.nn.EmbeddingBag(13, 4, mode="mean")
        self.wide = torch.nn.EmbeddingBag(6, 6, mode="sum")

    def forward(self, ids: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        tables = [*self.sums, self.mean, self.wide]
        return torch.cat([t(i, o) for t, i, o in zip(tables, ids, offsets, strict=True)], -1)


_ROWS = (11, 7, 5, 9, 13, 6)


def _bags_batch(counts: list[int], seed: int) -> RequestBatch:
    """Jagged bags (0-3 ids); tables 0-1 hold one bag per request, repeated on its candidates."""
    g = torch.Generator().manual_seed(seed)
    request_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids, offsets = [], []
    for t, rows in enumerate(_ROWS):
        user = t < 2
        bags = [
            torch.randint(0, rows, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
            for _ in range(len(counts) if user else sum(counts))
        ]
        if user:
            bags = [bags[int(r)] for r in request_of]
        lengths = torch.tensor([len(b) for b in bags])
        ids.append(torch.cat(bags))
        offsets.append(torch.cumsum(lengths, 0) - lengths)
    return RequestBatch({"ids": ids, "offsets": offsets}, offsets_from_counts(counts))


def _bags_program() -> Program:
    spec = RequestSpec(
        request_inputs=("ids.0", "ids.1"), jagged={f"ids.{t}": f"offsets.{t}" for t in range(len(_ROWS))}
    )
    return codesign.capture(_Bags().eval(), _bags_batch([3, 2], 0), spec, make_batch=_bags_batch)


def test_embedding_bags_are_grouped_by_width_mode_and_role() -> None:
    program = _bags_program()
    out, stats, modified = _run(program, FORCED["group_embedding_bags"])
    # user tables 0-1 and ad tables 2-3 form two groups; the mean and the wide table stay alone
    assert modified and stats["tables_per_group"] == [2, 2]
    ops = _ops(out)
    assert ops.count("codesign.grouped_embedding_bag.default") == 2
    assert ops.count("aten.embedding_bag.padding_idx") + ops.count("aten.embedding_bag.default") == 2
    for counts in ([1], [4, 1, 3]):
        batch = _bags_batch(counts, 5)
        assert_outputs_close(out.run(batch), program.run(batch), REORDERED)


def test_grouped_lookup_rejects_an_id_outside_its_table() -> None:
    out, _, _ = _run(_bags_program(), FORCED["group_embedding_bags"])
    batch = _bags_batch([2], 1)
    batch.inputs["ids"][2] = torch.full_like(batch.inputs["ids"][2], 5)  # table 2 has rows 0..4
    with pytest.raises(Exception, match=r"id 5 is out of range for table 0 of the group \(5 rows\)"):
        out.run(batch)


class _FieldEmbeddings(torch.nn.Module):
    """Per-field ``nn.Embedding`` tables as CTR code writes them: ids [N, F], one table per column, a
    history table read with [N, L] ids, and a table of another width that cannot join a group."""

    def __init__(self) -> None:
        super().__init__()
        self.fields = torch.nn.ModuleList([torch.nn.Embedding(v, 8) for v in (30, 12, 50)])
        self.history = torch.nn.Embedding(40, 8, padding_idx=0)
        self.other = torch.nn.Embedding(9, 4)
        self.head = torch.nn.Linear(5 * 8 + 4, 1)

    def forward(self, sparse: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        embs = [emb(sparse[:, i]) for i, emb in enumerate(self.fields)]  # [N, d] each
        h = self.history(hist)  # [N, L, d]
        x = torch.cat([*embs, h.sum(1), h.max(1).values, self.other(sparse[:, 3])], 1)
        return self.head(x).squeeze(1)


def _fields_batch(counts: list[int], seed: int) -> RequestBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    sparse = torch.stack([torch.randint(0, v, (n,), generator=g) for v in (30, 12, 50, 9)], 1)
    return RequestBatch(
        {"sparse": sparse, "hist": torch.randint(0, 40, (n, 5), generator=g)}, offsets_from_counts(counts)
    )


def test_nn_embedding_lookups_are_grouped_like_bags() -> None:
    program = _capture(_FieldEmbeddings(), _fields_batch)
    out, stats, modified = _run(program, FORCED["group_embedding_bags"])
    assert modified and stats["tables_per_group"] == [4] and stats["embedding_lookups_grouped"] == 4
    ops = _ops(out)
    assert ops.count("codesign.grouped_embedding_bag.default") == 1
    assert ops.count("aten.embedding.default") == 1  # the 4-wide table stays a lookup of its own
    for counts in ([1], [4, 1, 3]):
        batch = _fields_batch(counts, 7)
        assert_outputs_close(out.run(batch), program.run(batch), REORDERED)


def test_grouping_is_measured_and_declined_where_it_is_slower_here() -> None:
    """DIN's request-level history tables group; on this CPU the gate times it and keeps it only if faster."""
    _, report = PassManager([EmbeddingGrouping()], HOST).run(tiny_program("din"))
    rec = report.passes[0]
    assert rec.measured_latency_before_s is not None and rec.measured_latency_after_s is not None
    assert rec.modified or (rec.skip is not None and rec.skip.kind is SkipKind.NO_MEASURED_GAIN)
    assert 0 <= rec.stats["measured_spread"] < 10  # the timings' spread is reported with the decision


def test_a_lone_lookup_is_left_alone() -> None:
    class _One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(30, 8)

        def forward(self, sparse: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
            return self.table(sparse[:, 0]).sum(1) + hist.sum(1)

    _, report = PassManager([EmbeddingGrouping()], HOST).run(_capture(_One(), _fields_batch))
    rec = report.passes[0]
    assert not rec.modified and rec.skip is not None and rec.skip.kind is SkipKind.NOT_APPLICABLE
    assert rec.skip.message == "no group of EmbeddingBag lookups to merge" and "min_group=2" in rec.skip.fix


# ---- Linear + activation epilogue -------------------------------------------------------------


def test_epilogue_fusion_only_where_asked() -> None:
    make = _batch_of(a=8, b=8, c=8)
    program = _capture(_Towers(), make)
    _, report = PassManager([LinearEpilogueFusion()], HOST).run(program)  # default: GPU targets only
    rec = report.passes[0]
    assert not rec.modified and rec.skip is not None and rec.skip.kind is SkipKind.DISABLED
    assert "cpu target" in rec.skip.message and "when='always'" in rec.skip.fix
    out, stats, modified = _run(program, FORCED["fuse_linear_epilogue"])
    assert modified and stats["linears_fused"] == 3
    assert "aten.relu.default" not in _ops(out)
    batch = make([2, 5], 1)  # type: ignore[operator]
    assert_outputs_close(out.run(batch), program.run(batch), REORDERED)


# ---- the fusion pipeline on every example ---------------------------------------------------------

# the request-sharing prefix of the pipeline with its gate open, so the input to fusion is the same
# on every machine
SHARED_PREFIX = [
    RequestSharing(RequestSharingConfig(require_predicted_gain=False)),
    CommonSubexpressionElimination(),
]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_fusion_pipeline_removes_kernels_from_every_example_and_keeps_its_scores(name: str) -> None:
    """Per-pass numerics are the conformance suite's; here the passes compose, after request sharing."""
    shared, _ = PassManager(SHARED_PREFIX, HOST).run(tiny_program(name))
    full, report = PassManager(list(FORCED.values()), HOST).run(shared)
    assert [r.name for r in report.passes] == list(FORCED)
    fused = [r for r in report.passes if r.modified]
    # every example has at least one pattern (lookups, shared inputs, towers or an epilogue)
    assert fused and count_kernels(full) < count_kernels(shared)
    # each pass's kernel counts are the program's, and each modifying pass removes kernels
    assert all(r.stats["kernels_after"] < r.stats["kernels_before"] for r in fused), [r.stats for r in fused]
    assert fused[0].stats["kernels_before"] == count_kernels(shared)
    assert fused[-1].stats["kernels_after"] == count_kernels(full)
    w = tiny_workload(name)
    for counts in ([1], [1, 5, 2], [1000, 24]):
        batch = w.make_batch(counts, 23)
        with torch.no_grad():
            assert_outputs_close(full.run(batch), w.model(**batch.inputs), REORDERED)


def test_examples_lose_kernels_where_their_pattern_is() -> None:
    expected = {
        "dlrm": "group_embedding_bags",
        "dcnv2": "group_embedding_bags",
        "multitask": "fuse_shared_input_linears",
    }
    for name, pass_name in expected.items():
        program = tiny_program(name)
        if name == "multitask":  # MMoE experts and gates read the same features
            program, _ = PassManager(SHARED_PREFIX, HOST).run(program)
        _, stats, modified = _run(program, FORCED[pass_name])
        assert modified and stats["kernels_after"] < stats["kernels_before"], (name, stats)  # type: ignore[operator]


def test_the_pipeline_runs_every_registered_pass_once_in_its_documented_order() -> None:
    passes = all_passes()
    names = [p.name for p in passes]
    # each registered pass once, but CSE twice: after request sharing, and in the final cleanup
    assert Counter(names) == Counter(pass_names()) + Counter(["cse"])
    order = {n: i for i, n in enumerate(names)}
    # request sharing first and CSE right after it (it merges the duplicates sharing leaves); sharding plans
    # before grouping (which then keeps sharded tables apart); fusion in its order; cleanup last
    assert names[:2] == ["request_sharing", "cse"]
    assert order["selective_fp8"] < order["shard_embeddings"] < order["group_embedding_bags"]
    assert names[-len(fusion_passes()) - 3 : -3] == [p.name for p in fusion_passes()] == list(FORCED)
    assert names[-3:] == [p.name for p in generic_passes()]
    assert [p.name for p in default_passes()] == [p.name for p in passes if p.enabled_by_default]
    assert "selective_fp8" not in [p.name for p in default_passes()]
    # it runs: on a two-device FP8 target every pass is available, and the report follows the order
    _, report = PassManager(passes, get_target("h100", 2), verify=False).run(tiny_program("din"))
    assert [r.name for r in report.passes] == names
    assert not any(r.skip is not None and r.skip.kind is SkipKind.UNAVAILABLE for r in report.passes)
