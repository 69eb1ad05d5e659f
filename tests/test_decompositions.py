"""codesign's ops in aten form for Inductor: the same numbers as the ops, traceable without graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import codesign
from codesign.backends.inductor import InductorBackend, InductorConfig
from codesign.numerics import Tolerance, compare_outputs
from codesign.ops import quantize_table
from codesign.ops.decompositions import DECOMPOSITIONS, OPAQUE, decompose, decompose_exported, opaque_nodes
from codesign.passes import default_passes
from tests.conftest import tiny_program, tiny_workload
from tests.test_ops import _tables

OPS = torch.ops.codesign
STARTS = [0, 7, 8, 20]
EXACT_ENOUGH = Tolerance(rtol=1e-5, atol=1e-5)


def _registered_ops() -> set[torch._ops.OpOverload]:
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("codesign::")]
    return {getattr(OPS, n.split(".")[0]).default for n in names}


def test_every_codesign_op_is_decomposed_or_says_why_not() -> None:
    ops = _registered_ops()
    assert len(ops) >= 7
    assert not set(DECOMPOSITIONS) & set(OPAQUE)
    assert ops == set(DECOMPOSITIONS) | set(OPAQUE)


def _op_calls() -> list[tuple[torch._ops.OpOverload, tuple[object, ...]]]:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    row, row_index = torch.randn(3, 5, generator=g), torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 2])
    tables, ids, offsets = _tables()
    q, scale = quantize_table(torch.cat(tables), "fp8")
    flat_ids = torch.cat(ids)
    return [
        (OPS.broadcast_linear.default, (x, w, b, row, row_index, "relu")),
        (OPS.broadcast_linear.default, (x, w, None, row, row_index, "none")),
        (OPS.fused_linear.default, (x, w, b, "gelu")),
        *[
            (OPS.grouped_embedding_bag.default, (torch.cat(tables), ids, offsets, STARTS, m))
            for m in (0, 1, 2)
        ],
        (OPS.quantized_embedding.default, (q, scale, flat_ids.view(-1, 1), torch.float32)),
        *[
            (
                OPS.quantized_embedding_bag.default,
                (q, scale, flat_ids, torch.tensor([0, 2, 2, 9]), m, torch.float32),
            )
            for m in (0, 1, 2)
        ],
    ]


@pytest.mark.parametrize("index", range(10))
def test_aten_form_gives_the_ops_numbers(index: int) -> None:
    op, args = _op_calls()[index]
    torch.testing.assert_close(DECOMPOSITIONS[op](*args), op(*args), rtol=0, atol=0)


def test_grouped_form_checks_each_tables_rows() -> None:
    tables, ids, offsets = _tables()
    ids[0] = ids[0].clone()
    ids[0][0] = 7  # table 0 has 7 rows: id 7 is row 0 of table 1 in the joint weight
    with pytest.raises(RuntimeError, match="out of range for table 0"):
        DECOMPOSITIONS[OPS.grouped_embedding_bag.default](torch.cat(tables), ids, offsets, STARTS, 0)


class _AllOps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tables, _, _ = _tables()
        self.weight = torch.nn.Parameter(torch.cat(tables))
        self.w = torch.nn.Parameter(torch.randn(4, 4))
        q, scale = quantize_table(torch.cat(tables), "fp8")
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(
        self, x: torch.Tensor, row: torch.Tensor, idx: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        h = OPS.broadcast_linear.default(x, self.w, None, row, idx, "relu")
        h = OPS.fused_linear.default(h, self.w, None, "tanh")
        pooled = OPS.grouped_embedding_bag.default(self.weight, [ids, ids], [offsets, offsets], [0, 7, 14], 0)
        looked = OPS.quantized_embedding_bag.default(self.q, self.scale, ids, offsets, 1, torch.float32)
        return h.sum(-1) + pooled[: h.shape[0], 0] + pooled[h.shape[0] :, 1] + looked[:, 2]


def test_decomposed_graph_traces_whole_with_dynamic_sizes() -> None:
    model = _AllOps()
    gm = torch.fx.symbolic_trace(model)
    assert decompose(gm) == 4
    assert opaque_nodes(gm) == []
    # fullgraph: a host sync (.tolist(), int(tensor)) in an aten form is a graph break and fails here
    compiled = torch.compile(gm, backend="eager", fullgraph=True, dynamic=True)
    for n in (5, 11):
        inputs = (
            torch.randn(n, 4),
            torch.randn(2, 4),
            torch.randint(0, 2, (n,)),
            torch.randint(0, 7, (3 * n,)),
            torch.arange(0, 3 * n, 3),
        )
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-6, atol=1e-6)


def _forced_sharing_program() -> codesign.Program:
    """dlrm tiny after the default passes, each kept whatever it measures: broadcast_linear, grouped lookups."""
    passes = [p.ungated() for p in default_passes()]
    program = codesign.compile(tiny_program("dlrm"), backend="eager", passes=passes).program
    assert program is not None
    assert any(n.target == OPS.broadcast_linear.default for n in program.graph_module.graph.nodes)
    return program


# exports and decomposes every example (15 s): `make test-slow`
@pytest.mark.slow
def test_exported_program_decomposes_with_one_request_kept_dynamic() -> None:
    program = _forced_sharing_program()
    exported = decompose_exported(program.export())
    assert not [n for n in exported.graph.nodes if getattr(n.target, "namespace", None) == "codesign"]
    w = tiny_workload("dlrm")
    for counts in ([1], [3, 1, 6]):  # one request: the re-trace must not specialize R away from 1
        batch = w.make_batch(counts, 4)
        with torch.no_grad():
            got = exported.module()(**program.call_inputs(batch))
        ok, err, _ = compare_outputs(got, w.model(**batch.inputs), EXACT_ENOUGH)
        assert ok, err


def _codesign_kernels_called(variant: codesign.Variant, batch: codesign.RequestBatch) -> set[str]:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        variant.score(batch)
    return {e.name for e in prof.events() if e.name.startswith("codesign::")}


@pytest.mark.slow  # two torch.compile runs with Inductor (~40 s on 2 cores)
def test_inductor_compiles_the_ops_itself_and_leaves_the_program_alone() -> None:
    program = _forced_sharing_program()
    w = tiny_workload("dlrm")
    batch = w.make_batch([4, 1, 9], 2)
    called = {}
    for decomposed in (True, False):
        backend = InductorBackend(InductorConfig(decompose_ops=decomposed))
        variant = codesign.compile(program, backend=backend, passes=[])
        ok, err, _ = compare_outputs(variant.score(batch), w.model(**batch.inputs), EXACT_ENOUGH)
        assert ok, err
        called[decomposed] = _codesign_kernels_called(variant, batch)
    assert called == {True: set(), False: {"codesign::broadcast_linear", "codesign::grouped_embedding_bag"}}
    assert any(n.target == OPS.broadcast_linear.default for n in program.graph_module.graph.nodes)
