"""The eager backend calls aten ops through torch's Python bindings (codesign.backends.bindings)."""

from __future__ import annotations

import pytest
import torch

import codesign
from codesign.backends import bindings
from codesign.backends.bindings import lean_graph_module, python_binding
from codesign.backends.entry import FastEntry
from codesign.numerics import EXACT, compare_outputs
from tests.zoo import ZOO, captured

aten = torch.ops.aten


def test_bindings_are_the_generated_ones_with_the_same_arguments() -> None:
    assert python_binding(aten.add.Tensor) is torch.add
    assert python_binding(aten.linear.default) is torch._C._nn.linear
    assert python_binding(aten.view.default) is torch.Tensor.view
    # torch.tensordot is a Python wrapper with another signature; x.index does not exist
    assert python_binding(aten.tensordot.default) is None
    assert python_binding(aten.index.Tensor) is None
    # Tensor methods written in Python (torch/_tensor.py) return or take other things than the aten op
    assert python_binding(aten.unique_consecutive.default) is None
    assert python_binding(aten.split.Tensor) is None
    assert python_binding(aten.stft.default) is None
    assert python_binding(torch.ops.codesign.fused_linear.default) is None


def _aten_calls(module: torch.fx.GraphModule) -> int:
    return sum(isinstance(n.target, torch._ops.OpOverload) for n in module.graph.nodes)


def test_lean_graph_module_gives_identical_outputs_with_bindings() -> None:
    program = captured("pnn")
    batch = ZOO["pnn"]().make_batch([3, 1, 9], 5)
    lean = lean_graph_module(program.graph_module, [program.call_inputs(program.example)])
    assert _aten_calls(lean) < _aten_calls(program.graph_module) / 2
    # the exported module's input checks are hooks: the rebound module keeps them
    assert len(lean._forward_pre_hooks) == len(program.graph_module._forward_pre_hooks) > 0
    with torch.no_grad():
        ok, err, _ = compare_outputs(lean(**batch.inputs), program.run(batch), EXACT)
    assert ok, err


def test_a_binding_that_changes_outputs_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    program = captured("fm")
    monkeypatch.setattr(bindings, "python_binding", lambda op: torch.sub if op is aten.add.Tensor else None)
    kept = lean_graph_module(program.graph_module, [program.call_inputs(program.example)])
    assert kept is program.graph_module


def test_eager_bundles_run_the_lean_graph(tmp_path: object) -> None:
    variant = codesign.compile(captured("pnn"), passes=[], backend="eager")
    loaded = codesign.load(variant.save(tmp_path / "pnn", verify="in_process"))  # type: ignore[operator]
    plain = _aten_calls(captured("pnn").graph_module)
    for runner in (variant.runner, loaded.runner):
        assert isinstance(runner, FastEntry)  # past nn.Module's hook loop, its flatten and guards
        assert _aten_calls(runner.module) < plain / 2


def test_input_structure_is_checked_once_per_structure_and_always_refused_when_wrong() -> None:
    program = captured("dcn_v2")
    inputs = program.call_inputs(program.example)
    lean = lean_graph_module(program.graph_module, [inputs])
    checks = [h for h in lean._forward_pre_hooks.values() if isinstance(h, bindings.StructureCheck)]
    assert len(checks) == 1  # torch's per-call pytree check is replaced, its other hooks kept
    assert len(lean._forward_pre_hooks) == len(program.graph_module._forward_pre_hooks)
    (name, value), *_ = inputs.items()
    assert isinstance(value, dict)  # the zoo's dcn_v2 takes one dict of features
    missing = {name: {k: v for k, v in list(value.items())[1:]}}
    with torch.no_grad():
        lean(**inputs)
        lean(**inputs)  # the same structure: checked once
        assert len(checks[0]._seen) == 1
        for _ in range(2):  # a structure that failed is never remembered as good
            with pytest.raises(ValueError, match="exported input tree spec"):
                lean(**missing)
        with pytest.raises(ValueError, match="keyword mismatch"):
            lean(**inputs, extra=torch.zeros(1))
