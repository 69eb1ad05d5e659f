"""capture(): torch.export with a dynamic candidate dimension, returning a Program.

Export failures are turned into a ``CaptureError`` that names the module and source line that
failed and the usual fix, instead of a traceback from deep inside torch.

Capture implies compile: every backend re-exports the program with size-oblivious shapes
(``Program.export``: any candidate count from 1, no 0/1 specialization), so capture exports with the
same shape semantics. A model that only exports with torch's default semantics (it compares the
candidate count with 1 somewhere) is exported that way, then re-exported like a backend would; where
a composite op adds the guard when it is traced again, its non-contiguous inputs are copied to
contiguous layout first (the guard of a contiguity test, as in ``nn.MultiheadAttention``), or else
the op (``torch.tensordot``, ...) is decomposed into the aten ops it stands for, so that what
captures also compiles. What still cannot
be re-exported is a ``CaptureError`` at capture, not a raw torch error at compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.fx.experimental._config
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from codesign.errors import CaptureError, SpecError
from codesign.ir.contract import check_outputs
from codesign.ir.kjt import adapt_for_kjt
from codesign.ir.program import DEFAULT_MAX_CANDIDATES, Program, dynamic_shapes_for
from codesign.ir.request import RequestBatch, RequestSpec
from codesign.ir.workload import Workload
from codesign.numerics import output_tensors

__all__ = ["CAPTURE_ATOL", "CAPTURE_RTOL", "capture"]

log = logging.getLogger(__name__)

# The unlifted export graph runs the same aten ops as eager; only op fusion inside ATen can differ.
CAPTURE_RTOL = 1e-5
CAPTURE_ATOL = 1e-6

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_CODESIGN_DIR = str(Path(__file__).resolve().parent)


def _is_user_file(filename: str) -> bool:
    """A frame of the user's model code (not torch, codesign or another installed package)."""
    return not filename.startswith((_TORCH_DIR, _CODESIGN_DIR)) and "site-packages" not in filename


def capture(
    model: torch.nn.Module | Workload,
    example: RequestBatch | None = None,
    spec: RequestSpec | None = None,
    *,
    make_batch: Callable[[Sequence[int], int], RequestBatch] | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    name: str | None = None,
) -> Program:
    """Export ``model`` with a dynamic candidate count and return a verified Program.

    ``example`` is a RequestBatch whose ``inputs`` are the model's keyword arguments (flat rows,
    user features repeated); ``spec`` says which inputs are request-level. A Workload supplies all
    three.

    >>> program = capture(model, batch, RequestSpec(request_inputs=("user",)))
    """
    if isinstance(model, Workload):
        workload = model
        model, spec = workload.model, spec or workload.spec
        make_batch = make_batch or workload.make_batch
        example = example or workload.example()
        name = name or workload.name
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    if example is None or spec is None:
        raise SpecError("capture() needs an example RequestBatch and a RequestSpec (or a Workload)")
    if not isinstance(example, RequestBatch):
        raise SpecError(
            f"example must be a codesign.RequestBatch, got {type(example).__name__}",
            fix="wrap the model's keyword inputs: RequestBatch(inputs={...}, offsets=offsets_from_counts([...]))",
        )
    # TorchRec KeyedJaggedTensor inputs become per-key values/lengths; an adapter rebuilds them inside
    model, example, spec, make_batch = adapt_for_kjt(model, example, spec, make_batch)
    example.validate(spec)
    _check_static_inputs(example, spec)
    if example.num_candidates < 2:
        raise SpecError(
            f"the example has {example.num_candidates} candidate row; torch.export specializes sizes 0 and 1",
            fix="capture with an example of at least 2 candidate rows (the program still accepts 1)",
        )
    for values in spec.bags:
        if example.leaves()[values].numel() < 2:
            raise SpecError(f"jagged input {values!r} has < 2 values in the example; use a larger example")
    model.eval()
    dynamic_shapes = dynamic_shapes_for(example.inputs, spec, max_candidates)
    try:
        # the shape semantics of every backend's re-export: what exports here re-exports there
        with torch.no_grad(), _size_oblivious():
            exported = torch.export.export(model, (), dict(example.inputs), dynamic_shapes=dynamic_shapes)
        like_backends = True
    except Exception:
        like_backends = False
        try:
            with torch.no_grad():
                exported = torch.export.export(model, (), dict(example.inputs), dynamic_shapes=dynamic_shapes)
        except Exception as exc:
            where = None
            if "constraint" in str(exc).lower() or "specializ" in str(exc).lower():
                where = _locate_specialization(model, example, dynamic_shapes)
            raise _explain_export_failure(exc, model, where) from None
    program = Program(
        graph_module=_graph_module(exported),
        spec=spec,
        example=example,
        name=name or type(model).__name__,
        make_batch=make_batch,
        max_candidates=max_candidates,
        metadata={
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "request_form": spec.form,
        },
    )
    log.info(
        "%s: request-level inputs in the %s form%s",
        program.name,
        spec.form,
        f" ({', '.join(spec.per_request_inputs)}: one row per request)"
        if spec.per_request_inputs
        else " (user features repeated on every candidate row)",
    )
    if not like_backends:
        program = _reexportable(program, exported)
    _verify_capture(model, program)
    return program


def _check_static_inputs(example: RequestBatch, spec: RequestSpec) -> None:
    """A static input with one row per request of the example is a per-request input declared wrong:
    export would freeze it to the example's request count, and every other count would fail."""
    leaves = example.leaves()
    r, n = example.num_requests, example.num_candidates
    for path in spec.static_inputs:
        t = leaves.get(path)
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == r != n and r > 1:
            raise SpecError(
                f"static input {path!r} has {r} rows, the example's request count: a static input is frozen "
                "to its capture shape, so a batch of any other request count would fail",
                fix=f"if it holds one row per request, declare per_request_inputs=({path!r},) with "
                "request_index_input (or request_offsets_input) naming the model's candidate-to-request "
                "map; if it is truly static, capture with an example of another request count",
            )
    reserved = "request_offsets"
    if reserved in leaves and spec.request_offsets_input != reserved:
        raise SpecError(
            f"the model takes an input named {reserved!r}, the name codesign gives the request offsets it "
            "passes to request-centric programs",
            fix=f"declare it request_offsets_input={reserved!r} if it holds the batch's request offsets, or "
            "rename the model's argument",
        )


@contextmanager
def _size_oblivious() -> Iterator[None]:
    """The shape settings ``Program.export`` re-exports with (a candidate count of 1 is a size like any other)."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]  # torch config modules are typed without their options
        yield


def _graph_module(exported: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    module = exported.module()
    if not isinstance(module, torch.fx.GraphModule):
        raise CaptureError(f"torch.export returned a {type(module).__name__}, not a GraphModule")
    return module


def _composite_ops(exported: torch.export.ExportedProgram) -> list[torch._ops.OpOverload]:
    """Composite (CompositeImplicitAutograd) aten ops that export kept as single nodes, in graph order."""
    ops: dict[torch._ops.OpOverload, None] = {}
    for node in exported.graph.nodes:
        op = node.target
        if (
            node.op == "call_function"
            and isinstance(op, torch._ops.OpOverload)
            and not op.name().startswith("aten::sym_")  # size queries, not computations
            and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
        ):
            ops[op] = None
    return list(ops)


def _reexportable(program: Program, exported: torch.export.ExportedProgram) -> Program:
    """``program`` if backends can re-export it, else a copy with the guarding composite ops decomposed.

    Only reached when the model does not export with the backends' shape semantics. torch.export keeps
    composite ops as single nodes; re-tracing one runs its C++ kernel again, and a kernel that tests a
    size against 1 (``torch.tensordot`` does) then adds a ``candidates != 1`` guard, which the candidate
    dimension (1 and up) violates. Decomposed into the aten ops it stands for, the guard is gone. Each
    composite op is tried alone first so that the ops passes match (``aten.linear`` ...) stay whole.
    """
    try:
        program.export(size_oblivious_only=True)
        return program
    except Exception as exc:
        failure = exc
    first_lines = "\n    ".join(line for line in str(failure).strip().splitlines()[:4] if line.strip())
    if "constraint" not in str(failure).lower():
        err = CaptureError(
            f"capture failed: '{program.name}' exports, but its graph does not export again the way every "
            f"backend re-exports it\n  torch.export said: {type(failure).__name__}: {first_lines}",
            fix="report the model with this message: every backend re-exports the captured graph, so none "
            "could lower it",
        )
        err.original = failure
        raise err
    composites = _composite_ops(exported)
    materialized = _materialize_guarding_layouts(program, _graph_module(exported), set(composites))
    if materialized is not None:
        return materialized
    table = torch.export.default_decompositions()
    trials = [[op] for op in composites if op in table]
    if len(trials) > 1:
        trials.append([op for (op,) in trials])
    for ops in trials:
        try:
            with torch.no_grad():
                decomposed = exported.run_decompositions({op: table[op] for op in ops})
            candidate = dataclasses.replace(
                program,
                graph_module=_graph_module(decomposed),
                metadata={**program.metadata, "decomposed_at_capture": [str(op) for op in ops]},
            )
            candidate.export(size_oblivious_only=True)
        except Exception:
            continue
        log.info(
            "%s: decomposed %s at capture so that backends can re-export it",
            program.name,
            ", ".join(map(str, ops)),
        )
        return candidate
    try:  # a plain re-export works: backends lower it as it is; request sharing will say it cannot
        program.export()
    except Exception:
        pass
    else:
        guard = _locate_guard(program) or "an op in the graph compares the candidate count with 1"
        log.info("%s: re-exports only without size-oblivious shapes: %s", program.name, guard)
        metadata = {**program.metadata, "size_oblivious_export": False, "size_guard": guard}
        return dataclasses.replace(program, metadata=metadata)
    culprit = _locate_guard(program)
    err = CaptureError(
        f"capture failed: '{program.name}' exports, but not with the size-oblivious shapes that every "
        f"backend re-exports it with (any candidate count from 1): {culprit or 'an op in the graph guards'}, "
        "which a single candidate row fails; neither contiguous copies nor decomposing the composite ops "
        f"{[str(op) for op in composites]} removed it\n  torch.export said: {type(failure).__name__}: "
        f"{first_lines}",
        fix="write that computation so that it does not compare the number of rows with 1 (no Python "
        "branch on x.shape[0] == 1, no .item() of a size); e.g. keep the candidate rows on dim 0",
    )
    err.original = failure
    raise err


def _materialize_guarding_layouts(
    program: Program, graph_module: torch.fx.GraphModule, composites: set[Any]
) -> Program | None:
    """``program`` on ``graph_module`` with contiguous copies before the composite ops that guard, or None.

    A composite op's C++ kernel runs again when a backend re-traces the graph, and some test their
    input's contiguity (``linear`` and ``reshape`` pick a fold-and-view path, ``contiguous`` decides
    whether to copy). On a transposed tensor (``nn.MultiheadAttention(batch_first=True)`` runs on
    ``[fields, batch, d]``) that test compares the candidate count with 1: a transposed tensor of one
    row is contiguous. Copying first (``clone(memory_format=contiguous_format)``, which never tests)
    makes the test true for every size; the values are the same, and the copy is one the kernel makes
    anyway for a non-contiguous input. Only ops that re-export names as guarding get copies (then every
    node of that op, one op at a time); None when an op that guards is not such an op.
    """
    touched: list[str] = []
    for _ in range(_MAX_MATERIALIZED):
        candidate = dataclasses.replace(
            program,
            graph_module=graph_module,
            metadata={**program.metadata, "materialized_at_capture": list(touched)},
        )
        spy = _GuardSpy()
        try:
            with spy:
                candidate.export(size_oblivious_only=True)
        except Exception:
            node = spy.node
            if node is None or node.target not in composites:
                return None
            same_op = [
                n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is node.target
            ]
            copied = [n.name for n in same_op if _copy_inputs_contiguous(graph_module, n)]
            if node.name not in copied:
                return None
            touched += copied
            continue
        if touched:
            log.info("%s: contiguous copies before %s at capture", program.name, ", ".join(touched))
            return candidate
        return None
    return None


_MAX_MATERIALIZED = 16


def _copy_inputs_contiguous(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Feed ``node`` contiguous copies of its non-contiguous tensor inputs (by example layout); any?"""
    graph = graph_module.graph
    copied = False
    for arg in node.all_input_nodes:
        value = arg.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.is_contiguous():
            continue
        with graph.inserting_before(node):
            copy = graph.call_function(
                torch.ops.aten.clone.default, (arg,), {"memory_format": torch.contiguous_format}
            )
        with getattr(value, "fake_mode", contextlib.nullcontext()):
            copy.meta = {**arg.meta, "val": value.clone(memory_format=torch.contiguous_format)}
        node.replace_input_with(arg, copy)
        copied = True
    if copied:
        graph.lint()
        graph_module.recompile()
    return copied


class _GuardSpy(TorchFunctionMode):
    """Records the first graph node whose op added a shape guard that a single candidate row violates."""

    def __init__(self) -> None:
        super().__init__()
        self.where: str | None = None
        self.node: torch.fx.Node | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        env = _shape_env((args, kwargs)) if self.where is None else None
        before = len(env.guards) if env is not None else 0
        out = func(*args, **(kwargs or {}))
        if env is not None and len(env.guards) > before:
            for guard in env.guards[before:]:
                expr = guard.expr
                if expr.free_symbols and not bool(expr.subs({s: 1 for s in expr.free_symbols})):
                    self.node = _running_node()
                    self.where = _describe_node(self.node, func, expr)
                    break
        return out


def _running_node() -> torch.fx.Node | None:
    """The FX node that torch.export's interpreter is running (re-exporting a GraphModule runs one)."""
    frame = sys._getframe()
    while frame is not None:
        node = frame.f_locals.get("n") if frame.f_code.co_name == "run_node" else None
        if isinstance(node, torch.fx.Node):
            return node
        frame = frame.f_back  # type: ignore[assignment]  # None ends the walk
    return None


def _describe_node(node: torch.fx.Node | None, func: Any, guard: Any) -> str:
    """``node 'linear' (aten.linear.default at model.py:63: `out = self.attn(x, x, x)`) adds the guard ...``."""
    where = ""
    if node is not None:
        lines = [line.strip() for line in str(node.meta.get("stack_trace", "")).splitlines()]
        user = [
            (line, lines[i + 1] if i + 1 < len(lines) else "")
            for i, line in enumerate(lines)
            if line.startswith('File "') and _is_user_file(line.split('"')[1])
        ]
        if user:
            file_line, code = user[-1]
            filename, _, rest = file_line.removeprefix('File "').partition('"')
            lineno = rest.split("line ")[-1].split(",")[0]
            where = f" at {filename}:{lineno}: `{code}`"
        return f"node '{node.name}' ({func}{where}) adds the guard {guard}"
    return f"{func} adds the guard {guard}"


def _locate_guard(program: Program) -> str | None:
    """Re-export under a spy to name the node that guards on the candidate count (only on failure)."""
    spy = _GuardSpy()
    try:
        with spy:
            program.export()
    except Exception:
        pass
    return spy.where


def _verify_capture(model: torch.nn.Module, program: Program) -> None:
    """The captured graph must equal eager on the example and on a batch of another size, and keep the
    output contract (``ir.contract``: a row per candidate, requests independent of each other)."""
    n = program.example.num_candidates
    batches = [
        program.example,
        program.sample_batch([max(1, n // 2 + 1), 1, 3], seed=12345),
        program.sample_batch([1], seed=12346),  # one candidate: the size torch.export likes to specialize
    ]
    for batch in batches:
        with torch.no_grad():
            want = output_tensors(model(**batch.inputs))
            got = output_tensors(program.run(batch))
        if len(want) != len(got) or any(w.shape != g.shape for w, g in zip(want, got, strict=False)):
            raise CaptureError(
                f"the exported graph returns {[list(g.shape) for g in got]} at {batch.num_candidates} "
                f"candidates where eager returns {[list(w.shape) for w in want]}",
                fix="the model likely depends on Python state that export froze (a size read as int); "
                "make forward() a pure function of its inputs",
            )
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            if not torch.allclose(g, w, rtol=CAPTURE_RTOL, atol=CAPTURE_ATOL, equal_nan=True):
                raise CaptureError(
                    f"the exported graph's output {i} differs from eager at {batch.num_candidates} candidates "
                    f"(max abs error {(g - w).abs().max().item():.3g})",
                    fix="the model likely depends on Python state that export froze (a global, a cached "
                    "tensor, a size read as int); make forward() a pure function of its inputs",
                )
    pair = (program.sample_batch([3, 2], seed=12347), program.sample_batch([4], seed=12348))
    program.metadata["outputs"] = check_outputs(program.run, program.spec, batches, pair)


def _frames(tb: TracebackType | None) -> list[Any]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _shape_env(obj: Any) -> Any:
    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            for d in leaf.shape:
                if isinstance(d, torch.SymInt):
                    return d.node.shape_env
    return None


class _SpecializationSpy(TorchFunctionMode):
    """Records the first torch call after which a dynamic size became a constant, and its user frame."""

    def __init__(self) -> None:
        super().__init__()
        import sympy  # half a second to import; only a failed capture gets here

        self._constant = sympy.Integer
        self.where: tuple[str, int, str] | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        env = _shape_env((args, kwargs)) if self.where is None else None
        before = {k for k, v in env.replacements.items() if isinstance(v, self._constant)} if env else set()
        out = func(*args, **(kwargs or {}))
        if env is not None:
            after = {k for k, v in env.replacements.items() if isinstance(v, self._constant)}
            if after - before:
                frames = [f for f in traceback.extract_stack() if _is_user_file(f.filename)]
                if frames:
                    f = frames[-1]
                    self.where = (f.filename, f.lineno or 0, (f.line or "").strip())
        return out


def _locate_specialization(model: torch.nn.Module, example: RequestBatch, dynamic_shapes: Any) -> Any:
    """Re-run export under a spy to find the line that fixed the candidate count (only on failure)."""
    spy = _SpecializationSpy()
    try:
        with spy, torch.no_grad():
            torch.export.export(model, (), dict(example.inputs), dynamic_shapes=dynamic_shapes)
    except Exception:
        pass
    return spy.where


def _explain_export_failure(
    exc: Exception, model: torch.nn.Module, specialized_at: tuple[str, int, str] | None = None
) -> CaptureError:
    modules = {id(m): (name or "<root>", type(m).__name__) for name, m in model.named_modules()}
    where_module = None
    where_line = None
    for frame in _frames(exc.__traceback__):
        self_obj = frame.f_locals.get("self")
        if self_obj is not None and id(self_obj) in modules:
            where_module = modules[id(self_obj)]
        filename = frame.f_code.co_filename
        if _is_user_file(filename):
            src = linecache.getline(filename, frame.f_lineno).strip()
            where_line = (filename, frame.f_lineno, src)
    text = str(exc)
    if specialized_at is not None:
        where_line = specialized_at
    if where_line is None:
        # strict export reports the user frame only in its message
        for summary in traceback.extract_tb(exc.__traceback__):
            if _is_user_file(summary.filename):
                where_line = (summary.filename, summary.lineno or 0, (summary.line or "").strip())
    lowered = text.lower()
    if "data-dependent" in lowered or "datadependent" in lowered or "guardondatadependent" in lowered:
        kind = "data-dependent control flow or a tensor value read as a Python number"
        fix = (
            "replace Python `if`/loops on tensor values and .item()/.tolist() with tensor ops "
            "(torch.where, masking) or torch.cond"
        )
    elif "constraint" in lowered or "specializ" in lowered or "candidates" in lowered:
        kind = "the model fixes the candidate count"
        fix = (
            "do not hard-code the batch size: use x.shape[0] or -1 in view/reshape/expand and avoid "
            "branching on the number of rows"
        )
    elif "unsupported" in lowered or "not supported" in lowered or "numpy" in lowered:
        kind = "an operation torch.export cannot trace"
        fix = "use torch ops instead of numpy/Python-side computation inside forward()"
    else:
        kind = "torch.export could not trace the model"
        fix = (
            "make forward() traceable: tensor ops only, no data-dependent Python control flow or side effects"
        )
    parts = [f"capture failed: {kind}"]
    if where_module is not None:
        parts.append(f"in module '{where_module[0]}' ({where_module[1]})")
    if where_line is not None:
        parts.append(f"at {where_line[0]}:{where_line[1]}: `{where_line[2]}`")
    first_lines = "\n    ".join(line for line in text.strip().splitlines()[:6] if line.strip())
    err = CaptureError(
        " ".join(parts) + f"\n  torch.export said: {type(exc).__name__}: {first_lines}", fix=fix
    )
    err.original = exc
    return err
