"""Small read-only questions about FX nodes that every analysis (and pass) asks.

What tensor a node holds, which ops are views, what an op is called, which module it came from, how
many kernels a graph launches, which inputs index an embedding table directly. One helper per
question, so the cost registry, the role rules and the passes agree on the answers.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from codesign.ir.program import Program

__all__ = [
    "RESHAPE_OPS",
    "VIEW_OPS",
    "as_int",
    "constant_value",
    "count_kernels",
    "embedding_id_bounds",
    "module_of",
    "node_value",
    "op_name",
    "tensor_arg",
    "tensor_values",
]

aten = torch.ops.aten

# Ops that launch no kernel: views, shape queries and bookkeeping (their cost is zero).
# ops whose output is the input's elements in the same order under another shape
RESHAPE_OPS: frozenset[Any] = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
    }
)
VIEW_OPS: frozenset[Any] = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.t.default,
        aten.transpose.int,
        aten.permute.default,
        aten.expand.default,
        aten.expand_as.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.alias.default,
        aten.detach.default,
        aten.unflatten.int,
        aten.flatten.using_ints,
        aten.split.Tensor,
        aten.chunk.default,
        aten.unbind.int,
        aten.split_with_sizes.default,
        aten.narrow.default,
        aten.as_strided.default,
        aten.sym_size.int,
        aten.sym_numel.default,
        aten.sym_stride.int,
        aten._assert_tensor_metadata.default,
        aten.lift_fresh_copy.default,
        operator.getitem,
    }
)


def node_value(node: object) -> torch.Tensor | None:
    """The (fake) tensor an FX node holds in ``meta["val"]``; None for non-nodes and non-tensors.

    >>> node_value(graph_node).shape
    """
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def tensor_values(obj: object) -> list[torch.Tensor]:
    """Every tensor value in ``obj``: a node (a tensor or a tuple of them), or nested lists of nodes."""
    vals: list[torch.Tensor] = []
    if isinstance(obj, torch.fx.Node):
        v = obj.meta.get("val")
        if isinstance(v, torch.Tensor):
            vals.append(v)
        elif isinstance(v, list | tuple):
            vals += [t for t in v if isinstance(t, torch.Tensor)]
    elif isinstance(obj, list | tuple):
        for o in obj:
            vals += tensor_values(o)
    return vals


def tensor_arg(node: torch.fx.Node, index: int) -> torch.Tensor:
    """The tensor value of ``node.args[index]``: cost formulas read their operands' shapes this way.

    Raises ``TypeError`` naming the node when that argument holds no tensor (a graph captured
    without fake values, or a formula registered for the wrong op).
    """
    val = node_value(node.args[index]) if index < len(node.args) else None
    if val is None:
        raise TypeError(
            f"node {node.name} ({node.target}): argument {index} has no tensor value in meta['val']; "
            "capture the graph with torch.export so every node carries one"
        )
    return val


# Ops that copy or re-type a constant without changing its values: an index list a model stores as a
# Python list becomes ``clone(lifted_constant)`` in an exported graph.
_CONSTANT_COPIES = frozenset(
    {
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten.lift_fresh_copy.default,
        aten._to_copy.default,
        aten.contiguous.default,
    }
)


def constant_value(program: Program, node: object) -> torch.Tensor | None:
    """The real tensor a constant node holds (a ``get_attr``, or a copy of one), else None.

    Index lists (the columns a model picks from a flat feature tensor) reach the graph this way; the
    role rules need their values to tell which columns a lookup reads.
    """
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        value = program.fetch_attr(str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "call_function" and node.target in _CONSTANT_COPIES and node.args:
        base = constant_value(program, node.args[0])
        if base is None:
            return None
        dtype = node.kwargs.get("dtype")
        return base.to(dtype) if isinstance(dtype, torch.dtype) else base
    return None


def as_int(value: Any) -> int:
    """An FX argument known to be an int (dims, indices); SymInts are not expected here."""
    return int(value)


def op_name(node: torch.fx.Node) -> str:
    """Short op name (``linear.default``, ``getitem``) as cost tables and reports show it."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    name = getattr(t, "__name__", None) or str(t)
    return str(name).removeprefix("aten.")


def module_of(node: torch.fx.Node) -> str:
    """Path of the innermost nn.Module the node was traced in ("" when unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path)


def count_kernels(program: Program) -> int:
    """Ops that launch work: call_function nodes other than views and shape bookkeeping."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target not in VIEW_OPS)


# Ops that pass every id through unchanged (up to layout), so a bound on their output bounds all of
# their input; once only some columns are known to be ids, only the ops that keep columns in place.
_ID_VIEWS = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.expand.default,
}
_ID_COPIES = {
    aten.contiguous.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.alias.default,
}
_LOOKUPS = {
    aten.embedding.default: 1,  # (weight, indices)
    aten.embedding_bag.default: 1,
    aten.embedding_bag.padding_idx: 1,
    aten._embedding_bag.default: 1,
    aten._embedding_bag_forward_only.default: 1,
}


def embedding_id_bounds(program: Program) -> dict[str, dict[str, int]]:
    """Input path -> {column: table rows} for integer inputs that index an embedding table directly.

    ``column`` is ``"*"`` when the whole input indexes one table, or the column number when the
    model reads column ``i`` of a 2-D id input (``x[:, i]``) into table ``i``. Ids outside
    ``[0, rows)`` would crash the lookup or read garbage; a server checks them before batching.
    Inputs that reach a table through arithmetic (hashing, offsets) are not bounded here.
    """
    inputs = {node.name: path for path, node in program.placeholders().items()}
    bounds: dict[str, dict[str, int]] = {}
    for node in program.graph.nodes:
        pos = _LOOKUPS.get(node.target) if node.op == "call_function" else None
        if pos is None or len(node.args) <= pos:
            continue
        weight, ids = node.args[0], node.args[pos]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue
        rows = int(program.fetch_attr(str(weight.target)).shape[0])
        source, columns = _id_source(ids)
        if source is not None and source.name in inputs:
            per = bounds.setdefault(inputs[source.name], {})
            for column in ["*"] if columns is None else [str(c) for c in columns]:
                per[column] = min(rows, per.get(column, rows))
    return bounds


def _id_source(ids: Any) -> tuple[torch.fx.Node | None, list[int] | None]:
    """The placeholder whose values reach a lookup unchanged, and which of its columns (None: all).

    Walks back from the lookup's index argument: layout ops keep every id; ``x[:, i]`` (select on
    dim 1) and ``x[:, a:b]`` (slice on dim 1) narrow it to columns of ``x``; anything else (an add of
    per-field offsets, a hash) ends the walk with no bound.
    """
    columns: list[int] | None = None
    while isinstance(ids, torch.fx.Node) and ids.op == "call_function":
        target = ids.target
        if target in _ID_COPIES or (target in _ID_VIEWS and columns is None):
            ids = ids.args[0]
            continue
        if target not in (aten.select.int, aten.slice.Tensor) or not isinstance(ids.args[0], torch.fx.Node):
            return None, None
        source = ids.args[0]
        shape = getattr(source.meta.get("val"), "shape", None)
        if shape is None:
            return None, None
        dim = _int_or_none(ids.args[1]) if len(ids.args) > 1 else 0
        if dim is None:
            return None, None
        dim = dim % len(shape)
        if dim == 0:  # rows, not columns
            if target is aten.select.int:
                return None, None
            ids = source
            continue
        width = _int_or_none(shape[1]) if dim == 1 else None
        if dim != 1 or width is None:
            return None, None
        if target is aten.select.int:
            if columns is not None:  # a select drops dim 1: what a later op called columns is another axis
                return None, None
            index = _int_or_none(ids.args[2])
            if index is None:
                return None, None
            picked = [index % width]
        else:
            start = _int_or_none(ids.args[2]) if len(ids.args) > 2 and ids.args[2] is not None else 0
            stop = _int_or_none(ids.args[3]) if len(ids.args) > 3 and ids.args[3] is not None else width
            step = _int_or_none(ids.args[4]) if len(ids.args) > 4 else 1
            if start is None or stop is None or step is None:
                return None, None
            picked = list(range(width))[slice(start, stop, step)]
        columns = picked if columns is None else [picked[c] for c in columns if c < len(picked)]
        ids = source
    if isinstance(ids, torch.fx.Node) and ids.op == "placeholder":
        return ids, columns
    return None, None


def _int_or_none(value: Any) -> int | None:
    """A plain int argument or dimension; None for a symbolic size or a node."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
