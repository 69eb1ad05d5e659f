"""capture(): torch.export with a dynamic candidate dimension, returning a Program.

Export failures are turned into a ``CaptureError`` that names the module and source line that
failed and the usual fix, instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import linecache
import logging
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from codesign.errors import CaptureError, SpecError
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
    example.validate(spec)
    if example.num_candidates < 2:
        raise SpecError(
            f"the example has {example.num_candidates} candidate row; torch.export specializes sizes 0 and 1",
            fix="capture with an example of at least 2 candidate rows (the program still accepts 1)",
        )
    for values in spec.jagged:
        if example.leaves()[values].numel() < 2:
            raise SpecError(f"jagged input {values!r} has < 2 values in the example; use a larger example")
    model.eval()
    dynamic_shapes = dynamic_shapes_for(example.inputs, spec, max_candidates)
    try:
        with torch.no_grad():
            exported = torch.export.export(model, (), dict(example.inputs), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        where = None
        if "constraint" in str(exc).lower() or "specializ" in str(exc).lower():
            where = _locate_specialization(model, example, dynamic_shapes)
        raise _explain_export_failure(exc, model, where) from None
    module = exported.module()
    if not isinstance(module, torch.fx.GraphModule):
        raise CaptureError(f"torch.export returned a {type(module).__name__}, not a GraphModule")
    program = Program(
        graph_module=module,
        spec=spec,
        example=example,
        name=name or type(model).__name__,
        make_batch=make_batch,
        max_candidates=max_candidates,
        metadata={"model_class": f"{type(model).__module__}.{type(model).__qualname__}"},
    )
    _verify_capture(model, program)
    return program


def _verify_capture(model: torch.nn.Module, program: Program) -> None:
    """The captured graph must equal eager on the example and on a batch of another size."""
    n = program.example.num_candidates
    batches = [program.example, program.sample_batch([max(1, n // 2 + 1), 1, 3], seed=12345)]
    for batch in batches:
        with torch.no_grad():
            want = output_tensors(model(**batch.inputs))
            got = output_tensors(program.run(batch))
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            if not torch.allclose(g, w, rtol=CAPTURE_RTOL, atol=CAPTURE_ATOL):
                raise CaptureError(
                    f"the exported graph's output {i} differs from eager at {batch.num_candidates} candidates "
                    f"(max abs error {(g - w).abs().max().item():.3g})",
                    fix="the model likely depends on Python state that export froze (a global, a cached "
                    "tensor, a size read as int); make forward() a pure function of its inputs",
                )


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
