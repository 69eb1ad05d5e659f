"""Cleanup passes on graphs that are not functional: folding and merging never cross an in-place write.

A captured graph keeps the model's in-place ops: ``torch.tensor([...])`` in a forward exports as
``detach_(lift_fresh_copy(constant))``, and models write into fresh tensors (``add_``, ``t_``,
``masked_fill_``) or into buffers through views. Folding such a value turned a tensor made fresh on
every call into one buffer each call wrote again (scores drifted from call to call), and left
``detach_`` on a folded constant, which torch refuses once the bundle's weights are reloaded as views
("Can't detach views in-place": an eager bundle of a reference-style DLRM crashed on its first score,
an inductor one failed to compile in the fresh process).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import codesign
from codesign.hardware.target import get_target
from codesign.ir.program import Program
from codesign.ir.request import offsets_from_counts
from codesign.passes.cleanup import CommonSubexpressionElimination, ConstantFolding

# Folding evaluates the same fp32 ops once at compile time: results are bit-identical.
SAME = {"rtol": 0.0, "atol": 0.0}


class InPlaceIdioms(nn.Module):
    """Idioms that export as in-place ops on constants, or on views of buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("mask", torch.tensor([True, False, True, False]))
        self.register_buffer("cap", torch.tensor([[1.0, 3.0], [0.5, 2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        li = torch.tensor([0, 2, 3])  # an index built in forward: lift_fresh_copy + detach_
        bias = torch.tensor([1.0, 2.0, 3.0, 4.0]).add_(1.0)  # a fresh constant written in place
        wt = self.weight.detach().clone()
        wt.t_()  # a copy transposed in place
        m = torch.ones(4).masked_fill_(self.mask, 0.5)
        self.cap.view(-1).clamp_(max=1.0)  # a buffer written through a view, then read
        y = (x @ wt + bias) * m * self.cap.sum()
        return y[:, li]


def _program(model: nn.Module, width: int = 4) -> Program:
    batch = codesign.RequestBatch(
        {"x": torch.randn(6, width, generator=torch.Generator().manual_seed(1))},
        offsets_from_counts(torch.tensor([2, 4])),
    )
    return codesign.capture(model.eval(), batch, codesign.RequestSpec())


def _writes(program: Program) -> list[tuple[str, str]]:
    """(op, what it writes) for every in-place op of the graph."""
    out = []
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            arg = node.args[0]
            written = str(arg.target) if arg.op == "get_attr" else arg.op
            out.append((str(node.target), written))
    return out


def test_folding_never_folds_a_value_the_graph_writes_in_place() -> None:
    program = _program(InPlaceIdioms())
    reference = copy.deepcopy(program)
    result = ConstantFolding().apply(program, get_target("host"))
    program.recompile()
    stats = result.stats
    assert stats["nodes_folded"] >= 1  # the index tensor (and the detached weight) folded...
    assert stats["detaches_dropped"] == 1  # ...with torch.tensor's detach_ (bias's stays: it is written)
    assert stats["folds_refused_for_writes"] >= 2  # bias before add_, the weight copy before t_
    # nothing writes a folded constant (a buffer every call would share)
    assert not [w for w in _writes(program) if w[1].startswith("_folded")], _writes(program)
    assert ("aten.clamp_.default", "call_function") in _writes(program)  # the buffer's view is not folded
    batch = program.example
    for call in range(3):  # a value folded through a write would drift from call to call
        torch.testing.assert_close(program.run(batch), reference.run(batch), **SAME, msg=f"call {call}")


class _TwoCopies(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.clone(), x.clone()
        a.add_(1.0)
        return a + b  # 2x + 1: b must stay its own tensor


def test_cse_does_not_merge_a_tensor_that_is_written_later() -> None:
    program = _program(_TwoCopies())
    reference = copy.deepcopy(program)
    CommonSubexpressionElimination().apply(program, get_target("host"))
    program.recompile()
    clones = [n for n in program.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 2
    torch.testing.assert_close(program.run(program.example), reference.run(program.example), **SAME)


class ReferenceStyleDLRM(nn.Module):
    """DLRM as its reference code writes the interaction: index tensors built in forward."""

    def __init__(self, rows: tuple[int, ...] = (50, 60, 70), dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb_l = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum") for n in rows)
        self.bot_l = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, dim), nn.ReLU())
        ni = len(rows) + 1
        self.top_l = nn.Sequential(nn.Linear(dim + ni * (ni - 1) // 2, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(
        self, dense_x: torch.Tensor, ls_o: list[torch.Tensor], ls_i: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self.bot_l(dense_x)
        ly = [emb(i, o) for emb, i, o in zip(self.emb_l, ls_i, ls_o, strict=True)]
        batch_size, d = x.shape
        t = torch.cat([x, *ly], dim=1).view((batch_size, -1, d))
        z = torch.bmm(t, torch.transpose(t, 1, 2))
        _, ni, nj = z.shape
        li = torch.tensor([i for i in range(ni) for j in range(i)])
        lj = torch.tensor([j for i in range(nj) for j in range(i)])
        return torch.sigmoid(self.top_l(torch.cat([x, z[:, li, lj]], dim=1))).squeeze(-1)


def _reference_dlrm() -> codesign.Workload:
    model = ReferenceStyleDLRM()
    rows = [e.num_embeddings for e in model.emb_l]

    def make_batch(candidates: list[int], seed: int) -> codesign.RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        n = int(counts.sum())
        offsets, indices = [], []
        for r in rows:
            lengths = torch.randint(1, 3, (n,), generator=g)
            offsets.append(torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]]))
            indices.append(torch.randint(0, r, (int(lengths.sum()),), generator=g))
        return codesign.RequestBatch(
            {"dense_x": torch.rand(n, 5, generator=g), "ls_o": offsets, "ls_i": indices},
            offsets_from_counts(counts),
        )

    spec = codesign.RequestSpec(jagged={f"ls_i.{k}": f"ls_o.{k}" for k in range(len(rows))})
    return codesign.Workload("reference_dlrm", model, spec, make_batch)


def test_reference_style_dlrm_bundle_scores_after_reload(tmp_path: Path) -> None:
    workload = _reference_dlrm()
    variant = codesign.compile(workload, backend="eager")
    folding = next(r for r in (variant.report or {})["passes"] if r["name"] == "constant_folding")
    assert folding["stats"]["detaches_dropped"] == 2
    # torch.export.load gives back weights that are views, in this process too: the crash shows here
    loaded = codesign.load(variant.save(tmp_path / "dlrm", verify="in_process"))
    batch = workload.make_batch([3, 5], 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(batch), workload.model(**batch.inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_reference_style_dlrm_inductor_bundle_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    # the Inductor form of the same bug: Dynamo refused detach_ on a view while tracing the reload
    variant = codesign.compile(_reference_dlrm(), backend="inductor")
    assert codesign.load(variant.save(tmp_path / "dlrm")).check_reference()[0]  # default: fresh process
