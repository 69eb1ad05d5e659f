"""The op-cost registry (``codesign.analysis.costs``): textbook formulas, custom-op registration, the default.

Small graphs are captured from tiny modules so every expected number can be worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

import codesign
import codesign.ops  # registers the custom ops and their costs
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.analysis import (
    FLOPS_PER_ELEMENT,
    ConcreteShapes,
    NodeCost,
    OpCost,
    analyze,
    io_bytes,
    register_cost,
    registered_cost,
)
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import get_target
from codesign.ir.program import Program

ROWS, REQUESTS = 10, 2  # candidate rows the graphs are analyzed at
F32 = 4  # bytes per float32
I64 = 8  # bytes per int64 id or offset


@torch.library.custom_op("codesign_test::priced", mutates_args=())
def _priced(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w.sum()


@_priced.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("codesign_test::unpriced", mutates_args=())
def _unpriced(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w.sum()


@_unpriced.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@register_cost(torch.ops.codesign_test.priced.default)
def _priced_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """Deliberately odd numbers (7 FLOPs per element, 3 kernels) so the default cannot match them."""
    return OpCost(7 * shapes.total_numel(node), io_bytes(node, shapes), 123, engine="matmul", kernels=3)


class _Textbook(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)
        self.w = torch.nn.Parameter(torch.randn(6, 5))
        self.b = torch.nn.Parameter(torch.randn(5))
        self.bag = torch.nn.EmbeddingBag(20, 8, mode="sum")

    def forward(self, x: torch.Tensor, seq: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            self.fc(x),
            torch.mm(x, self.w),
            torch.addmm(self.b, x, self.w),
            torch.bmm(seq, seq.transpose(1, 2)),
            self.bag(ids),
        )


class _CustomOps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.codesign_test.priced(x, self.w), torch.ops.codesign_test.unpriced(x, self.w)


def _capture(model: torch.nn.Module, **inputs: torch.Tensor) -> Program:
    batch = RequestBatch(inputs=inputs, offsets=offsets_from_counts([3, 2]))
    return codesign.capture(model, batch, RequestSpec())


def _by_op(program: Program) -> dict[str, NodeCost]:
    return {n.op: n for n in analyze(program, ROWS, REQUESTS).nodes}


_textbook: dict[str, NodeCost] = {}


def _textbook_costs() -> dict[str, NodeCost]:
    if not _textbook:
        n = 5
        program = _capture(
            _Textbook(), x=torch.randn(n, 6), seq=torch.randn(n, 2, 3), ids=torch.randint(0, 20, (n, 3))
        )
        _textbook.update(_by_op(program))
    return _textbook


def test_linear_is_a_gemm_plus_a_bias_add() -> None:
    c = _textbook_costs()["linear.default"]
    assert c.flops == 2 * ROWS * 6 * 4 + ROWS * 4
    assert c.bytes == (ROWS * 6 + 4 * 6 + 4 + ROWS * 4) * F32  # x, weight, bias read; output written
    assert c.param_bytes == (4 * 6 + 4) * F32
    assert c.engine == "matmul"


def test_mm_is_two_flops_per_multiply_add() -> None:
    c = _textbook_costs()["mm.default"]
    assert c.flops == 2 * ROWS * 6 * 5
    assert c.bytes == (ROWS * 6 + 6 * 5 + ROWS * 5) * F32
    assert c.engine == "matmul"


def test_addmm_adds_one_flop_per_output() -> None:
    c = _textbook_costs()["addmm.default"]
    assert c.flops == 2 * ROWS * 6 * 5 + ROWS * 5
    assert c.bytes == (5 + ROWS * 6 + 6 * 5 + ROWS * 5) * F32


def test_bmm_is_a_gemm_per_batch_entry() -> None:
    c = _textbook_costs()["bmm.default"]
    assert c.flops == 2 * ROWS * (2 * 3 * 2)  # ROWS products of [2, 3] x [3, 2]
    assert c.bytes == (2 * ROWS * 2 * 3 + ROWS * 2 * 2) * F32


def test_embedding_bag_is_one_add_per_looked_up_value() -> None:
    c = _textbook_costs()["embedding_bag.padding_idx"]
    looked_up = ROWS * 3 * 8  # ROWS bags of 3 ids, rows of width 8
    assert c.flops == looked_up
    # ids and offsets read, every looked-up row read, the bag sums written
    assert c.bytes == ROWS * 3 * I64 + ROWS * I64 + looked_up * F32 + ROWS * 8 * F32
    assert c.param_bytes == 0  # a lookup reads rows of the table, not the whole table
    assert c.engine == "vector"


_custom: dict[str, NodeCost] = {}


def _custom_costs() -> dict[str, NodeCost]:
    if not _custom:
        _custom.update(_by_op(_capture(_CustomOps(), x=torch.randn(5, 3))))
    return _custom


def test_a_custom_op_is_priced_by_its_registered_formula() -> None:
    c = _custom_costs()["priced.default"]
    assert (c.flops, c.param_bytes, c.engine, c.kernels) == (7 * ROWS * 3, 123, "matmul", 3)
    assert c.bytes == (ROWS * 3 + 3 + ROWS * 3) * F32


def test_the_cost_model_reads_the_registered_engine_and_launches() -> None:
    h100 = get_target("h100")
    analysis = analyze(_capture(_CustomOps(), x=torch.randn(5, 3)), ROWS, REQUESTS)
    ops = {o.op: o for o in estimate_analysis(analysis, h100).ops}
    assert ops["priced.default"].rate_dtype == "fp32"  # matmul engine: the tensor rate of its dtype
    assert ops["priced.default"].launch_s == 3 * h100.hardware.launch_overhead_s
    assert ops["unpriced.default"].rate_dtype == "vector"


def test_an_unregistered_op_falls_back_to_the_elementwise_default() -> None:
    assert registered_cost(torch.ops.codesign_test.unpriced.default) is None
    assert torch.ops.codesign_test.unpriced.default not in FLOPS_PER_ELEMENT
    c = _custom_costs()["unpriced.default"]
    assert c.flops == ROWS * 3  # one FLOP per output element
    assert c.bytes == (ROWS * 3 + 3 + ROWS * 3) * F32  # inputs read once, output written once
    assert c.param_bytes == 3 * F32  # the parameter it reads whole
    assert (c.engine, c.kernels, c.is_view) == ("vector", 1, False)


def test_every_codesign_op_registers_a_cost() -> None:
    names = sorted(
        n.removeprefix("codesign::")
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("codesign::")
    )
    assert len(names) >= 6  # broadcast/fused/fp8 linear, grouped bag, quantized embedding and bag
    missing = [n for n in names if registered_cost(getattr(torch.ops.codesign, n).default) is None]
    assert missing == []


def test_one_op_has_one_formula() -> None:
    op = torch.ops.codesign_test.priced.default

    def other(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
        return OpCost(0, 0)

    with pytest.raises(ValueError, match="already registered"):
        register_cost(op, other)
    assert registered_cost(op) is _priced_cost
    register_cost(op, _priced_cost)  # registering the same formula again (a module reload) is fine
    assert registered_cost(op) is _priced_cost
