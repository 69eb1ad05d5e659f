"""Graph editing helpers shared by the rewriting passes (fusion, selective FP8).

Every node a pass inserts gets its fake value in ``meta['val']`` at once, so later rewrites can
match on its shape. A rewrite that changes the shapes of nodes it keeps (request sharing moves nodes to
one row per request) calls ``propagate_meta``, which recomputes every value on fake tensors in the
graph's own shape environment. Programs are never re-traced by ``torch.export`` between passes: that
costs seconds per pass, this milliseconds; backends export once, at lowering.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

from codesign.ir.program import Program

__all__ = [
    "dynamic_placeholder_value",
    "fake_mode_of",
    "finish_rewrite",
    "insert_call",
    "list_arg",
    "param_value",
    "propagate_meta",
    "register_constant",
    "remove_unused_params",
    "run_target",
    "stable_topological_sort",
]


def list_arg(node: torch.fx.Node, index: int) -> list[Any]:
    """The list argument ``node.args[index]`` (``cat``/``stack`` inputs), or [] if it is not a list."""
    arg = node.args[index] if len(node.args) > index else None
    return list(arg) if isinstance(arg, list | tuple) else []


def run_target(node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
    """Call the op of a ``call_function`` node on ``args`` (real or fake values)."""
    target = node.target
    if not callable(target):
        raise TypeError(f"node {node.name} calls {target!r}, which is not callable")
    return target(*args, **kwargs)


def param_value(program: Program, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else None (activations, constants in the graph)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = program.fetch_attr(str(node.target))
    return value if isinstance(value, torch.Tensor) else None


def fake_mode_of(graph: torch.fx.Graph) -> Any:
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def insert_call(
    graph: torch.fx.Graph, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> torch.fx.Node:
    """Insert ``target(*args)`` at the graph's insert point with its fake value in ``meta['val']``.

    Later rounds of a pass match on shapes of nodes earlier rounds made, so every new node gets
    its symbolic shape at once (running the op on the inputs' fake tensors).
    """
    node = graph.call_function(target, args, kwargs or {})
    fake_args, fake_kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
    mode = detect_fake_mode(pytree.tree_leaves((fake_args, fake_kwargs))) or fake_mode_of(graph)
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def propagate_meta(program: Program, dirty: Iterable[torch.fx.Node] | None = None) -> None:
    """Recompute ``meta['val']`` on fake tensors in the graph's own shape environment, in graph order.

    With ``dirty`` (the nodes a rewrite made or changed) only those are recomputed, and then the users of
    any whose shape or dtype changed, transitively; without it, every node. Symbolic sizes stay in the
    graph's shape environment, so a node moved to R rows gets R's symbol.
    """
    graph = program.graph
    mode = fake_mode_of(graph)
    if mode is None:
        raise RuntimeError("the graph's placeholders carry no fake values")
    todo = None if dirty is None else set(dirty)
    with mode:
        for node in graph.nodes:
            if todo is not None and node not in todo:
                continue
            old = node.meta.get("val")
            if node.op == "get_attr":
                value = program.fetch_attr(str(node.target))
                if isinstance(value, torch.Tensor):
                    node.meta["val"] = mode.from_tensor(value, static_shapes=True)
            elif node.op == "call_function":
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
                node.meta["val"] = run_target(node, args, kwargs)
            if todo is not None and _signature(old) != _signature(node.meta.get("val")):
                todo.update(node.users)


def _signature(value: Any) -> Any:
    """Shapes and dtypes of a fake value (or list of them), as text: comparing SymInts would add guards."""
    if isinstance(value, list | tuple):
        return tuple(_signature(v) for v in value)
    if isinstance(value, torch.Tensor):
        return (str(tuple(value.shape)), value.dtype)
    return repr(value)


def dynamic_placeholder_value(graph: torch.fx.Graph, example: torch.Tensor) -> Any:
    """A fake value for a new input whose every size is a fresh symbol of the graph's shape environment."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    mode = fake_mode_of(graph)
    context: Any = StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] * example.dim(), constraint_sizes=[None] * example.dim()
    )
    return mode.from_tensor(example, symbolic_context=context)


def weights_read(nodes: Sequence[torch.fx.Node]) -> list[str]:
    """The weights (get_attr targets) ``nodes`` read directly: what a constant replacing them derives from."""
    return sorted({str(a.target) for n in nodes for a in n.all_input_nodes if a.op == "get_attr"})


def register_constant(
    program: Program, base: str, value: torch.Tensor, sources: Sequence[str] = ()
) -> torch.fx.Node:
    """A new buffer holding ``value`` (computed from the weights ``sources``) and a get_attr node
    reading it (inserted at the graph's start)."""
    gm = program.graph_module
    name = program.add_buffer(base, value, sources)
    first = next(n for n in program.graph.nodes if n.op != "placeholder")
    with program.graph.inserting_before(first):
        node = program.graph.get_attr(name)
    mode = fake_mode_of(program.graph)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(gm.get_buffer(name), static_shapes=True)
    return node


def remove_unused_params(gm: torch.fx.GraphModule, only: set[str] | None = None) -> tuple[int, int]:
    """Delete parameters/buffers no get_attr reads (restricted to ``only`` if given); (count, bytes) freed."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    removed, freed = 0, 0
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        if name in used or (only is not None and name not in only):
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
            removed += 1
            freed += t.numel() * t.element_size()
    gm.delete_all_unused_submodules()
    return removed, freed


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, moving as little as possible.

    Rewrites insert a fused node after the last of its inputs; users of the nodes it replaced may
    sit earlier in the graph and are moved after it here.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    ready = [(order[n], n.name) for n in graph.nodes if waiting[n] == 0]
    heapq.heapify(ready)
    by_name = {n.name: n for n in graph.nodes}
    result: list[torch.fx.Node] = []
    while ready:
        _, name = heapq.heappop(ready)
        node = by_name[name]
        result.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (order[user], user.name))
    if len(result) != len(order):
        raise RuntimeError("fusion created a cycle in the graph")
    output = next(n for n in graph.nodes if n.op == "output")
    for node in result:
        if node is not output:
            output.prepend(node)


def finish_rewrite(program: Program) -> Program:
    """Sort, drop dead nodes and orphaned weights, in place (the manager lints and recompiles; no re-export)."""
    stable_topological_sort(program.graph)
    program.graph.eliminate_dead_code()
    remove_unused_params(program.graph_module)
    return program
