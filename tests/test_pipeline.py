"""PassManager and generic passes: crafted Before/Expected graphs plus every example model."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from typing import Any

import pytest
import torch

import codesign
from codesign import RequestBatch, RequestSpec, offsets_from_counts
from codesign.backends import backend_class, backend_names
from codesign.config import Config, Knob, register_config
from codesign.errors import ConfigError, NumericsError, PassError
from codesign.hardware.target import Target, get_target
from codesign.hardware.tunable import Tunable
from codesign.ir.program import Program
from codesign.numerics import EXACT
from codesign.passes import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    generic_passes,
    pass_by_name,
    pass_names,
)
from codesign.passes.cleanup import ConstantFoldingConfig
from codesign.passes.manager import Pass, PassManager, PassResult, SkipKind
from codesign.passes.testing import assert_outputs_close
from tests.conftest import tiny_program, tiny_workload
from tests.search_passes import GpuOnlyPass

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


def test_pass_configs_are_typed_and_checked() -> None:
    with pytest.raises(ConfigError, match="takes a ConstantFoldingConfig"):
        ConstantFolding(_BreakConfig())  # type: ignore[arg-type]
    with pytest.raises(PassError, match="unknown pass 'fuse_all'"):
        pass_by_name("fuse_all")
    a, b = ConstantFolding(), ConstantFolding(ConstantFoldingConfig(max_growth=2.0))
    assert a.uuid() == ConstantFolding().uuid() != b.uuid()


# ---- knobs: declared once, on the config field ---------------------------------------------------

_KINDS = {bool: "bool", int: "int", float: "float"}


def _tunables() -> list[type[Tunable[Any]]]:
    return [pass_by_name(n) for n in pass_names()] + [backend_class(n) for n in backend_names()]


def _declared(config_class: type[Config]) -> list[tuple[Any, ...]]:
    """What the config's fields declare with ``knob(...)``, read from the dataclass fields themselves."""
    hints = typing.get_type_hints(config_class)
    out = []
    for f in dataclasses.fields(config_class):
        spec = f.metadata.get("knob")
        if spec is not None:
            kind = "categorical" if spec.choices else _KINDS[hints[f.name]]
            out.append(
                (
                    f.name,
                    kind,
                    f.default,
                    spec.low,
                    spec.high,
                    spec.choices,
                    spec.log,
                    spec.help,
                    spec.step,
                    spec.when,
                )
            )
    return out


def _as_tuple(k: Knob) -> tuple[Any, ...]:
    return (k.name, k.kind, k.default, k.low, k.high, k.choices, k.log, k.doc, k.step, k.when)


def _invalid(k: Knob) -> Any:
    """A value outside the knob's declared kind or range."""
    if k.kind in ("int", "float") and k.high is not None:
        return int(k.high) + 1 if k.kind == "int" else float(k.high) * 2 + 1
    if k.kind in ("int", "float") and k.low is not None:
        return int(k.low) - 1 if k.kind == "int" else float(k.low) - 1
    return "not-a-valid-value"  # wrong type for int/float/bool, not a choice for categorical


@pytest.mark.parametrize("cls", _tunables(), ids=lambda c: c.name)
def test_knobs_are_what_the_config_fields_declare(cls: type[Tunable[Any]]) -> None:
    # declared once: neither the pass/backend nor its config redefines knobs()
    assert all("knobs" not in vars(c) for c in cls.__mro__ if c is not Tunable), cls
    assert all("knobs" not in vars(c) for c in cls.config_class.__mro__ if c is not Config)
    declared = _declared(cls.config_class)
    assert [_as_tuple(k) for k in cls.knobs()] == declared
    assert all(k.doc.strip() for k in cls.knobs()), "every knob has help text (docs, CLI)"
    cls.config_class()  # the defaults are valid


@pytest.mark.parametrize(
    ("cls", "knob_name"),
    [(c, k.name) for c in _tunables() for k in c.knobs()],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_a_config_refuses_a_knob_value_outside_its_declaration(
    cls: type[Tunable[Any]], knob_name: str
) -> None:
    k = next(k for k in cls.knobs() if k.name == knob_name)
    bad = _invalid(k)
    with pytest.raises(
        ConfigError, match=rf"knob {knob_name}={re.escape(repr(bad))} is not a valid {k.kind}"
    ):
        cls.config_class(**{knob_name: bad})


def test_there_are_knobs_of_every_kind() -> None:
    kinds = {k.kind for c in _tunables() for k in c.knobs()}
    assert kinds == {"int", "float", "bool", "categorical"}


# ---- the manager: names, availability ------------------------------------------------------------


def test_passes_are_given_by_name_class_or_object() -> None:
    manager = PassManager(["cse", ConstantFolding, DeadCodeElimination()], HOST)
    assert [type(p) for p in manager.passes] == [
        CommonSubexpressionElimination,
        ConstantFolding,
        DeadCodeElimination,
    ]
    _, report = manager.run(_capture(_Duplicated()))
    assert [r.name for r in report.passes] == ["cse", "constant_folding", "dce"]
    assert all(r.modified for r in report.passes)
    assert [type(pass_by_name(n)()).name for n in pass_names()] == pass_names()


def test_an_unknown_name_or_a_non_pass_is_refused_with_the_valid_names() -> None:
    with pytest.raises(PassError, match="unknown pass 'nope'") as err:
        PassManager(["cse", "nope"], HOST)
    assert all(f"'{n}'" in str(err.value) for n in pass_names()), str(err.value)
    with pytest.raises(PassError, match=r"passes\[1\] is a int \(3\), not a pass") as err:
        PassManager(["cse", 3], HOST)  # type: ignore[list-item]
    assert all(f"'{n}'" in str(err.value) for n in pass_names()), str(err.value)
    with pytest.raises(PassError, match="not a pass"):
        PassManager([torch.nn.ReLU], HOST)  # type: ignore[list-item]


class _NeedsGpu(GpuOnlyPass):
    """Unavailable on CPU targets (as GpuOnlyPass); its rewrite must never run there."""

    name = "needs_gpu"

    def apply(self, program: Program, target: Target) -> PassResult:
        raise RuntimeError("apply ran on a target the pass cannot serve")


def test_an_unavailable_pass_is_skipped_with_a_typed_reason_and_never_applied() -> None:
    program = _capture(_Duplicated())
    _, report = PassManager([_NeedsGpu(), "cse"], get_target("host")).run(program)
    skipped, cse = report.passes
    assert not skipped.modified and skipped.skip is not None
    assert skipped.skip.kind is SkipKind.UNAVAILABLE
    assert skipped.skip.message == "needs a GPU, host is a cpu" and "needs_gpu" in skipped.skip.fix
    assert skipped.to_dict()["skip"]["kind"] == "unavailable"
    assert cse.modified  # the pipeline goes on after a skip
    with pytest.raises(PassError, match="apply ran on a target the pass cannot serve"):
        PassManager([_NeedsGpu()], HOST).run(program)  # h100: available, so applied


def test_every_unmodified_record_says_why() -> None:
    program = _capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), arg="input")
    _, report = PassManager(generic_passes(), HOST).run(program)
    kinds = [(r.modified, r.skip.kind if r.skip else None) for r in report.passes]
    assert kinds == [(False, SkipKind.NOT_APPLICABLE)] * 3


# ---- the generic pipeline on every example ------------------------------------------------------


def test_every_example_keeps_its_scores_through_the_generic_pipeline(example_name: str) -> None:
    program = tiny_program(example_name)
    code, graph, ops = program.graph_module.code, str(program.graph), program.op_count()
    metadata = copy.deepcopy(program.metadata)
    params = {k: v.clone() for k, v in program.graph_module.state_dict().items()}
    out, report = PassManager(generic_passes(), HOST).run(program)
    out.verify()
    # each pass starts where the one before it ended
    assert report.passes[0].ops_before == ops and report.passes[-1].ops_after == out.op_count() <= ops
    assert all(a.ops_after == b.ops_before for a, b in zip(report.passes, report.passes[1:], strict=False))
    w = tiny_workload(example_name)
    for i, counts in enumerate(([1], [3, 8, 1], [512, 512])):
        batch = w.make_batch(counts, 9000 + i)
        with torch.no_grad():
            assert_outputs_close(out.run(batch), w.model(**batch.inputs), EXACT)
    # the input program is not changed by the pipeline
    assert program.graph_module.code == code and str(program.graph) == graph and program.op_count() == ops
    assert program.metadata == metadata
    now = program.graph_module.state_dict()
    assert now.keys() == params.keys() and all(torch.equal(now[k], v) for k, v in params.items())
