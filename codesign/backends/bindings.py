"""Run an FX graph's aten ops through torch's generated Python bindings instead of ``OpOverload``.

An exported graph calls ``torch.ops.aten.add.Tensor(...)``: an ``OpOverload``, whose call matches
arguments against the JIT schema in Python-facing C++ on every call. ``torch.add`` is a generated
binding that parses its arguments in one pass: about 5-10 µs less per op, the whole difference
between running the captured graph and calling the ``nn.Module`` it came from (the zoo's ``pnn``:
636 µs as captured, 427 µs rebound, 374 µs eager). The binding dispatches to the same kernel, so
outputs are bit-identical; ``lean_graph_module`` checks that on example inputs and keeps the graph
as it was otherwise.

The exported module also checks, before every call, that the inputs' pytree structure matches the
exported one (``_check_inputs_match``: ~45 µs for six inputs in a dict, flattening with paths). The
structure of a serving call does not change from call to call, so ``lean_graph_module`` runs that
check once per distinct structure (``StructureCheck``); the shape guards (``_guards_fn``, in the
graph) and the pytree flatten are what ``backends.entry`` takes off the eager backend's call path.
``DirectCall`` calls the module's ``forward`` past
``nn.Module.__call__``'s hook loop (~15-20 µs a call with the exported module's three hooks), where
those hooks are only that check and the export's no-op pytree registrations.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from codesign.numerics import EXACT, compare_outputs

__all__ = [
    "DirectCall",
    "StructureCheck",
    "direct_call",
    "identical_on",
    "lean_graph_module",
    "python_binding",
]

log = logging.getLogger(__name__)

# aten ops whose Tensor method of the same name has other semantics (``x.index`` does not exist and
# ``__getitem__`` reads ``None`` as a new axis)
_NO_METHOD = frozenset({"index"})


def python_binding(op: Any) -> Callable[..., Any] | None:
    """The generated Python binding that dispatches to ``op``'s kernel with the same arguments, or None.

    ``torch.X`` only where it is the C++ binding itself (``torch.tensordot``, ``torch.split`` ... are
    Python wrappers with other signatures, and FX writes a builtin's call by its public name), then
    ``torch._C._nn``/``_linalg``/``_special``, then the Tensor method if it is a C method. Overloads
    resolve the same way from the same argument types.
    """
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None
    name = op._schema.name.split("::", 1)[1]
    function = getattr(torch._C._VariableFunctions, name, None)
    if function is not None and getattr(torch, name, None) is function:
        return function  # type: ignore[no-any-return]  # a builtin of torch._C
    for module in (torch._C._nn, getattr(torch._C, "_linalg", None), getattr(torch._C, "_special", None)):
        function = getattr(module, name, None) if module is not None else None
        if function is not None:
            return function  # type: ignore[no-any-return]
    method = getattr(torch.Tensor, name, None)
    # only a C method: torch/_tensor.py's Python methods (split, stft, norm, unique_consecutive ...)
    # wrap other signatures or return types
    if type(method).__name__ != "method_descriptor" or name in _NO_METHOD:
        return None
    return method  # type: ignore[no-any-return]


def _structure(x: Any) -> Any:
    """A hashable key of ``x``'s container structure (types, dict keys in order); leaves by type."""
    if isinstance(x, dict):
        return (dict, tuple(x), tuple(_structure(v) for v in x.values()))
    if type(x) in (list, tuple):
        return (type(x), tuple(_structure(v) for v in x))
    return type(x)


class StructureCheck:
    """The exported module's input-structure check, run once per distinct structure of the inputs.

    Stands in for torch's ``_check_input_constraints_pre_hook`` on modules with a ``_guards_fn``
    (there that hook only matches the structure against ``_in_spec``: the guards run in the graph).
    Keyword inputs are keyed by name, as torch reorders them to the exported order.
    """

    def __init__(self, check: Callable[[Any, Any, Any], Any]) -> None:
        self._check = check
        self._seen: set[Any] = set()

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not getattr(module, "validate_inputs", True):
            return
        key = (_structure(args), tuple(sorted((k, _structure(v)) for k, v in kwargs.items())))
        if key not in self._seen:
            self._check(args, kwargs, module._in_spec)  # raises where the structure differs
            self._seen.add(key)


def _cheaper_input_check(module: torch.fx.GraphModule) -> None:
    """Swap the exported module's per-call structure check for ``StructureCheck``, where it is that."""
    try:
        from torch.export._unlift import _check_input_constraints_pre_hook, _check_inputs_match
    except ImportError:  # another torch: keep its hooks as they are
        return
    if not hasattr(module, "_guards_fn"):
        return  # the hook checks shapes too
    for key, hook in module._forward_pre_hooks.items():
        if hook is _check_input_constraints_pre_hook:
            module._forward_pre_hooks[key] = StructureCheck(_check_inputs_match)


def _registers_nothing(hook: Any) -> bool:
    """True for the export's pre/post hooks that register nn.Module input types, when there are none."""
    if "_create_stateful_graph_module" not in getattr(hook, "__qualname__", ""):
        return False
    cells = [c.cell_contents for c in (getattr(hook, "__closure__", None) or ())]
    return len(cells) == 1 and cells[0] == set()


class DirectCall:
    """Calls ``module.forward`` after its ``StructureCheck``: what its hooks would do, without the hook loop."""

    def __init__(self, module: torch.fx.GraphModule, check: StructureCheck) -> None:
        self.module = module
        self._check = check

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check(self.module, args, kwargs)
        return self.module.forward(*args, **kwargs)


def direct_call(module: torch.fx.GraphModule) -> Callable[..., Any]:
    """``DirectCall`` of ``module`` where its hooks are a ``StructureCheck`` and no-ops, else ``module``."""
    checks = [h for h in module._forward_pre_hooks.values() if isinstance(h, StructureCheck)]
    others = [
        h
        for h in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if not isinstance(h, StructureCheck)
    ]
    if len(checks) != 1 or not all(_registers_nothing(h) for h in others):
        return module
    return DirectCall(module, checks[0])


def lean_graph_module(
    graph_module: torch.fx.GraphModule, examples: Sequence[Mapping[str, Any]]
) -> torch.fx.GraphModule:
    """A graph module (sharing ``graph_module``'s parameters) whose aten calls use Python bindings.

    Checked on ``examples`` (keyword inputs): outputs must be identical, else ``graph_module`` itself
    is returned.
    """
    graph = copy.deepcopy(graph_module.graph)
    rebound = 0
    for node in graph.nodes:
        if node.op == "call_function" and (binding := python_binding(node.target)) is not None:
            node.target = binding
            rebound += 1
    if not rebound:
        return graph_module
    lean = torch.fx.GraphModule(graph_module, graph)
    # the exported module's input checks run as hooks that read its attributes (validate_inputs,
    # range constraints ...): the rebound module keeps both
    for attr, value in vars(graph_module).items():
        if attr not in vars(lean):
            setattr(lean, attr, value)
    for attr in (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        setattr(lean, attr, copy.copy(getattr(graph_module, attr)))
    _cheaper_input_check(lean)
    # a binding that reads its arguments otherwise: keep the graph as it is
    return lean if identical_on(lean, graph_module, examples, "python bindings") else graph_module


def identical_on(
    candidate: Callable[..., Any],
    reference: Callable[..., Any],
    examples: Sequence[Mapping[str, Any]],
    what: str,
) -> bool:
    """True where ``candidate`` gives ``reference``'s outputs bit for bit on every example (keyword
    inputs); else logs why, naming ``what``, and returns False (the caller keeps ``reference``)."""
    try:
        with torch.no_grad():
            same = all(compare_outputs(candidate(**x), reference(**x), EXACT)[0] for x in examples)
    except Exception as exc:
        log.warning("%s: %s; keeping the exported module's own call", what, exc)
        return False
    if not same:
        log.warning("%s changed the outputs; keeping the exported module's own call", what)
    return same
