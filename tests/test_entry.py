"""The eager backend's call path: generated input flattening, shape guards once per shape (backends.entry)."""

from __future__ import annotations

import pytest
import torch

import codesign
from codesign.backends.entry import FastEntry, ShapeGuards, flattener, guards_read_only_sizes
from codesign.numerics import EXACT, compare_outputs
from tests.zoo import ZOO, captured

# one per input idiom: a nested dict of tensors, a flat tensor, a tensor and two lists of tensors
IDIOMS = ("dcn_v2", "deepfm", "dlrm_lists")


@pytest.mark.parametrize("name", IDIOMS)
def test_fast_entry_scores_as_the_exported_module_at_every_size(name: str) -> None:
    program = captured(name)
    variant = codesign.compile(program, passes=[], backend="eager")
    assert isinstance(variant.runner, FastEntry)
    module = program.export().module()
    with torch.no_grad():
        for counts in ([1], [7], [3, 1, 9], [300]):
            inputs = program.call_inputs(ZOO[name]().make_batch(counts, seed=len(counts)))
            ok, err, _ = compare_outputs(variant(**inputs), module(**inputs), EXACT)
            assert ok, (counts, err)


def test_guards_run_once_per_passing_shape_and_every_time_on_a_failing_one() -> None:
    calls: list[tuple[int, ...]] = []

    def guards(x: torch.Tensor) -> None:
        calls.append(tuple(x.shape))
        torch._assert(x.size()[1] == 4, "Guard failed: x.size()[1] == 4")

    check = ShapeGuards(guards)
    check([torch.zeros(2, 4)])
    check([torch.ones(2, 4)])
    check([torch.zeros(3, 4)])
    assert calls == [(2, 4), (3, 4)]
    for _ in range(2):  # a shape that failed is never remembered as good
        with pytest.raises(AssertionError, match="Guard failed"):
            check([torch.zeros(2, 5)])
    assert calls[-2:] == [(2, 5), (2, 5)]


def test_a_wrong_shape_is_refused_by_the_programs_own_guards_on_every_call() -> None:
    program = captured("dcn_v2")
    variant = codesign.compile(program, passes=[], backend="eager")
    inputs = program.call_inputs(program.example)
    (name, features), *_ = inputs.items()
    narrow = {name: {**features, "user_dense": features["user_dense"][:, :2]}}
    with torch.no_grad():
        variant(**inputs)
        for _ in range(2):
            with pytest.raises(AssertionError, match=r"user_dense'\]\.size\(\)\[1\] == 3"):
                variant(**narrow)


def test_other_structures_take_the_modules_own_path_and_error() -> None:
    program = captured("dcn_v2")
    variant = codesign.compile(program, passes=[], backend="eager")
    inputs = program.call_inputs(program.example)
    (name, features), *_ = inputs.items()
    missing = {name: {k: v for k, v in list(features.items())[1:]}}
    extra = {name: {**features, "more": features["user_dense"]}}
    not_a_tensor = {name: {**features, "user_dense": 1.5}}
    with torch.no_grad():
        for wrong in (missing, extra):
            with pytest.raises(ValueError, match="exported input tree spec"):
                variant(**wrong)
        with pytest.raises(ValueError, match="keyword mismatch"):
            variant(**inputs, extra=torch.zeros(1))
        with pytest.raises(Exception, match="size"):  # the guards complaint about the float
            variant(**not_a_tensor)


def test_flattener_reads_leaves_in_the_specs_order_and_refuses_other_structures() -> None:
    from torch.utils import _pytree as pytree

    tree = {"b": [1, 2], "a": {"y": 3, "x": ()}}
    leaves, spec = pytree.tree_flatten(((), tree))
    flatten = flattener(spec)
    assert flatten is not None
    assert flatten({"a": {"x": (), "y": 3}, "b": [1, 2]}) == leaves  # key order of the call does not matter
    assert flatten({"b": [1, 2], "a": {"y": 3}}) is None
    assert flatten({"b": (1, 2), "a": {"y": 3, "x": ()}}) is None
    assert flatten({"b": [1, 2, 3], "a": {"y": 3, "x": ()}}) is None
    assert flatten({"b": [1, 2], "a": {"y": 3, "x": 0}}) is None


def test_guards_that_read_more_than_sizes_are_not_keyed_by_shape() -> None:
    def sizes(*args: torch.Tensor) -> None:
        torch._assert(args[0].size()[0] <= 1024, "Guard failed")

    def strides(*args: torch.Tensor) -> None:
        torch._assert(args[0].stride()[0] == 4, "Guard failed")

    assert guards_read_only_sizes(sizes)
    assert not guards_read_only_sizes(strides)


def test_keys_whose_repr_is_not_their_literal_get_no_generated_flattener() -> None:
    from torch.utils import _pytree as pytree

    _, spec = pytree.tree_flatten(((), {"features": {object(): 1}}))
    assert flattener(spec) is None  # the module's own flatten serves such inputs
