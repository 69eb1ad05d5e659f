"""Generic cleanup passes: dead-code elimination, common-subexpression elimination, constant folding.

They run on any Program and are the scaffolding the specialised passes lean on: a rewrite may
leave duplicates and dead nodes behind and let these passes tidy up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx

from codesign.config import Config, knob, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.passes.graph_edit import remove_unused_params, run_target
from codesign.passes.manager import Pass, PassResult
from codesign.passes.registry import register_pass

__all__ = [
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "DeadCodeElimination",
    "generic_passes",
    "remove_unused_params",
]


def _is_pure(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = getattr(node.target, "_schema", None)
    return not (schema is not None and schema.is_mutable)


@register_config
@dataclasses.dataclass(frozen=True)
class DeadCodeConfig(Config):
    remove_unused_params: bool = knob(True, help="also drop parameters no node reads")


@register_pass
class DeadCodeElimination(Pass[DeadCodeConfig]):
    """Remove nodes whose values nobody uses (side-effecting ops stay), and orphaned parameters."""

    name = "dce"
    config_class = DeadCodeConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        before = len(program.graph.nodes)
        program.graph.eliminate_dead_code()
        removed_nodes = before - len(program.graph.nodes)
        params, freed = (0, 0)
        if self.config.remove_unused_params:
            params, freed = remove_unused_params(program.graph_module)
        return PassResult(
            program,
            removed_nodes > 0 or params > 0,
            {"nodes_removed": removed_nodes, "params_removed": params, "param_bytes_freed": freed},
        )


@register_config
@dataclasses.dataclass(frozen=True)
class CseConfig(Config):
    pass


def _key(node: torch.fx.Node) -> Any:
    def norm(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return ("node", a.name)
        if isinstance(a, list | tuple):
            return (type(a).__name__, tuple(norm(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, norm(v)) for k, v in a.items())))
        if isinstance(a, float) and math.isnan(a):
            return ("nan",)
        return (type(a).__name__, repr(a))

    return (node.op, node.target, norm(node.args), norm(node.kwargs))


@register_pass
class CommonSubexpressionElimination(Pass[CseConfig]):
    """Merge pure nodes that compute the same op on the same inputs (e.g. a shared embedding lookup)."""

    name = "cse"
    config_class = CseConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        seen: dict[Any, torch.fx.Node] = {}
        merged = 0
        for node in list(program.graph.nodes):
            if node.op == "get_attr" or _is_pure(node):
                key = _key(node)
                if key in seen:
                    node.replace_all_uses_with(seen[key])
                    program.graph.erase_node(node)
                    merged += 1
                else:
                    seen[key] = node
        return PassResult(program, merged > 0, {"nodes_merged": merged})


@register_config
@dataclasses.dataclass(frozen=True)
class ConstantFoldingConfig(Config):
    max_growth: float = knob(
        1.0,
        low=0.0,
        high=16.0,
        step=0.25,
        help="largest allowed ratio of folded bytes to the constant bytes it replaces",
    )


@register_pass
class ConstantFolding(Pass[ConstantFoldingConfig]):
    """Evaluate once the nodes that depend only on parameters and constants; store the results.

    ``max_growth`` stops folds that would grow constant memory (e.g. expanding a bias to a full
    matrix): a fold is kept only if its result is at most ``max_growth`` x the bytes it reads.
    """

    name = "constant_folding"
    config_class = ConstantFoldingConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        gm = program.graph_module
        constants: dict[str, torch.Tensor] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = program.fetch_attr(str(node.target))
                if isinstance(value, torch.Tensor):
                    constants[node.name] = value
        folded, grown_refused = 0, 0
        orphan_candidates: set[torch.fx.Node] = set()
        max_growth = float(self.config.max_growth)
        for node in list(gm.graph.nodes):
            if not _is_pure(node) or node.target is torch.ops.aten._assert_tensor_metadata.default:
                continue
            inputs = node.all_input_nodes
            if not all(a.name in constants for a in inputs) or not inputs:
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: constants[a.name])
            with torch.no_grad():
                value = run_target(node, args, kwargs)
            if not isinstance(value, torch.Tensor):
                continue
            read = sum(constants[a.name].numel() * constants[a.name].element_size() for a in inputs)
            if value.numel() * value.element_size() > max_growth * read:
                grown_refused += 1
                continue
            orphan_candidates |= {a for a in inputs if a.op == "get_attr"}
            attr = program.add_buffer(f"_folded_{node.name}", value.clone())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(attr)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            constants[new.name] = gm.get_buffer(attr)
            folded += 1
        freed = 0
        if folded:  # drop only what folding orphaned: constants it read that no node reads any more
            orphaned = {str(n.target) for n in orphan_candidates if not n.users}
            for node in [n for n in orphan_candidates if not n.users]:
                gm.graph.erase_node(node)
            _, freed = remove_unused_params(gm, only=orphaned)
        return PassResult(
            program,
            folded > 0,
            {"nodes_folded": folded, "folds_refused_for_growth": grown_refused, "param_bytes_freed": freed},
        )


def generic_passes() -> list[Pass]:
    """The default cleanup pipeline: merge duplicates (so folds are not repeated), fold, drop dead code."""
    return [CommonSubexpressionElimination(), ConstantFolding(), DeadCodeElimination()]
