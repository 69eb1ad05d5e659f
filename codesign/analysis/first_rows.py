"""Which request-level id bags a program reads only at each request's first row.

A request-sharing program looks a user's id bag up on every row and keeps one row per request:
``index_select(lookup(values, offsets), 0, request_offsets[:-1])``. The bags on the other rows of a
request never reach an output, so a server may send such a bag once per request (at the request's
first row, empty bags on its other rows) instead of once per candidate: a 10,000-id history scored
against 10,000 candidates is then 10,000 ids, not 10^8.

The walk is deliberately narrow. A bag qualifies only when every use of its values and offsets is a
lookup whose per-row output (``embedding_bag``, or one table's block of ``codesign::grouped_embedding_bag``)
is read only through ``index_select(·, 0, first_rows)``, where ``first_rows`` is
``request_offsets[:-1]``. Anything else (arithmetic on the ids, a lengths-to-offsets cumsum, a lookup
whose rows reach candidate work directly) leaves the bag out, and the server repeats it as before.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx

__all__ = ["first_row_bags", "first_rows_nodes"]

aten = torch.ops.aten

# lookups whose output row i depends on bag i alone: op -> (values argument, offsets argument)
_ROW_LOOKUPS: dict[Any, tuple[int, int]] = {
    aten.embedding_bag.default: (1, 2),
    aten.embedding_bag.padding_idx: (1, 2),
    aten._embedding_bag.default: (1, 2),
    aten._embedding_bag_forward_only.default: (1, 2),
}


def _grouped_lookup() -> Any:
    try:
        return torch.ops.codesign.grouped_embedding_bag.default
    except (AttributeError, RuntimeError):  # codesign.ops not imported: no grouped lookups in the graph
        return None


def first_rows_nodes(graph: torch.fx.Graph, request_offsets: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes holding ``request_offsets[:-1]`` (each request's first row)."""
    return {
        user
        for user in request_offsets.users
        if user.op == "call_function"
        and user.target is aten.slice.Tensor
        and tuple(user.args[1:4]) == (0, 0, -1)
        and not user.kwargs
    }


def first_row_bags(
    graph: torch.fx.Graph,
    placeholders: Mapping[str, torch.fx.Node],
    bags: Mapping[str, str],
    request_offsets: str,
) -> frozenset[str]:
    """The bag values inputs (of ``bags``: values path -> offsets path) read only at request-first rows.

    ``placeholders`` maps input paths to the graph's placeholder nodes, ``request_offsets`` is the
    path of the program's request offsets input (a program without one reads every row).
    """
    offsets_node = placeholders.get(request_offsets)
    if offsets_node is None:
        return frozenset()
    first = first_rows_nodes(graph, offsets_node)
    if not first:
        return frozenset()
    found = set()
    for values_path, offsets_path in bags.items():
        values, offsets = placeholders.get(values_path), placeholders.get(offsets_path)
        if values is None or offsets is None:
            continue
        if _read_at_first_rows_only(values, offsets, first):
            found.add(values_path)
    return frozenset(found)


def _read_at_first_rows_only(
    values: torch.fx.Node, offsets: torch.fx.Node, first: set[torch.fx.Node]
) -> bool:
    lookups = set(values.users)
    # the offsets' length is the row count, the same in either layout: a size read of it is harmless
    others = {u for u in offsets.users if not (u.op == "call_function" and u.target is aten.sym_size.int)}
    if not lookups or others != lookups:
        return False
    return all(_rows_of(lookup, values, offsets, first) for lookup in lookups)


def _rows_of(
    lookup: torch.fx.Node, values: torch.fx.Node, offsets: torch.fx.Node, first: set[torch.fx.Node]
) -> bool:
    """True when the lookup's rows for this bag reach nothing but first-row selections."""
    if lookup.op != "call_function":
        return False
    positions = _ROW_LOOKUPS.get(lookup.target)
    if positions is not None:
        v, o = positions
        if len(lookup.args) <= o or lookup.args[v] is not values or lookup.args[o] is not offsets:
            return False
        if any(a is values or a is offsets for a in _other_args(lookup, positions)):
            return False
        rows = []
        for user in lookup.users:  # (output, offset2bag, bag_size, max_indices): only the output may be used
            if not (user.op == "call_function" and user.target is operator.getitem):
                return False
            if user.args[1] == 0:
                rows.append(user)
            elif user.users:
                return False
        return _only_first_rows(rows, first)
    if lookup.target is _grouped_lookup() and lookup.target is not None:
        return _grouped_rows(lookup, values, offsets, first)
    return False


def _grouped_rows(
    lookup: torch.fx.Node, values: torch.fx.Node, offsets: torch.fx.Node, first: set[torch.fx.Node]
) -> bool:
    """One table's block of a grouped lookup ([sum of rows, d], tables stacked on dim 0), cut out by
    the ``split_with_sizes`` the fusion pass emits, then read at first rows only."""
    indices, bag_offsets = lookup.args[1], lookup.args[2]
    if not (isinstance(indices, list | tuple) and isinstance(bag_offsets, list | tuple)):
        return False
    tables = [k for k, (i, o) in enumerate(zip(indices, bag_offsets, strict=False)) if i is values]
    if len(tables) != 1 or bag_offsets[tables[0]] is not offsets:
        return False
    if sum(1 for o in bag_offsets if o is offsets) != 1 or sum(1 for i in indices if i is values) != 1:
        return False
    splits = list(lookup.users)
    if len(splits) != 1:
        return False
    split = splits[0]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    sizes = split.args[1] if len(split.args) > 1 else None
    if split.target is not aten.split_with_sizes.default or dim != 0 or not isinstance(sizes, list | tuple):
        return False
    if len(sizes) != len(indices):
        return False
    rows = []
    for user in split.users:
        if not (user.op == "call_function" and user.target is operator.getitem):
            return False
        if user.args[1] == tables[0]:
            rows.append(user)
    return _only_first_rows(rows, first)


def _only_first_rows(rows: Iterable[torch.fx.Node], first: set[torch.fx.Node]) -> bool:
    for node in rows:
        for user in node.users:
            if not (
                user.op == "call_function"
                and user.target is aten.index_select.default
                and user.args[0] is node
                and user.args[1] == 0
                and user.args[2] in first
            ):
                return False
    return True


def _other_args(node: torch.fx.Node, skip: tuple[int, ...]) -> list[Any]:
    return [a for i, a in enumerate(node.args) if i not in skip] + list(node.kwargs.values())
