"""Generic cleanup passes: dead-code elimination, common-subexpression elimination, constant folding.

They run on any Program and are the scaffolding the specialised passes lean on: a rewrite may
leave duplicates and dead nodes behind and let these passes tidy up.

Captured graphs are not functional: ``torch.tensor([...])`` in a forward becomes
``detach_(lift_fresh_copy(constant))``, and a model may write into a fresh tensor (``add_``, ``t_``,
``masked_fill_``) or into a buffer. Folding a value that is written later would turn a tensor made
fresh on every call into one buffer that each call writes again; merging two such values would let one
write show through the other. Both passes therefore leave alone every value that the graph writes in
place, directly or through a view (``_written_values``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
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


# In-place ops that change a tensor's autograd record only, never its values, shape or strides. On a
# folded constant they are dropped: torch refuses ``detach_`` on a view, and the weights of a reloaded
# bundle are views into the program archive's storage.
_AUTOGRAD_ONLY_INPLACE = frozenset({torch.ops.aten.detach_.default})


def _aliased_args(node: torch.fx.Node) -> list[tuple[torch.fx.Node, bool]]:
    """(input, written) for every input the op's schema says its result aliases or it writes in place."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out: list[tuple[torch.fx.Node, bool]] = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None:
            continue
        value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
        written = info.is_write and node.target not in _AUTOGRAD_ONLY_INPLACE
        values = value if isinstance(value, list | tuple) else [value]
        out.extend((v, written) for v in values if isinstance(v, torch.fx.Node))
    return out


def _written_values(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose tensor some op of the graph writes in place, directly or through an alias.

    Aliases are grouped by union-find over what op schemas declare (a view shares its base's storage,
    an in-place op returns its input; ``getitem`` of a multi-output op is taken to alias it); a write
    to any member marks the whole group. Over-approximating aliases only blocks folds, never breaks one.
    """
    parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(n: torch.fx.Node) -> torch.fx.Node:
        root = n
        while parent.get(root, root) is not root:
            root = parent[root]
        while n is not root:
            parent[n], n = root, parent[n]
        return root

    written: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            parent[find(node)] = find(node.args[0])
            continue
        for arg, writes in _aliased_args(node):
            parent[find(node)] = find(arg)
            if writes:
                written.append(arg)
    roots = {find(n) for n in written}
    return {n for n in graph.nodes if find(n) in roots} if roots else set()


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
        written = _written_values(program.graph)
        for node in list(program.graph.nodes):
            if node in written:  # two fresh tensors one of which is later written are not the same value
                continue
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
    Values the graph writes in place (directly or through a view) are never folded, nor is anything
    read from a buffer the graph writes; ``detach_`` of a folded constant is dropped (it changes only
    autograd state, and torch refuses it on the views a reloaded bundle's weights are).
    """

    name = "constant_folding"
    config_class = ConstantFoldingConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        gm = program.graph_module
        written = _written_values(gm.graph)
        # a folded graph output would be one buffer that every call returns (and a caller may write)
        returned = {n for out in gm.graph.find_nodes(op="output") for n in out.all_input_nodes}
        constants: dict[str, torch.Tensor] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node not in written:
                value = program.fetch_attr(str(node.target))
                if isinstance(value, torch.Tensor):
                    constants[node.name] = value
        folded, grown_refused, written_refused, detaches = 0, 0, 0, 0
        orphan_candidates: set[torch.fx.Node] = set()
        max_growth = float(self.config.max_growth)
        for node in list(gm.graph.nodes):
            source = node.args[0] if node.args else None
            if (
                node.target in _AUTOGRAD_ONLY_INPLACE
                and isinstance(source, torch.fx.Node)
                and source.name in constants
            ):
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                detaches += 1
                continue
            if not _is_pure(node) or node.target is torch.ops.aten._assert_tensor_metadata.default:
                continue
            inputs = node.all_input_nodes
            if not all(a.name in constants for a in inputs) or not inputs:
                continue
            if node in returned:
                continue
            if node in written:
                written_refused += 1
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
            sources = [str(a.target) for a in inputs if a.op == "get_attr"]
            attr = program.add_buffer(f"_folded_{node.name}", value.clone(), sources)
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
            folded > 0 or detaches > 0,
            {
                "nodes_folded": folded,
                "folds_refused_for_growth": grown_refused,
                "folds_refused_for_writes": written_refused,
                "detaches_dropped": detaches,
                "param_bytes_freed": freed,
            },
        )


def generic_passes() -> list[Pass]:
    """The default cleanup pipeline: merge duplicates (so folds are not repeated), fold, drop dead code."""
    return [CommonSubexpressionElimination(), ConstantFolding(), DeadCodeElimination()]
