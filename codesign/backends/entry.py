"""The eager variant's call path: inputs laid out by generated code, shape guards run once per shape.

An exported module's call pays, before its first op: a pytree flatten of the inputs against its
``_in_spec`` (~14 µs for one nested dict of six tensors), and its shape guards (``_guards_fn``:
``torch._assert(args[i].size()[j] == ...)`` per input dimension, run inside a dynamo config patch:
~47 µs for the same inputs). On the zoo's small models (0.4-0.7 ms a call) that is the whole gap
between the captured graph and the ``nn.Module`` it came from.

``fast_entry`` builds, for one exported module:

* a flattener generated from the input spec: one ``keys()`` comparison per dict and one ``len`` per
  list on the way, the leaves read by key; any other structure takes the module's own path (and its
  error);
* the guards keyed by the inputs' shapes, where the guards read nothing but sizes (checked on their
  code): a shape seen to pass is not checked again; a new shape runs the module's own guards (and
  raises their ``AssertionError``);
* the graph as a plain function of its flat inputs and weights (no ``self.a.b.weight`` lookups).

It is checked bit-identical against the module on the examples before use, else the module's own
call path is kept.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from codesign.backends.bindings import identical_on

__all__ = ["FastEntry", "ShapeGuards", "fast_entry", "flattener", "guards_read_only_sizes"]

log = logging.getLogger(__name__)

# at most this many distinct input shapes are remembered as passing (one per candidate count in practice)
MAX_SHAPES = 4096


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    # ``children()`` where torch has it (``children_specs`` is deprecated there)
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def flattener(spec: pytree.TreeSpec) -> Callable[[Mapping[str, Any]], list[Any] | None] | None:
    """A function of the keyword inputs returning their leaves in ``spec``'s order, or None where their
    structure is not ``spec``'s; None where ``spec`` (an exported ``_in_spec``) has nodes other than
    dicts, lists, tuples and None, or positional inputs."""
    if spec.type is not tuple or spec.num_children != 2:
        return None
    args, kwargs = _children(spec)
    if args.num_children != 0 or kwargs.type is not dict:
        return None
    lines: list[str] = []
    leaves: list[str] = []
    constants: dict[str, Any] = {}

    def visit(expr: str, node: pytree.TreeSpec) -> bool:
        if node.is_leaf():
            leaves.append(expr)
            return True
        kind = node.type
        var = f"v{len(lines)}"
        lines.append(f"{var} = {expr}")
        if kind is dict:
            if not all(type(k) in (str, int) for k in node.context):
                return False  # keys written into the source by repr: only those whose repr is their literal
            keys = f"K{len(constants)}"
            constants[keys] = frozenset(node.context)
            lines.append(f"if type({var}) is not dict or {var}.keys() != {keys}: return None")
            return all(
                visit(f"{var}[{key!r}]", child)
                for key, child in zip(node.context, _children(node), strict=True)
            )
        if kind in (list, tuple):
            lines.append(
                f"if type({var}) is not {kind.__name__} or len({var}) != {node.num_children}: return None"
            )
            return all(visit(f"{var}[{i}]", child) for i, child in enumerate(_children(node)))
        if kind is type(None):
            lines.append(f"if {var} is not None: return None")
            return True
        return False

    if not visit("kwargs", kwargs):
        return None
    source = "def flatten(kwargs):\n" + "".join(f"    {line}\n" for line in lines)
    source += f"    return [{', '.join(leaves)}]\n"
    namespace: dict[str, Any] = dict(constants)
    # the source is built above: names of our own, dict keys written by repr
    exec(compile(source, "<codesign input flattener>", "exec"), namespace)
    return namespace["flatten"]  # type: ignore[no-any-return]


def _functions(fn: Any, seen: set[int] | None = None) -> list[Any]:
    """``fn`` and the functions its closure holds (a decorator's wrapper holds the function it wraps)."""
    seen = set() if seen is None else seen
    if id(fn) in seen or not hasattr(fn, "__code__"):
        return []
    seen.add(id(fn))
    found = [fn]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            found += _functions(cell.cell_contents, seen)
        except ValueError:  # an empty cell
            continue
    return found


def _allowed_names() -> frozenset[str]:
    try:
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
    except ImportError:
        return frozenset({"torch", "_assert", "size", "math", "inf"})
    return frozenset({"torch", "_assert", "size", "math", "inf", *SYMPY_INTERP})


def guards_read_only_sizes(guards: Callable[..., Any]) -> bool:
    """True where ``guards`` (an exported module's ``_guards_fn.forward``) and every function in its
    closures name only ``torch._assert``, ``size()`` and sympy's arithmetic: their verdict is then a
    function of the inputs' shapes alone."""
    functions = _functions(guards)
    codes = [f.__code__ for f in functions]
    inner = [c for code in codes for c in code.co_consts if hasattr(c, "co_names")]
    names = {n for code in [*codes, *inner] for n in code.co_names}
    return bool(functions) and names <= _allowed_names()


class ShapeGuards:
    """Runs ``guards`` on inputs of a shape not seen to pass before; a failing shape raises every time."""

    def __init__(self, guards: Callable[..., Any]) -> None:
        self._guards = guards
        self._passed: set[tuple[torch.Size, ...]] = set()

    def __call__(self, leaves: Sequence[torch.Tensor]) -> None:
        key = tuple([x.shape for x in leaves])
        if key in self._passed:
            return
        self._guards(*leaves)  # raises on a shape the program does not take
        if len(self._passed) < MAX_SHAPES:
            self._passed.add(key)


def _plain_body(module: torch.fx.GraphModule) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """``module``'s graph as a function of its flat inputs then its weights (no guards call, no pytree)."""
    graph = copy.deepcopy(module.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    weights: list[Any] = []
    last = placeholders[-1]
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        with graph.inserting_after(last):
            last = graph.placeholder(f"_w{len(weights)}")
        weights.append(functools.reduce(getattr, node.target.split("."), module))
        node.replace_all_uses_with(last)
        graph.erase_node(node)
    graph.set_codegen(torch.fx.graph.CodeGen())
    graph.lint()
    body = torch.fx.GraphModule(module, graph)
    return body.forward, tuple(weights)


class FastEntry:
    """Keyword inputs → the graph's outputs, past the module's per-call flatten and guards (see module doc).

    ``slow`` (the module's own checked call) takes every call whose structure or leaves the fast path
    does not recognise, so errors stay the module's.
    """

    def __init__(
        self,
        module: torch.fx.GraphModule,
        slow: Callable[..., Any],
        flatten: Callable[[Mapping[str, Any]], list[Any] | None],
        guards: Callable[[Sequence[torch.Tensor]], None] | None,
    ) -> None:
        self.module = module
        self._slow = slow
        self._flatten = flatten
        self._guards = guards
        self._body, self._weights = _plain_body(module)
        out_spec = module._out_spec
        if not isinstance(out_spec, pytree.TreeSpec):
            raise TypeError(f"{type(module).__name__} has no output spec: not an exported module")
        self._single = out_spec.is_leaf()
        self._out_spec: pytree.TreeSpec = out_spec

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves = None if args else self._flatten(kwargs)
        if leaves is None:
            return self._slow(*args, **kwargs)
        if self._guards is not None:
            try:
                self._guards(leaves)
            except AttributeError:  # a leaf that is not a tensor: the module's own path says so
                return self._slow(**kwargs)
        out = self._body(*leaves, *self._weights)
        return out[0] if self._single else pytree.tree_unflatten(list(out), self._out_spec)


def fast_entry(
    module: torch.fx.GraphModule, slow: Callable[..., Any], examples: Sequence[Mapping[str, Any]]
) -> Callable[..., Any]:
    """A ``FastEntry`` for an exported module (``slow`` is its checked call), or ``slow`` where the module
    is not one, its inputs are not dicts/lists of tensors, or the fast path differs from ``slow`` on
    ``examples`` (keyword inputs)."""
    spec = getattr(module, "_in_spec", None)
    if spec is None or getattr(module, "_out_spec", None) is None:
        return slow
    flatten = flattener(spec)
    if flatten is None:
        return slow
    guards = None
    guards_module = getattr(module, "_guards_fn", None)
    calls_guards = any(n.op == "call_module" and n.target == "_guards_fn" for n in module.graph.nodes)
    if calls_guards:
        if guards_module is None or not guards_read_only_sizes(guards_module.forward):
            return slow  # guards that read more than sizes run on every call, as the module runs them
        guards = ShapeGuards(guards_module.forward)
    try:
        entry = FastEntry(module, slow, flatten, guards)
    except Exception as exc:  # a graph the plain codegen cannot build: keep the module's call
        log.warning("fast entry: %s; keeping the exported module's own call", exc)
        return slow
    return entry if identical_on(entry, slow, examples, "fast entry") else slow
