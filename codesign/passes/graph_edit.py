"""Graph editing helpers shared by the rewriting passes (fusion, selective FP8).

Every node a pass inserts gets its fake value in ``meta['val']`` at once, so later rewrites can
match on its shape; ``finish_rewrite`` sorts, prunes and re-exports so the program leaving a pass
carries fresh shape metadata.
"""

from __future__ import annotations

import contextlib
import heapq
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

from codesign.ir.program import Program
from codesign.passes.cleanup import remove_unused_params

__all__ = [
    "fake_mode_of",
    "finish_rewrite",
    "insert_call",
    "node_value",
    "param_value",
    "register_constant",
    "stable_topological_sort",
]


def param_value(program: Program, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else None (activations, constants in the graph)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = program.fetch_attr(str(node.target))
    return value if isinstance(value, torch.Tensor) else None


def node_value(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


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


def register_constant(program: Program, base: str, value: torch.Tensor) -> torch.fx.Node:
    """A new buffer holding ``value`` and a get_attr node reading it (inserted at the graph's start)."""
    gm = program.graph_module
    name = program.add_buffer(base, value)
    first = next(n for n in program.graph.nodes if n.op != "placeholder")
    with program.graph.inserting_before(first):
        node = program.graph.get_attr(name)
    mode = fake_mode_of(program.graph)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(gm.get_buffer(name), static_shapes=True)
    return node


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
    """Sort, drop dead nodes and orphaned weights, and re-export for fresh shape metadata."""
    stable_topological_sort(program.graph)
    program.graph.eliminate_dead_code()
    remove_unused_params(program.graph_module)
    program.recompile()
    return program.reexported()
