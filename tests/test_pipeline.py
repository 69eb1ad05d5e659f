"""PassManager and generic passes: crafted Before/Expected graphs plus every example model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.config import Config, register_config
from codesign.errors import ConfigError, NumericsError, PassError
from codesign.hardware.target import Target, get_target
from codesign.ir.program import Program
from codesign.passes import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    generic_passes,
    pass_by_name,
)
from codesign.passes.cleanup import ConstantFoldingConfig
from codesign.passes.manager import Pass, PassManager, PassResult
from codesign.passes.testing import check_pass_on_program
from tests.conftest import tiny_program

HOST = get_target("h100")  # passes plan for a target; numerics are checked on this CPU either way


def _capture(model: torch.nn.Module, arg: str = "x") -> Program:
    batch = RequestBatch({arg: torch.randn(5, 4)}, offsets_from_counts([2, 3]))
    return codesign.capture(model, batch, RequestSpec())


def _ops(program: Program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


class _Duplicated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))
        self.unused = torch.nn.Parameter(torch.randn(1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x @ (self.w * 2).t())
        b = torch.relu(x @ (self.w * 2).t())  # same work twice
        _ = x.sum()  # dead
        return a + b


class _Expected(torch.nn.Module):
    def __init__(self, folded: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("folded", folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x @ self.folded)
        return a + a


def test_generic_passes_turn_before_into_expected() -> None:
    before = _Duplicated()
    program = _capture(before)
    out, report = PassManager(generic_passes(), HOST).run(program)
    stats = {r.name: r.stats for r in report.passes}
    assert stats["cse"]["nodes_merged"] >= 4  # mul, t, matmul, relu (and the shared weight read)
    assert stats["constant_folding"]["nodes_folded"] == 2  # w * 2, then .t()
    assert stats["dce"]["nodes_removed"] >= 1 and stats["dce"]["params_removed"] == 1
    expected = _capture(_Expected((before.w * 2).t().detach()))
    assert _ops(out) == _ops(expected)
    batch = program.sample_batch([3, 1], seed=5)
    torch.testing.assert_close(out.run(batch), before(**batch.inputs), rtol=1e-5, atol=1e-6)


def test_unmatched_graph_is_untouched() -> None:
    program = _capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), arg="input")
    out, report = PassManager(generic_passes(), HOST).run(program)
    assert not any(r.modified for r in report.passes)
    assert out.graph_module.code == program.graph_module.code


class _Growing(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.b * 2) + self.b.repeat(8).reshape(8, 4).sum(0)


def test_folding_respects_the_growth_limit() -> None:
    program = _capture(_Growing())
    _, report = PassManager([ConstantFolding()], HOST).run(program)
    stats = report.passes[0].stats
    assert stats["nodes_folded"] == 1 and stats["folds_refused_for_growth"] == 1  # b*2 folds, repeat(8) not
    out, report = PassManager([ConstantFolding(ConstantFoldingConfig(max_growth=16.0))], HOST).run(program)
    assert report.passes[0].stats["folds_refused_for_growth"] == 0
    assert "aten.repeat" not in out.graph_module.code and "aten.sum" not in out.graph_module.code


@register_config
@dataclasses.dataclass(frozen=True)
class _BreakConfig(Config):
    scale: float = 1.5


class _BreakOutputs(Pass):
    """Deliberately wrong pass: scales the first matmul by ``scale``."""

    name = "break_outputs"
    config_class = _BreakConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        for node in program.graph.nodes:
            if node.op == "call_function" and "linear" in str(node.target):
                with program.graph.inserting_after(node):
                    scaled = program.graph.call_function(torch.ops.aten.mul.Tensor, (node, self.config.scale))  # type: ignore[attr-defined]
                scaled.meta = dict(node.meta)
                node.replace_all_uses_with(scaled, delete_user_cb=lambda u, s=scaled: u is not s)  # type: ignore[misc]
                return PassResult(program, True)
        return PassResult(program, False)


class _Crash(Pass):
    name = "crash"
    config_class = _BreakConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        raise RuntimeError("boom")


def test_numerics_failure_names_the_pass_and_what_ran_before() -> None:
    program = tiny_program("multitask")
    with pytest.raises(NumericsError, match=r"'break_outputs' \(after \['cse'\]\).*max abs error"):
        PassManager([CommonSubexpressionElimination(), _BreakOutputs()], HOST).run(program)
    with pytest.raises(PassError, match=r"pass 'crash' failed after \['dce'\]: RuntimeError: boom"):
        PassManager([DeadCodeElimination(), _Crash()], HOST).run(program)
    # verification off: the same broken pass goes through (the manager is what catches it)
    PassManager([_BreakOutputs()], HOST, verify=False).run(program)


def test_knobs_are_typed_and_checked() -> None:
    (knob,) = ConstantFolding.knobs()
    assert (knob.name, knob.kind, knob.low, knob.high) == ("max_growth", "float", 0.0, 16.0)
    with pytest.raises(ConfigError, match="max_growth=-1"):
        ConstantFolding(ConstantFoldingConfig(max_growth=-1.0))
    with pytest.raises(ConfigError, match="takes a ConstantFoldingConfig"):
        ConstantFolding(_BreakConfig())  # type: ignore[arg-type]
    with pytest.raises(PassError, match="unknown pass 'fuse_all'"):
        pass_by_name("fuse_all")
    a, b = ConstantFolding(), ConstantFolding(ConstantFoldingConfig(max_growth=2.0))
    assert a.uuid() == ConstantFolding().uuid() != b.uuid()


def test_every_example_passes_the_generic_passes_with_verified_numerics(example_name: str) -> None:
    program = tiny_program(example_name)
    out = check_pass_on_program(program, generic_passes(), HOST)
    assert out.op_count() <= program.op_count()
    assert program.op_count() == tiny_program(example_name).op_count()  # the input program is not mutated
